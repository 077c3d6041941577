"""What tests share besides fixtures: launching the real entry point as users do, reading back
what a run recorded, the handle of the local S3 server (conftest.py starts it), tiny tokenizers."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import Config, load_config, override_key
from pretrain.distributed import CPU_ONLY_ENV, DistInfo, free_port, mean_over_ranks, too_few_gpus
from pretrain.engines import Engine, build_engine
from pretrain.models import build_model
from pretrain.trainer import seed_everything

REPO = Path(__file__).resolve().parent.parent
MAIN = str(REPO / "pretrain" / "main.py")

# A model and batch small enough for a launcher run of a few steps to take seconds on 2 cores.
TINY = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=64",
    "model.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.log_interval=1",
    "data.stdlib_max_mb=0.25",
    "data.samples_per_shard=128",
]


def last_wins(overrides: list[str]) -> list[str]:
    """A test's base overrides with its variations: the last value of a key replaces earlier ones
    in place (the entry point refuses a key given twice)."""
    latest = {override_key(o): o for o in overrides}
    return [o for o in overrides if latest[override_key(o)] is o]


def launch_command(
    launcher: str, overrides: list[str], keep_repeats: bool = False, procs: int = 2
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run pretrain/main.py under `deepspeed`, `torchrun`
    (`procs` processes each, 2 by default), the cluster templates' per-node launcher (`node`, 2) or
    plain `python`. A key given twice keeps its last value unless `keep_repeats`."""
    extra_env: dict[str, str] = {}
    if launcher == "deepspeed":
        cmd = [shutil.which("deepspeed"), "--num_gpus", str(procs), "--master_port", str(free_port()), MAIN]
    elif launcher == "node":  # the cluster templates' per-node launcher, as one node of two ranks
        cmd = [str(REPO / "cluster" / "launch_node.sh")]
        extra_env = {
            "NNODES": "1",
            "NODE_RANK": "0",
            "PROCS_PER_NODE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    elif launcher == "torchrun":
        # The multi-node form (rendezvous), with one node: what a cluster launch runs on each node.
        cmd = [
            shutil.which("torchrun"),
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(procs),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{free_port()}",
            MAIN,
        ]
    else:
        cmd = [sys.executable, MAIN]
    # PYTHONPATH: the processes import this checkout, whatever tree an editable install points at.
    # More ranks than GPUs (the CPU suite's 2 ranks on a one-GPU machine): every rank on CPU with
    # gloo, CUDA hidden, rather than rank 1 asking for a second GPU (conftest's header says so).
    on_cpu = CPU_ONLY_ENV if too_few_gpus(procs) else {}
    env = {
        **os.environ,
        **extra_env,
        **on_cpu,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return cmd + (overrides if keep_repeats else last_wins(overrides)), env


def launch(
    launcher: str,
    overrides: list[str],
    timeout: float = 300,
    env: dict[str, str] | None = None,
    keep_repeats: bool = False,
    procs: int = 2,
) -> subprocess.CompletedProcess:
    cmd, launch_env = launch_command(launcher, overrides, keep_repeats, procs)
    env = {**launch_env, **(env or {})}
    # A session of its own: a fault-injected crash kills the run's whole process group, not pytest.
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def launch_watching(
    launcher: str,
    overrides: list[str],
    on_line: Callable[[str, subprocess.Popen], None],
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> tuple[int, str]:
    """Run like `launch`, calling `on_line` with each line of output (stdout and stderr) as it
    comes and the launcher's process, to act on the run while it goes; returns (exit code, output)."""
    cmd, launch_env = launch_command(launcher, overrides)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**launch_env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            on_line(line, proc)
        return proc.wait(timeout=timeout), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def launch_and_signal(
    launcher: str,
    overrides: list[str],
    when: str,
    sig: int,
    to: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> tuple[int, str]:
    """Run like `launch`, and once a stdout line contains `when`, send `sig` `to` "every"
    process (launcher, ranks, loader workers: as Slurm does) or only the "launcher" (as
    Kubernetes signals PID 1); returns (exit code, stdout)."""
    import psutil

    signalled = []

    def on_line(line: str, proc: subprocess.Popen) -> None:
        if when in line and not signalled:
            launched = psutil.Process(proc.pid)
            for process in [launched, *(launched.children(recursive=True) if to == "every" else [])]:
                process.send_signal(sig)
            signalled.append(sig)

    return launch_watching(launcher, overrides, on_line, env, timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def mlflow_run(run_dir: Path, uri: str | None = None, experiment: str = "whitebox-pretrain"):
    """The one MLflow run a training run recorded in `experiment` (default: the sqlite database in
    its run_dir)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def metric_history(
    run_dir: Path, key: str = "loss", uri: str | None = None, experiment: str = "whitebox-pretrain"
) -> dict[int, float]:
    """step -> logged value of metric `key`, read back from MLflow."""
    client, run = mlflow_run(run_dir, uri, experiment)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store, which a test can stop and
    start again (same port, same store) to play an outage."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, within_s: float = 60) -> None:
        command = [shutil.which("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db"]
        command += ["--default-artifact-root", f"file://{self.root}/artifacts"]
        self.process = subprocess.Popen(
            command, cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + within_s
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start within {within_s} s") from None
                time.sleep(0.25)

    def stop(self) -> None:
        """As an outage would: the server and the workers it started (its process group) are gone at once."""
        if self.process:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@dataclass(frozen=True)
class S3:
    """A bucket on moto's S3 server, reached through s3fs like any object store."""

    endpoint: str
    bucket: str
    storage_options: dict

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"


# --------------------------------------------------------------------------- engines on fixed batches
# Engines driven directly through the Engine interface on fixed token batches (the data pipeline
# is tested elsewhere), in this process or in local worlds of processes.

SEQ_LEN, ALPHABET = 16, 16
TINY_MODEL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", f"model.seq_len={SEQ_LEN}"]


def config(
    model: str, engine: list[str], global_batch: int = 8, micro: int = 2, lr: float = 3e-3, precision: str = "fp32"
) -> Config:
    """`model`'s smoke recipe at the tiny size of these batches, on the engine `engine` chooses."""
    return load_config(
        [
            f"+exp={model}_smoke",
            *TINY_MODEL,
            *engine,
            f"engine.precision={precision}",
            f"train.global_batch_size={global_batch}",
            f"train.micro_batch_size={micro}",
            f"optim.lr={lr}",
            "optim.warmup_steps=2",
            "optim.decay_steps=10",
        ]
    )


def global_batches(steps: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Fixed token blocks (size, SEQ_LEN + 1) for each step, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    # A small alphabet gives the model something to learn within a few steps.
    return [torch.randint(0, ALPHABET, (size, SEQ_LEN + 1), generator=g) for _ in range(steps)]


def rank_micro_batches(block: torch.Tensor, rank: int, world: int, micro: int) -> list[dict]:
    """This rank's share of a global batch, cut into micro-batches (rank-major, like a sampler)."""
    mine = block.chunk(world)[rank]
    return [{"input_ids": m[:, :-1], "labels": m[:, 1:]} for m in mine.split(micro)]


def train(
    dist_info: DistInfo, cfg: Config, blocks: list[torch.Tensor], seed: int | None = None
) -> tuple[Engine, list[float]]:
    """An engine built from a seeded model, and its losses after a step on each of `blocks`."""
    seed_everything(cfg.train.seed if seed is None else seed)
    engine = build_engine(build_model(cfg.model), cfg, dist_info)
    return engine, [step(engine, block, dist_info, cfg) for block in blocks]


def step(engine: Engine, block: torch.Tensor, dist_info: DistInfo, cfg: Config) -> float:
    """One optimizer step on this rank's share of `block`; the loss, mean over ranks."""
    micro = rank_micro_batches(block, dist_info.rank, dist_info.world_size, cfg.train.micro_batch_size)
    return mean_over_ranks(engine.train_step(micro).loss)


def weight_errors(weights: dict, ref: dict) -> tuple[float, dict[str, float]]:
    """Relative error of the whole model and of each tensor, in norm.

    Summing gradients in another order (all-reduce vs one process) is fp32 rounding; Adam,
    dividing by sqrt(v), turns it into ~1e-5 moves of elements whose gradient is near zero (the
    key bias has an exactly-zero one: softmax ignores a shift of every key). The model as a whole
    agrees to 1e-5; a real engine bug (a wrong averaging factor, a missed clip) is ~1e-1.
    """
    diff = {k: weights[k].double() - v.double() for k, v in ref.items()}
    total = (
        sum(d.square().sum() for d in diff.values()).sqrt()
        / sum(v.double().square().sum() for v in ref.values()).sqrt()
    )
    return total.item(), {k: (d.norm() / ref[k].double().norm()).item() for k, d in diff.items()}


def tool(name: str):
    """tools/<name>.py as a module, so that a test calls its main(argv) in this process (a
    subprocess would spend seconds importing torch again)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_torchvision_importable() -> None:
    """Let timm and transformers import torchvision on this CPU-only test machine.

    PyPI's torchvision is a CUDA build: beside the CPU torch its compiled operators do not load,
    and `import torchvision` then fails registering fake kernels for two of them ("operator
    torchvision::nms does not exist"). The exports' consumers never call those operators (timm
    imports torchvision for FrozenBatchNorm2d; transformers when it is installed), so declaring
    their schemas, without any kernel, is enough. Where torchvision imports, nothing is done.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        schemas = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(schemas)  # a Library's definitions last as long as the object
        import torchvision  # noqa: F401


_TORCHVISION_SCHEMAS: list = []


# What a conversion test's weights directory says of where its weights come from.
PROVENANCE = {"source": "test", "step": 7, "tokens_seen": 896, "config_hash": "abc", "mlflow_run_id": None}


def random_model(cfg, seed: int = 0) -> torch.nn.Module:
    """`cfg`'s model with every parameter moved off its init (norms off 1, biases off 0, LayerScale,
    class token and positions too), so that a swapped or dropped tensor in a conversion shows."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def weights_dir(model: torch.nn.Module, cfg, path: Path, provenance: dict = PROVENANCE) -> str:
    """`model`'s weights as the weights directory tools/convert.py reads as a SOURCE."""
    from pretrain.interop.weights import Weights, save_weights

    path.mkdir()
    save_weights(Weights(cfg, model.state_dict(), provenance), str(path))
    return str(path)


# --------------------------------------------------------------------------- tokenizers
# Tiny ones, trained in the test's directory in milliseconds: nothing is downloaded.

TOKENIZER_WORDS = "the quick brown fox jumps over lazy dog cat bird sings data shard token model block".split()
# Specials in the order the tokenizer.json rule and SentencePiece's defaults give them ids.
HF_SPECIALS = ("<pad>", "<s>", "</s>")


def training_text(n: int = 200, seed: int = 0) -> list[str]:
    """`n` lines of words and numbers to train a tokenizer on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(TOKENIZER_WORDS) for _ in range(20)) + f" {i}." for i in range(n)]


def train_bpe(directory: Path, vocab_size: int = 300, specials: tuple[str, ...] = HF_SPECIALS, seed: int = 0) -> Path:
    """A byte-level BPE saved as `directory`/tokenizer.json (lossless: any text round-trips);
    another `seed` trains on other text, so other merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(seed=seed), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model at `path` (unk 0, BOS 1, EOS 2), lossless: bytes fall back, text
    is not normalized, spaces are kept."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
