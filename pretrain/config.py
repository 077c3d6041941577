"""Structured config schemas.

Hydra merges every YAML file in configs/ onto these dataclasses, so a misspelt key or a value of
the wrong type is an error that names the key, before anything runs. Defaults and the meaning of
each knob are documented in the YAML files; the schemas only fix names and types.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional  # Optional, not X | None: OmegaConf 2.3.0 reads only the former

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from pretrain.errors import UserError


@dataclass
class ModelConfig:
    name: str = "tost"
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    seq_len: int = 1024
    bias: bool = False
    layerscale_init: Optional[float] = None
    dropout: float = 0.0
    norm_eps: float = 1e-5
    gelu_approximate: str = "none"
    tssa_impl: str = "auto"
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    label_smoothing: float = 0.0
    ista_step: float = 0.1
    ista_lambda: float = 0.1
    skeleton: str = "xcit"
    class_attention_layers: int = 2
    fourier_features: int = 16


@dataclass
class ImageConfig:
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list = field(default_factory=lambda: [0.75, 1.3333333333333333])
    flip_p: float = 0.5
    eval_crop_fraction: float = 0.875
    rand_augment_ops: int = 0
    rand_augment_magnitude: float = 9.0
    rand_augment_magnitude_std: float = 0.5
    rand_augment_prob: float = 0.5
    erase_prob: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    cutmix_switch_prob: float = 0.5
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class SourceConfig:
    name: Optional[str] = None
    urls: Any = MISSING
    weight: float = MISSING
    storage_options: Optional[dict] = None


@dataclass
class DataConfig:
    source: str = "shards"
    urls: Any = MISSING
    sources: Optional[list[SourceConfig]] = None
    val_urls: Any = None
    storage_options: dict = field(default_factory=dict)
    cache_dir: str = "~/.cache/whitebox-pretrain"
    stdlib_max_mb: float = 4.0
    samples_per_shard: int = 256
    num_workers: int = 2
    readers: int = 0
    shuffle_buffer: int = 1000
    retries: int = 3
    retry_backoff_s: float = 1.0
    on_error: str = "raise"
    document_mask: bool = False
    image: ImageConfig = field(default_factory=ImageConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 2000
    decay_steps: int = 600000
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass
class EngineConfig:
    name: str = "deepspeed"
    zero_stage: int = 2
    precision: str = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
    compile: bool = False
    compile_scope: str = "blocks"
    reshard_after_forward: bool = True
    deepspeed_overrides: dict = field(default_factory=dict)


@dataclass
class SpikeConfig:
    action: str = "none"
    window: int = 100
    min_history: int = 20
    threshold: float = 6.0
    min_rise: float = 0.05
    patience: int = 1


@dataclass
class TrainConfig:
    max_steps: int = 600000
    global_batch_size: int = 480
    micro_batch_size: int = 12
    seed: int = 1337
    log_interval: int = 10
    eval_interval: int = 1000
    eval_max_batches: int = 0
    ema_decay: float = 0.0
    bad_steps_to_reload: int = 3
    max_reloads: int = 2
    heartbeat_s: float = 2.0
    lost_rank_timeout_s: float = 60.0
    collective_timeout_s: float = 1800.0
    peak_tflops: Optional[float] = None
    spike: SpikeConfig = field(default_factory=SpikeConfig)


@dataclass
class CheckpointConfig:
    interval: int = 1000
    resume: str = "auto"
    init_from: Optional[str] = None
    url: Optional[str] = None
    storage_options: dict = field(default_factory=dict)
    staging_dir: Optional[str] = None
    keep_last: int = 3
    keep_every: int = 0
    commit_wait_s: float = 600.0
    async_upload: bool = True
    on_upload_error: str = "continue"
    preempt_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = "whitebox-pretrain"
    run_name: Optional[str] = None
    request_timeout_s: float = 10.0
    retry_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    buffer_max_mb: float = 64.0
    flush_timeout_s: float = 30.0


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redacted(cfg: Config) -> dict:
    """The config as a plain dict with credentials in any `storage_options` masked, for every
    place a config is written or logged (run_dir/config.yaml, MLflow params)."""

    def mask(tree: Any, in_storage_options: bool = False) -> Any:
        if isinstance(tree, list):  # data.sources: each source may have storage_options
            return [mask(item, in_storage_options) for item in tree]
        if not isinstance(tree, dict):
            return tree
        return {
            k: "***"
            if in_storage_options and any(w in k.lower() for w in SECRET_WORDS)
            else mask(v, in_storage_options or k == "storage_options")
            for k, v in tree.items()
        }

    return mask(asdict(cfg))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: the form of MLflow params and config diffs."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flattened keys whose value differs between two (redacted) configs: key -> (saved, current).
    A key the saved config lacks counts as its schema default: a setting added since a checkpoint
    was written, left at its default, changes nothing."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    old, new = flatten(saved), flatten(current)
    old = {**{k: defaults[k] for k in new.keys() - old.keys() if k in defaults}, **old}
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def grad_accum_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step, so that every world size trains on the same global batch."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x ranks = {train.micro_batch_size} x {world_size}; "
            f"change one of them"
        )
    return train.global_batch_size // per_step


def register_schemas() -> None:
    """Make the schemas available to configs/config.yaml's defaults list."""
    ConfigStore.instance().store(name="schema", node=Config)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _describe(error: Exception) -> str:
    """One line naming the offending key, from Hydra's and OmegaConf's nested exceptions."""
    if isinstance(error, OverrideParseException):
        return (
            f"cannot parse the override {error.override!r}: {' '.join(error.message.split('See https')[0].split())}; "
            f"quote a value holding braces or commas, e.g. 'data.urls=\"s3://b/shard-{{000..099}}.tar\"'"
        )
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for e in reversed(chain):
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            reason = str(getattr(e, "msg", e)).strip().splitlines()[0]
            hint = (
                "; check the spelling against configs/" if isinstance(e, (ConfigKeyError, ConfigAttributeError)) else ""
            )
            return f"config key '{e.full_key}': {reason}{hint}"
    return " ".join(str(error).split("Config search path")[0].split())


