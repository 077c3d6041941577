"""tools/evaluate.py on checkpoints of real trainings: it reports the eval_* values training logged
at that step (read back from MLflow), for a language model written by 2 ZeRO-3 ranks and an image
model with batch norm and a weight average written by FSDP2; 2 ranks under torchrun report what one
process does; --mlflow-run adds its points to the training run; bad input is one line, exit 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, check, launch, metric_history, mlflow_run, tool

from pretrain.checkpoint.export import CommittedStep
from pretrain.config import load_config, redacted
from pretrain.errors import UserError

EVALUATE = tool("evaluate")
SCRIPT = str(REPO / "tools" / "evaluate.py")
# The evaluator runs the code that computed training's eval_* on the same weights and batches, in
# fp32 on CPU: equal but for the order of sums over ranks. Measured: bit-identical (0 difference)
# in one process and on 2 ranks, for every metric here. A wrong weight, buffer or batch moves the
# loss by 1e-3 or more (the batch-norm statistics of the image model alone: 2e-2).
REL = 1e-6
STEPS = 4  # checkpoints and evaluations at steps 2 and 4


def training(run_dir: Path, cache: str, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.cache_dir={cache}",
        "data.num_workers=0",
        "engine.precision=fp32",
        f"train.max_steps={STEPS}",
        "train.eval_interval=2",
        "checkpoint.interval=2",
        "train.log_interval=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A corpus cache of this module's own: its 16-sample shards give the stdlib validation split
    3 shards, which 2 ranks split (the session's cache may hold 128-sample shards: 1 shard)."""
    return str(tmp_path_factory.mktemp("evaluate-cache"))


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, cache) -> Path:
    """A tiny ToST LM trained by 2 DeepSpeed ZeRO-3 ranks (torchrun), without a weight average,
    evaluated on the whole held-out split (train.eval_max_batches=0), so that any number of ranks
    sees the same tokens."""
    run_dir = tmp_path_factory.mktemp("lm")
    lm = ["+exp=tost_gpt2_smoke", *TINY, "data.samples_per_shard=16", "engine.zero_stage=3"]
    optim = ["optim.lr=1e-2", "optim.warmup_steps=2", "optim.decay_steps=8", "train.eval_max_batches=0"]
    check(launch("torchrun", [*lm, *training(run_dir, cache, *optim)]))
    return run_dir


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, cache) -> Path:
    """A tiny ToST vision model (a convolutional stem with batch norm) trained by 2 FSDP2 ranks,
    with its smoke recipe's weight average (train.ema_decay=0.99), evaluated on 3 micro-batches
    of 8 digits per rank. The ranks' batch-norm statistics differ; evaluations use rank 0's, which
    the checkpoint holds."""
    run_dir = tmp_path_factory.mktemp("image")
    image = ["+exp=tost_vision_tiny_smoke", "engine=fsdp", "train.global_batch_size=16", "train.micro_batch_size=8"]
    check(launch("torchrun", [*image, *training(run_dir, cache, "train.eval_max_batches=3")]))
    return run_dir


def run_evaluate(launcher: str, *args: str) -> subprocess.CompletedProcess:
    """tools/evaluate.py as users run it: plain python, or torchrun with 2 processes (gloo)."""
    prefix = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2"] if launcher == "torchrun" else []
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [*(prefix or [sys.executable]), SCRIPT, *args]
    return check(subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300))


def report(launcher: str, *args: str) -> dict:
    """The JSON result; stdout holds nothing else."""
    return json.loads(run_evaluate(launcher, *args).stdout)


def logged(run_dir: Path, key: str, step: int) -> float:
    return metric_history(run_dir, key)[step]


def one_error_line(err: str) -> str:
    """A refusal: no traceback, one error line, the last on stderr (library chatter may come first)."""
    assert "Traceback" not in err and err.count("error: ") == 1, err
    line = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert line.startswith("error: "), err
    return line


@pytest.fixture(scope="module")
def lm_report(lm_run) -> dict:
    """The newest step of the LM run, evaluated in one process."""
    return report("python", str(lm_run / "checkpoints"))


