"""tools/convert.py export-safetensors of real checkpoints: DeepSpeed ZeRO-2, ZeRO-3 and FSDP2,
each written by 2 ranks of a launched training, read from local disk and from S3 (moto), give the
same bytes, hold the weights the engine itself resumes, and agree across engines; the weight
average, older steps and damaged or empty stores are handled as documented."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import S3, TINY, check, launch, tool, weight_errors

from pretrain.checkpoint.store import MANIFEST_NAME
from pretrain.interop.weights import CONFIG_FILE, SINGLE_FILE, load_weights

pytestmark = pytest.mark.slow

CONVERT = tool("convert")
PREFIX = "convert-engines"
# label -> (launcher, engine overrides, where its run writes checkpoints, whether it keeps a weight average)
ENGINES = {
    "zero2": ("deepspeed", ["engine=deepspeed", "engine.zero_stage=2"], "local", False),
    "zero3": ("torchrun", ["engine=deepspeed", "engine.zero_stage=3"], "s3", True),
    "fsdp": ("torchrun", ["engine=fsdp"], "local", False),
}
STEPS = 3  # checkpoints at step 2 (interval) and step 3 (the last)
# Three fp32 steps of the same model on the same batches: the engines differ only in the order
# gradients are summed, which Adam turns into small moves of elements with near-zero gradients
# (helpers.weight_errors). Measured against ZeRO-2: ZeRO-3 5.9e-8 (5.5e-7 in the worst tensor),
# FSDP2 1.7e-6 (6.9e-5) relative in norm over the whole model; the bounds are test_engines.py's.
ACROSS_ENGINES, ACROSS_ENGINES_TENSOR = 1e-5, 1e-3


@dataclass(frozen=True)
class Store:
    """One run's checkpoint store, both on local disk and on S3."""

    overrides: list[str]
    local: str
    s3: str


def training(engine: list[str], corpus_cache: str) -> list[str]:
    """A tiny ToST LM, fp32, seed and data as configured by default: the same for every engine."""
    return [
        "+exp=tost_gpt2_smoke",
        *TINY,
        f"data.cache_dir={corpus_cache}",
        "data.num_workers=0",
        "engine.precision=fp32",
        *engine,
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "optim.decay_steps=8",
        f"train.max_steps={STEPS}",
        "train.eval_max_batches=1",
        "checkpoint.interval=2",
        "checkpoint.keep_last=5",
    ]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, s3: S3, corpus_cache) -> dict[str, Store]:
    """Each engine's 2-rank run; the zero3 run checkpoints to S3 directly, and every store is
    copied to the other side (up with fs.put, down with fs.get) so that each exists in both."""
    fs = s3fs(s3)
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for label, (launcher, engine, where, ema) in ENGINES.items():
        run_dir = root / label
        overrides = training(engine, corpus_cache) + (["train.ema_decay=0.9"] if ema else [])
        local, remote = str(run_dir / "checkpoints"), s3.url(f"{PREFIX}/{label}")
        if where == "s3":
            storage = [f"+checkpoint.storage_options.{k}={v}" for k, v in s3.storage_options.items()]
            check(launch(launcher, [*overrides, f"run_dir={run_dir}", f"checkpoint.url={remote}", *storage]))
            fs.invalidate_cache()
            fs.get(f"{s3.bucket}/{PREFIX}/{label}/", f"{local}/", recursive=True)
        else:
            check(launch(launcher, [*overrides, f"run_dir={run_dir}"]))
            fs.put(f"{local}/", f"{s3.bucket}/{PREFIX}/{label}/", recursive=True)
        fs.invalidate_cache()
        assert sorted(p.name for p in Path(local).iterdir()) == ["step_00000002", "step_00000003"], label
        for step in ("step_00000002", "step_00000003"):
            files = json.loads((Path(local) / step / MANIFEST_NAME).read_text())["files"]
            assert fs.find(f"{s3.bucket}/{PREFIX}/{label}/{step}") == sorted(
                f"{s3.bucket}/{PREFIX}/{label}/{step}/{f}" for f in [*files, MANIFEST_NAME]
            ), (label, step)
        out[label] = Store(overrides, local, remote)
    return out