# The numeric keys with a range, checked once the config is composed: key -> (bound, strict).
# A value must be finite and above the bound (strict) or at least the bound.
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "optim.lr": (0, True),
    "optim.min_lr": (0, False),
    "optim.eps": (0, True),
    "optim.weight_decay": (0, False),
    "optim.grad_clip": (0, False),
    "optim.warmup_steps": (0, False),
    "optim.decay_steps": (0, False),
    "data.num_workers": (0, False),
    "data.readers": (0, False),
    "data.shuffle_buffer": (1, False),
    "data.retries": (0, False),
    "data.retry_backoff_s": (0, False),
    "data.samples_per_shard": (1, False),
    "data.stdlib_max_mb": (0, True),
    "train.max_steps": (0, False),
    "train.global_batch_size": (1, False),
    "train.micro_batch_size": (1, False),
    "train.log_interval": (1, False),
    "train.eval_interval": (1, False),
    "train.eval_max_batches": (0, False),
    "train.heartbeat_s": (0, False),
    "train.lost_rank_timeout_s": (0, True),
    "train.collective_timeout_s": (0, True),
    "train.peak_tflops": (0, True),
    "train.spike.window": (1, False),
    "train.spike.min_history": (1, False),
    "train.spike.threshold": (0, True),
    "train.spike.min_rise": (0, False),
    "train.spike.patience": (1, False),
    "checkpoint.interval": (1, False),
    "checkpoint.keep_last": (1, False),
    "checkpoint.keep_every": (0, False),
    "checkpoint.commit_wait_s": (0, False),
    "tracking.request_timeout_s": (0, True),
    "tracking.retry_backoff_s": (0, True),
    "tracking.max_backoff_s": (0, True),
    "tracking.buffer_max_mb": (0, True),
    "tracking.flush_timeout_s": (0, False),
}
NULLABLE = {"train.peak_tflops"}  # keys of LOWER_BOUNDS whose null means "not set"
MAX_KEY_CHARS = 200  # far beyond any real key: longer ones are pasted text, not keys


def load_config(overrides: list[str]) -> Config:
    """Compose configs/config.yaml with `overrides` (e.g. `+exp=tost_gpt2 optim.lr=1e-3`).

    The compose API rather than `@hydra.main`: every rank must see the same run directory, and
    Hydra's per-launch output directories (timestamped, created by each process) would differ.
    """
    _check_overrides(overrides)
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(_describe(e)) from None
    if OmegaConf.select(cfg, "data.sources") is not None and OmegaConf.is_missing(cfg.data, "urls"):
        cfg.data.urls = None  # the mixture gives the shards
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(
            f"config key '{missing[0]}' is required but has no value; "
            f"set it, e.g. {missing[0]}=..., or see the comment in configs/ for that key"
        )
    return _checked(cfg)


