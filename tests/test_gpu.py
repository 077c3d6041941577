"""The GPU smoke suite, `python -m pytest -m gpu`: on one CUDA GPU, with NCCL, in bf16, the real
entry point under its launchers (`deepspeed --num_gpus 1`, `torchrun --nproc_per_node 1`, plain
`python`) trains every engine, resumes exactly, offloads and compiles; the Triton TSSA kernels
match eager; each vision family learns; tools/generate.py samples on the GPU; the memory and MFU a
run reports are plausible. Where torch finds no CUDA those tests are skipped, saying so (conftest.py);
the last test, which checks the runs' configs, runs everywhere.

The training runs are started together by two module fixtures (`runs`, then `resumed`, which
needs their checkpoints), several at a time: the models are tiny, so most of a launch is starting
Python, CUDA and NCCL, and the GPU has room for all of them. Any test of the module therefore
starts every run once. On one H100 the module should take about 3 to 5 minutes (an estimate from
the CPU suite's launch times and these step counts, not yet measured on a GPU).
"""

from __future__ import annotations

import math
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import check, launch, metric_history, tool

from pretrain.config import load_config
from pretrain.engines import VARIANTS, check_engine_config


def launches(test):
    """A test of the GPU suite that launches the entry point (conftest.py skips it without CUDA)."""
    for mark in (pytest.mark.gpu, pytest.mark.slow, pytest.mark.e2e):
        test = mark(test)
    return test


LM = {"tost": "tost_gpt2_smoke", "gpt2": "gpt2_smoke"}
ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
STEPS, SAVE_AT, OFFLOAD_STEPS = 30, 15, 10
PARALLEL = 8  # launches at a time: 16 CPU cores, each run a rank and a loader worker
LAUNCH_TIMEOUT_S = 600
# cuBLAS picks the same kernels and reduction order in every process only with a fixed workspace
# (PyTorch's reproducibility notes); the exact-resume test compares two processes' steps bit for bit.
ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@dataclass(frozen=True)
class Run:
    launcher: str
    overrides: tuple[str, ...]


def lm_run(model: str, engine: str, *extra: str, steps: int = STEPS) -> Run:
    """`model`'s smoke recipe on `engine` in bf16 for `steps` steps, every step logged, checkpoints
    at SAVE_AT and the end; the schedule is the same whatever `steps`, so runs of 10 and 30 steps
    take the same first 10. DeepSpeed's engines under its launcher, the others under torchrun."""
    launcher = "deepspeed" if engine.startswith("zero") else "torchrun"
    return Run(
        launcher,
        (
            f"+exp={LM[model]}",
            *VARIANTS[engine],
            "engine.precision=bf16",
            f"train.max_steps={steps}",
            "train.log_interval=1",
            f"checkpoint.interval={SAVE_AT}",
            "optim.warmup_steps=5",
            f"optim.decay_steps={STEPS}",
            "data.stdlib_max_mb=0.25",  # ~500 blocks of 129 tokens: more than 30 steps read, tokenized in a second
            "data.samples_per_shard=128",
            *extra,
        ),
    )


# The longest first (compiling, 300 vision steps), so that the short ones fill in beside them.
RUNS = {
    "tost-zero2-compile": lm_run("tost", "zero2", "engine.compile=true"),
    "gpt2-fsdp-compile": lm_run("gpt2", "fsdp", "engine.compile=true"),
    # Each family's smoke recipe as the CPU suite runs it (test_e2e.py), in bf16.
    "crate": Run("deepspeed", ("+exp=crate_base_smoke", "engine.precision=bf16")),
    "tost_vision": Run("torchrun", ("+exp=tost_vision_small_smoke", "engine=fsdp", "engine.precision=bf16")),
    "vit": Run("python", ("+exp=vit_base_smoke", "engine.precision=bf16")),
    "tost-zero2-offload_optimizer": lm_run("tost", "zero2", "engine.offload_optimizer=true", steps=OFFLOAD_STEPS),
    "tost-zero3-offload_params": lm_run("tost", "zero3", "engine.offload_params=true", steps=OFFLOAD_STEPS),
    "tost-fsdp-offload_params": lm_run("tost", "fsdp", "engine.offload_params=true", steps=OFFLOAD_STEPS),
    **{f"{model}-{engine}": lm_run(model, engine) for model in LM for engine in ENGINES},
}
ENGINE_RUNS = [f"{model}-{engine}" for model in LM for engine in ENGINES]


def launch_all(runs: dict[str, Run], root: Path, corpus_cache: str, *extra: str) -> dict[str, tuple]:
    """name -> (finished process, run_dir) of each run, PARALLEL at a time, one process each."""

    def start(name: str, run: Run) -> subprocess.CompletedProcess:
        overrides = [*run.overrides, f"run_dir={root / name}", f"data.cache_dir={corpus_cache}", *extra]
        return launch(run.launcher, overrides, timeout=LAUNCH_TIMEOUT_S, env=ENV, procs=1)

    with ThreadPoolExecutor(PARALLEL) as pool:
        started = {name: pool.submit(start, name, run) for name, run in runs.items()}
        return {name: (future.result(), root / name) for name, future in started.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_cache) -> dict[str, tuple]:
    return launch_all(RUNS, tmp_path_factory.mktemp("gpu-runs"), corpus_cache)