@pytest.fixture(scope="module")
def image_report(image_run) -> dict:
    """The newest step of the image run with its weight average and the white-box measures, on 2
    ranks as it was trained (each rank's first batch gives the white-box measures)."""
    return report("torchrun", str(image_run / "checkpoints"), "--ema", "--whitebox")


def val_split(cache: str) -> tuple[str, dict]:
    """The embedded stdlib validation split's directory and index."""
    (directory,) = Path(cache).glob("stdlib-*-val-*")
    return str(directory), json.loads((directory / "index.json").read_text())


# --------------------------------------------------------------------------- equal to training's log


@pytest.mark.slow
def test_language_model_eval_loss_equals_the_one_training_logged_with_perplexity_and_tokens(lm_run, lm_report, cache):
    """Written by 2 ZeRO-3 ranks, evaluated by one: the loss training logged at step 4, its exp, and
    every token of the held-out split scored (each block: seq_len next-token labels)."""
    metrics = lm_report["metrics"]
    assert lm_report["step"] == STEPS and lm_report["checkpoint"] == str(lm_run / "checkpoints" / "step_00000004")
    assert lm_report["model"] == "tost" and lm_report["engine"] == "deepspeed" and lm_report["weights"] == ["live"]
    assert metrics["eval_loss"] == pytest.approx(logged(lm_run, "eval_loss", STEPS), rel=REL)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    _, index = val_split(cache)
    assert metrics["eval_tokens"] == index["total_blocks"] * (index["block_len"] - 1) > 0
    assert set(metrics) == {"eval_loss", "eval_perplexity", "eval_tokens"}  # no white-box measures unasked


@pytest.mark.slow
def test_image_model_loss_top1_top5_and_white_box_measures_equal_training_log(image_run, image_report):
    metrics = image_report["metrics"]
    assert image_report["model"] == "tost_vision" and image_report["engine"] == "fsdp"
    for key in ("eval_loss", "eval_top1", "eval_top5"):
        assert metrics[key] == pytest.approx(logged(image_run, key, STEPS), rel=REL), key
    assert 0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1
    whitebox = [k for k in metrics if "_layer" in k]
    assert "rc_in_layer00" in whitebox and "pi_entropy_layer01" in whitebox
    for key in whitebox:
        assert metrics[key] == pytest.approx(logged(image_run, key, STEPS), rel=REL), key