def config_from_dict(resolved: dict[str, Any]) -> Config:
    """A Config from a resolved one (a checkpoint manifest's), checked as `load_config` checks a composed one."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), resolved)
    except OmegaConfBaseException as e:
        raise UserError(_describe(e)) from None
    return _checked(cfg)


def _checked(cfg: DictConfig) -> Config:
    _check_bounds(cfg)
    _check_embedded_source(cfg)
    if cfg.data.source == "shards":
        source_names(cfg.data)
    return OmegaConf.to_object(cfg)


def override_key(override: str) -> str:
    """The config key an override sets: `+a.b=1`, `++a.b=1`, `~a.b` and `a.b=1` all set a.b."""
    return override.partition("=")[0].lstrip("+~")


def _check_overrides(overrides: list[str]) -> None:
    """Each key once: Hydra would let the last of two win, and an unquoted brace URL, which the
    shell expands into one override per shard, would train on the last shard alone."""
    counts = Counter(override_key(o) for o in overrides)
    for key in counts:
        if len(key) > MAX_KEY_CHARS:
            raise UserError(
                f"override key '{key[:40]}...' is {len(key)} characters long, which no config key is: "
                "check the command line"
            )
    for key, n in counts.items():
        if n > 1:
            hint = (
                f"""; an unquoted brace URL expands in the shell into one override per shard: quote it, '{key}="s3://b/shard-{{000..099}}.tar"'"""
                if key.endswith("urls")
                else ""
            )
            raise UserError(f"config key '{key}' is given {n} times on the command line: give it once{hint}")


def _check_embedded_source(cfg: DictConfig) -> None:
    """Shard URLs given to a run that reads an embedded default would be ignored while the run's
    config.yaml records them: refused, not silently dropped and not silently switched to."""
    if cfg.data.source == "shards":
        return
    for key in ("urls", "sources", "val_urls"):
        if cfg.data[key] is not None:
            raise UserError(
                f"data.{key} is set, but data.source={cfg.data.source} reads the embedded default and would ignore "
                f"it: add data=shards (data=image_shards for images) to train on your shards, "
                f"or leave data.{key} out"
            )


SOURCE_NAME = re.compile(r"[A-Za-z0-9_./-]+")  # what an MLflow metric name may hold, less spaces and colons


def directory_name(url: str) -> str:
    """The name of the directory (or bucket) a shard URL lies in: a source's default name."""
    return posixpath.basename(posixpath.dirname(url).rstrip("/"))


def source_names(data: DataConfig | DictConfig) -> list[str]:
    """The names of `data.sources` (a source's own, else its directory's; none without a mixture),
    once the mixture is given right: not beside data.urls, weights finite and > 0, names distinct.
    (A run without either has no training data: `_configured_sources` says so when it needs them.)"""
    if data.sources is None:
        return []
    if data.urls not in (None, MISSING):
        raise UserError(
            "data.urls and data.sources are both set: give one shard set as data.urls, or a weighted "
            "mixture as data.sources (set data.urls=null)"
        )
    if not data.sources:
        raise UserError("data.sources is an empty list: give it at least one {urls, weight}, or use data.urls")
    names: dict[str, int] = {}
    for i, source in enumerate(data.sources):
        weight = source.weight
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise UserError(f"data.sources[{i}].weight={weight} must be a finite number > 0")
        if source.urls in (None, MISSING):
            raise UserError(f"data.sources[{i}].urls is required: set it to a brace pattern or a list of shard URLs")
        first = source.urls if isinstance(source.urls, str) else next(iter(source.urls), "")
        name = source.name or directory_name(str(first)) or f"source{i}"
        if not SOURCE_NAME.fullmatch(name):
            raise UserError(
                f"data.sources[{i}].name={name!r}{'' if source.name else ' (its directory)'} names the metric "
                "tokens_seen/<name>: use letters, digits and _ - . / only"
            )
        if name in names:
            raise UserError(
                f"data.sources[{i}] and data.sources[{names[name]}] are both named {name!r}"
                f"{'' if source.name else ' (from their directories)'}: give each a distinct data.sources[i].name"
            )
        names[name] = i
    return list(names)


def _check_bounds(cfg: DictConfig) -> None:
    for key, (bound, strict) in LOWER_BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key in NULLABLE:
            continue
        if not (math.isfinite(value) and (value > bound if strict else value >= bound)):
            raise UserError(
                f"config key '{key}' is {value}: it must be a finite number {'>' if strict else '>='} {bound}"
            )