@pytest.fixture(scope="module")
def resumed(runs, corpus_cache) -> dict[str, tuple]:
    """Each ToST engine run started again in its own run_dir from its step-SAVE_AT checkpoint: it
    takes steps SAVE_AT+1..STEPS again, which MLflow records as replay/loss beside the first loss."""
    again = {f"tost-{engine}": RUNS[f"tost-{engine}"] for engine in ENGINES}
    root = runs["tost-zero2"][1].parent
    return launch_all(again, root, corpus_cache, f"checkpoint.resume={SAVE_AT}")


def losses(runs: dict[str, tuple], name: str, key: str = "loss") -> dict[int, float]:
    proc, run_dir = runs[name]
    check(proc)
    return metric_history(run_dir, key)


@launches
@pytest.mark.parametrize("name", ENGINE_RUNS)
def test_every_engine_trains_both_language_models_for_30_steps_and_the_loss_falls(runs, name):
    """From ln(50304) = 10.8 (uniform over the vocabulary), 30 steps take a model that learns to
    below 9.8 on average over its last 5; one that does not learn stays near 10.8."""
    history = losses(runs, name)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in history.values()), history
    assert sum(history[s] for s in range(STEPS - 4, STEPS + 1)) / 5 < history[1] - 1.0, history


@launches
@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_resumed_on_the_gpu_takes_exactly_the_steps_of_the_unbroken_run(runs, resumed, engine):
    """Bit for bit: ToST has no atomics on the GPU (its Triton kernels reduce in a fixed order, and
    with one rank every collective is a copy), so the same checkpoint and data give the same steps.
    GPT-2 is not compared: flash attention's backward accumulates with atomics, and two processes
    differ in the last bits whatever the checkpoint holds."""
    name = f"tost-{engine}"
    unbroken = losses(runs, name)
    proc, _ = resumed[name]
    assert f"(step {SAVE_AT})" in check(proc).stdout
    replayed = losses(resumed, name, "replay/loss")
    assert sorted(replayed) == list(range(SAVE_AT + 1, STEPS + 1))
    assert [replayed[s] for s in replayed] == [unbroken[s] for s in replayed]


@launches
@pytest.mark.parametrize(
    "offloaded, on_gpu",
    [
        ("tost-zero2-offload_optimizer", "tost-zero2"),
        ("tost-zero3-offload_params", "tost-zero3"),
        ("tost-fsdp-offload_params", "tost-fsdp"),
    ],
)
def test_offloaded_engines_train_10_steps_like_the_same_engine_on_the_gpu(runs, offloaded, on_gpu):
    """ZeRO-Offload (DeepSpeed's CPU Adam), ZeRO-3 parameter offload and FSDP2's CPUOffloadPolicy:
    10 steps whose losses follow the GPU-resident run's first 10 within 2% (the same fp32 update
    computed on the CPU; a lost or doubled update shows as tenths of a nat)."""
    history, reference = losses(runs, offloaded), losses(runs, on_gpu)
    assert sorted(history) == list(range(1, OFFLOAD_STEPS + 1))
    assert history[OFFLOAD_STEPS] < history[1] - 0.5, history
    for step, loss in history.items():
        assert loss == pytest.approx(reference[step], rel=0.02), (step, history, reference)


@launches
@pytest.mark.parametrize("compiled, eager", [("tost-zero2-compile", "tost-zero2"), ("gpt2-fsdp-compile", "gpt2-fsdp")])
def test_compiled_blocks_train_like_eager_within_2_percent(runs, compiled, eager):
    """engine.compile=true (ToST's Triton op traced through its fake implementation, under ZeRO-2;
    GPT-2 under FSDP2): every step's loss within 2% of eager's. Fused bf16 kernels round elsewhere,
    which moves a loss by ~0.1% over 30 steps; a wrong gradient moves it by far more."""
    history, reference = losses(runs, compiled), losses(runs, eager)
    assert sorted(history) == sorted(reference)
    for step, loss in history.items():
        assert loss == pytest.approx(reference[step], rel=0.02), (step, history, reference)


@launches
@pytest.mark.parametrize("name", ["crate", "tost_vision", "vit"])
def test_each_vision_family_learns_its_smoke_digits_in_bf16(runs, name):
    """The CPU suite's thresholds: the loss falls, and the held-out top-1 is far above chance (0.1)."""
    history = losses(runs, name)
    assert history[300] < history[25], history
    assert metric_history(runs[name][1], "eval_top1")[300] > 0.4


@launches
def test_reported_memory_is_the_gpus_and_below_its_total(runs):
    """memory_gib is torch.cuda.max_memory_allocated on a GPU: above the model's own weights (the
    smoke models' 4 x 128 with a 50304-token table: ~29 MB in fp32) and below the device's memory."""
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    for name in ENGINE_RUNS:
        memory = losses(runs, name, "memory_gib")[STEPS]
        assert 0.02 < memory < total_gib, (name, memory, total_gib)