@pytest.mark.slow
def test_ema_evaluates_the_weight_average_as_training_did(image_run, image_report):
    """The average (and its batch-norm statistics) gives training's eval_ema_*, apart from the live weights'."""
    metrics = image_report["metrics"]
    assert image_report["weights"] == ["live", "ema"]
    for key in ("eval_ema_loss", "eval_ema_top1", "eval_ema_top5"):
        assert metrics[key] == pytest.approx(logged(image_run, key, STEPS), rel=REL), key
    assert metrics["eval_ema_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_two_ranks_under_torchrun_report_what_one_process_does_on_shards_from_data(lm_run, lm_report, cache, tmp_path):
    """ZeRO-3 partitions over 2 ranks, the validation shards given by --data as a brace pattern and
    split between the ranks, the JSON written by rank 0 alone into --output."""
    directory, index = val_split(cache)
    assert len(index["shards"]) >= 2  # each rank reads some
    shards = f"{directory}/shard-{{000000..{len(index['shards']) - 1:06d}}}.tar"
    output = tmp_path / "eval.json"
    proc = run_evaluate("torchrun", str(lm_run / "checkpoints"), "--data", shards, "--output", str(output))
    assert proc.stdout == ""
    two = json.loads(output.read_text())
    assert two["world_size"] == 2 and two["data"] == shards
    assert two["metrics"]["eval_loss"] == pytest.approx(lm_report["metrics"]["eval_loss"], rel=REL)
    assert two["metrics"]["eval_loss"] == pytest.approx(logged(lm_run, "eval_loss", STEPS), rel=REL)
    assert two["metrics"]["eval_tokens"] == lm_report["metrics"]["eval_tokens"]


@pytest.mark.slow
def test_mlflow_run_gets_the_metrics_at_the_checkpoints_step(lm_run):
    """Logged into the training run (its tracking store found from the checkpoint's config) at step
    2, under training's names: eval_loss gets a second, equal point there."""
    client, run = mlflow_run(lm_run)
    before = metric_history(lm_run, "eval_loss")
    result = report("python", str(lm_run / "checkpoints"), "--step", "2", "--mlflow-run", run.info.run_id)
    assert result["step"] == 2
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss")]
    assert sorted(step for step, _ in history) == [2, 2, 4]
    assert [v for s, v in history if s == 2] == pytest.approx([before[2]] * 2, rel=REL)
    perplexity = client.get_metric_history(run.info.run_id, "eval_perplexity")
    assert [(m.step, m.value) for m in perplexity] == [(2, pytest.approx(math.exp(before[2]), rel=REL))]


# --------------------------------------------------------------------------- refusals


def test_a_store_without_a_committed_step_is_one_line(tmp_path, capsys):
    assert EVALUATE.main([str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {tmp_path} holds no committed checkpoint (no step_XXXXXXXX/ with a MANIFEST.json)"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "3"], "error: --step 3 is not a committed checkpoint of {store} (committed: [2, 4])"),
        (["--ema"], "error: {store}/step_00000004 holds no ema.pt: the run kept no weight average (train.ema_decay=0)"),
        (["--max-batches", "-1"], "error: config key 'train.eval_max_batches' is -1: it must be a finite number >= 0"),
        (["--mlflow-run", "nope"], "error: --mlflow-run nope: not a run of sqlite:///{run}/mlflow.db ("),
    ],
    ids=["step-not-committed", "ema-without-average", "bad-max-batches", "unknown-mlflow-run"],
)
def test_bad_input_for_a_committed_store_is_one_line_and_exit_2(args, message, lm_run, capsys):
    store = str(lm_run / "checkpoints")
    assert EVALUATE.main([store, *args]) == 2
    captured = capsys.readouterr()
    assert one_error_line(captured.err).startswith(message.format(store=store, run=lm_run))
    assert captured.out == ""


# --------------------------------------------------------------------------- the config it evaluates with


def committed(config: list[str]) -> CommittedStep:
    """A committed step's view of a run composed from `config` (its manifest holds the config redacted)."""
    return CommittedStep("s3://bucket/run/step_00000004", 4, {"config": redacted(load_config(config))}, "/nowhere")


def test_the_runs_config_with_the_evaluations_changes():
    """Credentials the manifest masked are dropped for the flags' options; --data reads shards even
    where the run read an embedded default; one micro-batch per rank and step on any world size;
    another engine drops DeepSpeed's own settings."""
    ckpt = committed(
        [
            "+exp=tost_gpt2_smoke",
            "+data.storage_options.endpoint_url=http://store:9000",
            "+data.storage_options.secret=s3cr3t",
            "+engine.deepspeed_overrides.zero_optimization.overlap_comm=true",
        ]
    )
    assert ckpt.manifest["config"]["data"]["storage_options"]["secret"] == "***"
    args = EVALUATE.parse_args(
        ["s3://bucket/run", "--data", "s3://bucket/val-{0..3}.tar", "--micro-batch-size", "3", "--engine", "fsdp"]
    )
    cfg = EVALUATE.evaluation_config(ckpt, args, {"key": "k", "secret": "s"}, world_size=5)
    assert cfg.data.source == "shards" and cfg.data.val_urls == "s3://bucket/val-{0..3}.tar"
    assert cfg.data.storage_options == {"endpoint_url": "http://store:9000", "key": "k", "secret": "s"}
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (3, 15)
    assert cfg.engine.name == "fsdp" and cfg.engine.deepspeed_overrides == {}
    assert cfg.model.n_layer == 4 and cfg.train.eval_max_batches == 0  # the rest is the run's


def test_a_run_on_shards_without_validation_shards_needs_data():
    ckpt = committed(["+exp=tost_gpt2_smoke", "data=shards", 'data.urls="s3://bucket/train-{0..9}.tar"'])
    with pytest.raises(UserError, match="its run had no validation data .* give the shards with --data URL"):
        EVALUATE.evaluation_config(ckpt, EVALUATE.parse_args(["s3://bucket/run"]), {}, world_size=1)
