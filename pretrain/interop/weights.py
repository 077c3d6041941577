"""A weights directory: a model's weights as safetensors, with the config that builds it.

This is what `tools/convert.py export-safetensors` and `import-hf` write and what a run starts
from with `checkpoint.init_from`. `config.json` holds the model config (pretrain/config.py's
ModelConfig), where the weights come from, and which names are tied to another (stored once);
the weights are one `model.safetensors`, or shards named in `model.safetensors.index.json`
(Hugging Face's layout, so that their loaders read it too).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from pretrain.config import ModelConfig
from pretrain.data.storage import url_to_fs
from pretrain.errors import UserError

WEIGHTS_FORMAT = "whitebox-weights"
WEIGHTS_VERSION = 1
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers' loaders expect of a PyTorch file
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WRITTEN_BY = "give a directory that tools/convert.py export-safetensors or import-hf wrote"
# Model fields a run may set otherwise than the weights it starts from: regularisation, not shape or function.
INIT_FREE_KEYS = frozenset({"dropout", "label_smoothing"})
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Weights:
    """A model's whole weights in memory, by the model's own names, with what they came from."""

    model: ModelConfig
    tensors: dict[str, torch.Tensor]
    provenance: dict[str, Any]


def tied_names(model: nn.Module) -> dict[str, str]:
    """Each parameter name that shares its tensor with an earlier one -> that earlier name
    (a causal LM's lm_head.weight -> wte.weight)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def skeleton(config: ModelConfig) -> nn.Module:
    """The model `config` builds, on the meta device: its names, shapes and tied parameters, without
    allocating or initialising a weight."""
    from pretrain.models import build_model

    with torch.device("meta"):
        return build_model(config)


def stored_tensors(weights: Weights, dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What files hold of `weights`: each tied tensor once (by its first name), floats in `dtype`;
    and the tied names left out (alias -> the name stored)."""
    tied = tied_names(skeleton(weights.model))
    cast = DTYPES[dtype]
    stored = {name: t for name, t in weights.tensors.items() if name not in tied}
    return {name: t.to(cast) if t.is_floating_point() else t for name, t in stored.items()}, tied


def parse_size(text: str) -> int:
    """'500MB', '2GB', '1GiB' or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--max-shard-size {text!r} is not a size: write it like 500MB, 2GB or 1GiB")
    return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])


def write_safetensors(tensors: dict[str, torch.Tensor], directory: str, max_shard_bytes: int | None = None) -> None:
    """`tensors` as one model.safetensors, or, when they exceed `max_shard_bytes`, as shards of at
    most that size (a larger tensor gets a shard of its own) and the index naming each one's file."""
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=SAFETENSORS_METADATA)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = SHARD_FILE.format(i, len(shards))
        save_file(shard, os.path.join(directory, file), metadata=SAFETENSORS_METADATA)
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(os.path.join(directory, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_weights(weights: Weights, directory: str, dtype: str = "fp32", max_shard_bytes: int | None = None) -> None:
    """The weights directory for `weights` in the local `directory`: tied names stored once."""
    stored, tied = stored_tensors(weights, dtype)
    write_safetensors(stored, directory, max_shard_bytes)
    write_json(
        os.path.join(directory, CONFIG_FILE),
        {
            "format": WEIGHTS_FORMAT,
            "version": WEIGHTS_VERSION,
            "model": asdict(weights.model),
            "dtype": dtype,
            "tied": tied,
            "provenance": weights.provenance,
        },
    )


def is_weights_dir(url: str, storage_options: dict) -> bool:
    fs, path = url_to_fs(url, storage_options, "weights directory")
    config = f"{path.rstrip('/')}/{CONFIG_FILE}"
    if not fs.isfile(config):
        return False
    try:
        return json.loads(fs.cat_file(config)).get("format") == WEIGHTS_FORMAT
    except ValueError:
        return False


def load_weights(url: str, storage_options: dict) -> Weights:
    """A weights directory (local path or fsspec URL) read whole, tied names restored, in fp32."""
    fs, path = url_to_fs(url, storage_options, "weights directory")
    path = path.rstrip("/")
    try:
        config = json.loads(fs.cat_file(f"{path}/{CONFIG_FILE}"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{url}/{CONFIG_FILE} is not readable ({exc}): {WRITTEN_BY}") from None
    if config.get("format") != WEIGHTS_FORMAT:
        raise UserError(f"{url}/{CONFIG_FILE} is not a {WEIGHTS_FORMAT} config: {WRITTEN_BY}")
    tensors = {name: t.float() if t.is_floating_point() else t for name, t in read_safetensors(fs, path, url).items()}
    for alias, name in config["tied"].items():
        tensors[alias] = tensors[name]
    try:
        model = ModelConfig(**config["model"])
    except TypeError as exc:
        raise UserError(f"{url}/{CONFIG_FILE}: its model config does not fit this version ({exc})") from None
    return Weights(model, tensors, config.get("provenance", {}))


def read_safetensors(fs, path: str, url: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors files in directory `path` of `fs` (at `url`, for messages):
    model.safetensors, or the shards its index names (Hugging Face's layout, which we write too)."""
    files = [SINGLE_FILE]
    if fs.isfile(f"{path}/{INDEX_FILE}"):
        files = sorted(set(json.loads(fs.cat_file(f"{path}/{INDEX_FILE}"))["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors |= load_safetensors_bytes(fs.cat_file(f"{path}/{file}"))
        except (OSError, SafetensorError) as exc:
            raise UserError(f"{url}/{file} is not a readable safetensors file ({exc})") from None
    return tensors


def check_fits(weights: Weights, source: str) -> None:
    """Refuse weights that the model their config builds would not load (strict: every name, every shape)."""
    expected = {name: p.shape for name, p in skeleton(weights.model).state_dict().items()}
    name = weights.model.name
    missing = sorted(set(expected) - set(weights.tensors))
    unexpected = sorted(set(weights.tensors) - set(expected))
    wrong = [n for n in expected if n in weights.tensors and weights.tensors[n].shape != expected[n]]
    if missing or unexpected or wrong:
        what = (
            f"lacks {missing[0]}"
            if missing
            else f"has {unexpected[0]}, which the model has not"
            if unexpected
            else f"has {wrong[0]} of shape {tuple(weights.tensors[wrong[0]].shape)}, not {tuple(expected[wrong[0]])}"
        )
        raise UserError(f"{source}: the weights do not fit the model.name={name} of its config: it {what}")


def initialise(model: nn.Module, config: ModelConfig, url: str, storage_options: dict) -> dict[str, Any]:
    """checkpoint.init_from: the weights directory at `url` into `model` (built from `config`),
    refusing weights of another model, by the first config field that differs; returns their provenance."""
    weights = load_weights(url, storage_options)
    differing = [
        f"model.{key}={value!r}"
        for key, value in asdict(weights.model).items()
        if key not in INIT_FREE_KEYS and getattr(config, key) != value
    ]
    if differing:
        raise UserError(
            f"checkpoint.init_from={url} holds a model built with {', '.join(differing)}: set "
            f"{'those' if len(differing) > 1 else 'it'} to start from its weights"
        )
    check_fits(weights, url)
    model.load_state_dict(weights.tensors)
    return weights.provenance


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