@pytest.fixture(scope="module")
def exports(stores, s3: S3, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per engine, the newest step exported from the local store and from the S3 store into local
    directories, and from the local store to an s3:// output."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for label, store in stores.items():
        paths = {
            "local": str(root / f"{label}-from-local"),
            "s3": str(root / f"{label}-from-s3"),
            "to-s3": s3.url(f"{PREFIX}-out/{label}"),
        }
        assert convert(store.local, paths["local"]) == 0
        assert convert(store.s3, paths["s3"], *storage(s3)) == 0
        assert convert(store.local, paths["to-s3"], *storage(s3)) == 0
        out[label] = paths
    return out


def s3fs(s3: S3):
    import s3fs

    return s3fs.S3FileSystem(**s3.storage_options)


def storage(s3: S3) -> list[str]:
    return [f"--storage-option={k}={v}" for k, v in s3.storage_options.items()]


def convert(source: str, output: str, *flags: str) -> int:
    return CONVERT.main(["export-safetensors", str(source), str(output), *flags])


def one_error_line(err: str) -> str:
    """The error of a refused export: one line, the last (progress bars may come before it)."""
    assert "Traceback" not in err and err.count("error: ") == 1, err
    line = err.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert line.startswith("error: "), err
    return line


def read(directory: str) -> dict[str, bytes]:
    return {name: Path(directory, name).read_bytes() for name in sorted(os.listdir(directory))}


def provenance(directory: str) -> dict:
    return json.loads(Path(directory, CONFIG_FILE).read_text())["provenance"]


# --------------------------------------------------------------------------- the same bytes


@pytest.mark.parametrize("label", list(ENGINES))
def test_local_and_s3_stores_and_outputs_give_the_same_bytes(label, stores, exports, s3):
    """From a local store or its S3 copy, into a local directory or an s3:// one: the same
    model.safetensors byte for byte, and the same config.json but for the provenance's `source`,
    which names the step each export read."""
    store, paths = stores[label], exports[label]
    from_local, from_s3 = read(paths["local"]), read(paths["s3"])
    assert sorted(from_local) == [CONFIG_FILE, SINGLE_FILE]
    assert from_local[SINGLE_FILE] == from_s3[SINGLE_FILE]
    config_local, config_s3 = (json.loads(files[CONFIG_FILE]) for files in (from_local, from_s3))
    assert config_local["provenance"].pop("source") == f"{store.local}/step_00000003"
    assert config_s3["provenance"].pop("source") == f"{store.s3}/step_00000003"
    assert config_local == config_s3
    assert config_local["provenance"] == config_s3["provenance"] | {"step": 3, "weights": "live"}
    assert config_local["dtype"] == "fp32" and config_local["tied"] == {"lm_head.weight": "wte.weight"}

    fs = s3fs(s3)
    fs.invalidate_cache()
    remote = paths["to-s3"].removeprefix("s3://")
    uploaded = {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.find(remote)}
    assert uploaded == from_local  # config.json too: the same source
    back = load_weights(paths["to-s3"], s3.storage_options)  # and it reads back as a weights directory
    assert back.provenance["source"] == f"{store.local}/step_00000003"


# --------------------------------------------------------------------------- the weights the engine trained


def resumed_by_each_engine(dist_info, runs: dict[str, tuple[list[str], str, str]], probe: torch.Tensor) -> dict:
    """In a 2-rank world, as the runs were written: each engine, built from another seed, loads
    the step its run wrote through its own resume path; rank 0 returns its whole weights and
    logits on `probe`, and the logits of a fresh model holding the export's weights."""
    from pretrain.config import load_config
    from pretrain.engines import build_engine
    from pretrain.models import build_model
    from pretrain.trainer import seed_everything

    out = {}
    for label, (overrides, step_dir, exported) in runs.items():
        cfg = load_config(overrides)
        seed_everything(cfg.train.seed + 1)
        engine = build_engine(build_model(cfg.model), cfg, dist_info)
        engine.load(step_dir, 2)
        weights = engine.full_state_dict()
        logits = engine.predict({"input_ids": probe}).cpu()
        fresh = build_model(cfg.model).eval()
        fresh.load_state_dict(load_weights(exported, {}).tensors)
        with torch.no_grad():
            out[label] = (weights, logits, fresh(probe))
    return out if dist_info.rank == 0 else None


def test_exports_hold_the_weights_each_engine_resumes_and_the_engines_agree(stores, exports):
    """The export equals, exactly, what DeepSpeed ZeRO-2/3 or FSDP2 load back from their own
    checkpoint (their whole weights, gathered), and a fresh model holding it computes the same
    logits as the engine; the three engines trained the same model on the same data, so their
    exports agree to fp32 rounding of differently ordered sums."""
    from pretrain.launch import run_local_world

    probe = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {
        label: (store.overrides, f"{store.local}/step_00000003", exports[label]["local"])
        for label, store in stores.items()
    }
    resumed = run_local_world(resumed_by_each_engine, 2, runs, probe)[0]
    exported = {label: load_weights(paths["local"], {}).tensors for label, paths in exports.items()}
    for label, (weights, logits, fresh_logits) in resumed.items():
        assert weights.keys() == exported[label].keys(), label
        unequal = [name for name, t in weights.items() if not torch.equal(t.float(), exported[label][name])]
        assert not unequal, (label, unequal)
        assert torch.equal(logits, fresh_logits), (label, (logits - fresh_logits).abs().max().item())

    for label in ("zero3", "fsdp"):
        total, per_tensor = weight_errors(exported[label], exported["zero2"])
        print(f"{label} vs zero2: {total:.2e} in norm, worst tensor {max(per_tensor.values()):.2e}")
        assert total < ACROSS_ENGINES and max(per_tensor.values()) < ACROSS_ENGINES_TENSOR, (label, total, per_tensor)
    # One step moves the weights far more than the engines disagree: agreement means something.
    assert weight_errors(exported["zero2"], load_weights_at_step(stores["zero2"].local, 2))[0] > 100 * ACROSS_ENGINES


def load_weights_at_step(store: str, step: int) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint.export import open_step

    with open_step(store, {}, step) as ckpt:
        return ckpt.weights()


# --------------------------------------------------------------------------- --ema and --step


def test_ema_exports_the_weight_average_from_either_store(stores, exports, s3, tmp_path):
    """--ema: ema.pt's weights (the tied head restored), which differ from the live ones."""
    store = stores["zero3"]
    assert convert(store.local, tmp_path / "local", "--ema") == 0
    assert convert(store.s3, tmp_path / "s3", "--ema", *storage(s3)) == 0
    assert read(str(tmp_path / "local"))[SINGLE_FILE] == read(str(tmp_path / "s3"))[SINGLE_FILE]
    average = torch.load(f"{store.local}/step_00000003/ema.pt", weights_only=True)
    exported = load_weights(str(tmp_path / "local"), {})
    assert exported.provenance["weights"] == "ema"
    assert set(exported.tensors) == set(average) | {"lm_head.weight"}
    assert all(torch.equal(exported.tensors[name], t.float()) for name, t in average.items())
    assert exported.tensors["lm_head.weight"] is exported.tensors["wte.weight"]
    live = load_weights(exports["zero3"]["local"], {}).tensors
    assert weight_errors(exported.tensors, live)[0] > 1e-3


def test_ema_of_a_run_without_an_average_is_one_line(stores, tmp_path, capsys):
    assert convert(stores["fsdp"].local, tmp_path / "out", "--ema") == 2
    assert "holds no ema.pt: the run kept no weight average" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", list(ENGINES))
def test_an_older_step_exports_and_a_step_never_committed_is_one_line(label, stores, exports, s3, tmp_path, capsys):
    store = stores[label]
    assert convert(store.s3, tmp_path / "step2", "--step", "2", *storage(s3)) == 0
    older = load_weights(str(tmp_path / "step2"), {})
    assert older.provenance["step"] == 2 and older.provenance["source"] == f"{store.s3}/step_00000002"
    assert all(torch.equal(older.tensors[k], v) for k, v in load_weights_at_step(store.local, 2).items())
    assert weight_errors(older.tensors, load_weights(exports[label]["local"], {}).tensors)[0] > 1e-4
    capsys.readouterr()

    assert convert(store.local, tmp_path / "step9", "--step", "9") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: --step 9 is not a committed checkpoint of {store.local} (committed: [2, 3])"
    assert not (tmp_path / "step9").exists()


# --------------------------------------------------------------------------- damaged and empty stores


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize(
    "label, file",
    [("zero3", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), ("fsdp", "dcp/__1_0.distcp")],
    ids=["zero3", "fsdp"],
)
def test_a_damaged_file_is_named_and_nothing_is_written(label, file, where, stores, s3, tmp_path, capsys):
    """A flipped byte in one file of the committed step: one line naming that file, exit code 2,
    nothing at OUTPUT (a local path or an s3:// one)."""
    damaged = tmp_path / "checkpoints"
    shutil.copytree(stores[label].local, damaged)
    path = damaged / "step_00000003" / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fs = s3fs(s3)
    if where == "s3":
        source, output = s3.url(f"damaged/{label}/{tmp_path.name}"), s3.url(f"damaged-out/{label}/{tmp_path.name}")
        fs.put(f"{damaged}/", f"{source.removeprefix('s3://')}/", recursive=True)
        flags = storage(s3)
    else:
        source, output, flags = str(damaged), str(tmp_path / "out"), []

    capsys.readouterr()
    assert convert(source, output, "--step", "3", *flags) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"error: {source}/step_00000003/{file} does not match its sha256 in the manifest; pick another --step"
    )
    fs.invalidate_cache()
    assert not fs.exists(output.removeprefix("s3://")) if where == "s3" else not os.path.exists(output)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # no staging left beside the output
    assert convert(source, output, "--step", "2", *flags) == 0  # the step before is intact


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_store_without_a_committed_step_is_one_line(where, stores, s3, tmp_path, capsys):
    """A store whose only step never committed (its files, no manifest): one line, exit code 2."""
    uncommitted = tmp_path / "checkpoints"
    shutil.copytree(f"{stores['zero2'].local}/step_00000003", uncommitted / "step_00000003")
    (uncommitted / "step_00000003" / MANIFEST_NAME).unlink()
    if where == "s3":
        source = s3.url(f"uncommitted/{tmp_path.name}")
        s3fs(s3).put(f"{uncommitted}/", f"{source.removeprefix('s3://')}/", recursive=True)
        flags = storage(s3)
    else:
        source, flags = str(uncommitted), []
    assert convert(source, tmp_path / "out", *flags) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {source} holds no committed checkpoint (no step_XXXXXXXX/ with a MANIFEST.json)"
    assert not (tmp_path / "out").exists()