@launches
def test_reported_mfu_is_a_fraction_of_the_devices_peak(runs):
    """MFU is logged where the device's bf16 peak is known (or train.peak_tflops gives it); it is
    then above 0 and below 1."""
    by_run = {name: losses(runs, name, "mfu") for name in ENGINE_RUNS}
    if not any(by_run.values()):
        pytest.skip(f"no MFU logged: no known bf16 peak for {torch.cuda.get_device_name(0)} (set train.peak_tflops)")
    for name, history in by_run.items():
        assert sorted(history) == list(range(1, STEPS + 1)), name
        assert 0 < history[STEPS] < 1, (name, history[STEPS])


@launches
def test_generate_samples_on_the_gpu(runs, capsys):
    """tools/generate.py --device cuda on the ZeRO-2 run's newest checkpoint: the model's memory is
    on the GPU, and the printed text is the prompt and its continuation."""
    proc, run_dir = runs["tost-zero2"]
    check(proc)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    prompt = ["--prompt", "def main(", "--max-new-tokens", "24", "--temperature", "0.8", "--top-k", "50"]
    assert tool("generate").main([str(run_dir / "checkpoints"), "--device", "cuda", *prompt, "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def main(") and len(text) > len("def main(\n"), text
    assert torch.cuda.max_memory_allocated() - before > 20e6  # the weights (~29 MB in fp32) were on the GPU


@pytest.mark.gpu
def test_triton_tssa_matches_eager_in_bf16() -> None:
    """A ToST LM under bf16 autocast with model.tssa_impl=triton and =eager, against the same model
    in fp32: logits within 1e-2 of eager's (in norm, relative); the whole gradient within 2e-2;
    each parameter's gradient no further from fp32's than twice eager's error, or 2e-2. bf16 keeps 8
    significant bits (~4e-3 a rounding) and the two round at different places; a wrong formula
    is off by O(1)."""
    from pretrain.config import ModelConfig
    from pretrain.models import build_model

    ids = torch.randint(0, 1000, (4, 257), generator=torch.Generator().manual_seed(0)).cuda()

    def logits_and_grads(impl: str, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        cfg = ModelConfig(
            name="tost",
            n_layer=2,
            n_head=4,
            n_embd=128,
            vocab_size=1000,
            seq_len=256,
            layerscale_init=1.0,
            tssa_impl=impl,
        )
        model = build_model(cfg).cuda()
        with torch.no_grad():  # TSSA's temperature and position prior off their inits (1, 0)
            for block in model.blocks:
                block.attn.temp.uniform_(0.5, 2.0)
                block.attn.denom_bias.normal_(0, 0.5)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return logits.float(), [p.grad.float() for p in model.parameters()]

    def error(x: torch.Tensor, ref: torch.Tensor) -> float:
        return ((x - ref).norm() / ref.norm()).item()

    reference = logits_and_grads("eager", bf16=False)
    eager, triton = logits_and_grads("eager", bf16=True), logits_and_grads("triton", bf16=True)
    assert error(triton[0], eager[0]) < 1e-2
    assert error(torch.cat([g.flatten() for g in triton[1]]), torch.cat([g.flatten() for g in eager[1]])) < 2e-2
    for got, want, ref in zip(triton[1], eager[1], reference[1], strict=True):
        assert error(got, ref) <= max(2 * error(want, ref), 2e-2)


@launches
@pytest.mark.parametrize(("launcher", "engine"), [("deepspeed", "zero3"), ("torchrun", "fsdp")])
def test_two_ranks_on_two_gpus_shard_and_train(launcher, engine, tmp_path, corpus_cache):
    """2 NCCL ranks, one GPU each, parameters sharded across them: the loss falls. Skipped below 2
    GPUs, where the second rank's torch.cuda.set_device(1) would fail."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"needs 2 GPUs for 2 NCCL ranks; torch sees {gpus} (rank 1 would call torch.cuda.set_device(1))")
    run = lm_run("tost", engine)
    overrides = [*run.overrides, f"run_dir={tmp_path}", f"data.cache_dir={corpus_cache}"]
    check(launch(launcher, overrides, timeout=LAUNCH_TIMEOUT_S, env=ENV, procs=2))
    history = metric_history(tmp_path)
    assert sum(history[s] for s in range(STEPS - 4, STEPS + 1)) / 5 < history[1] - 1.0, history


@pytest.mark.slow
def test_every_run_of_the_suite_is_a_config_the_entry_point_accepts():
    """Checked without a GPU too: the overrides name real keys and values, on one rank, and the
    resume's too (offload, which needs a GPU, is checked where there is one)."""
    for run in RUNS.values():
        cfg = load_config([*run.overrides, "run_dir=unused", f"checkpoint.resume={SAVE_AT}"])
        assert cfg.engine.precision == "bf16"
        if not (cfg.engine.offload_params or cfg.engine.offload_optimizer):
            check_engine_config(cfg, world_size=1)
