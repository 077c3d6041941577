"""Evaluate a committed checkpoint without training: the run's own evaluation, on its validation data or yours.

    python tools/evaluate.py runs/tost_gpt2_smoke/checkpoints
    python tools/evaluate.py runs/tost_gpt2_smoke/checkpoints --step 60 --max-batches 0 --ema --whitebox
    torchrun --nproc_per_node 8 tools/evaluate.py s3://bucket/runs/owt-base --step 20000 \\
        --storage-option endpoint_url=http://minio:9000 --data "s3://bucket/owt/val/shard-{000000..000015}.tar" \\
        --mlflow-run auto --output eval-20000.json
    deepspeed --num_gpus 8 tools/evaluate.py s3://bucket/runs/vit-base --engine fsdp --micro-batch-size 64 \\
        --output eval.json

CHECKPOINTS is the run's checkpoint store (its checkpoint.url: a path or fsspec URL); the newest
committed step is evaluated unless --step names one, after its files are checked against the
manifest, whatever engine (DeepSpeed ZeRO 0-3, FSDP2, DDP) and number of ranks wrote it. Under any
launcher, or one process under plain python, the model is built and sharded by the engine the run
trained with (or --engine), and the run's own task evaluates it: the numbers come from the code
that computed training's eval_* metrics, so an evaluation of the step a run evaluated gives the
value it logged. Language models report eval_loss, eval_perplexity (exp of the loss) and
eval_tokens; image models eval_loss, eval_top1 and eval_top5; --whitebox adds the white-box
measures per layer (<measure>_layer<ii>, on the first batch), --ema the weight average's metrics
as eval_ema_* (the run's ema.pt, kept with train.ema_decay > 0).

The validation data are the run's (data.val_urls, or the embedded defaults' held-out split), or
the shards --data gives (a brace pattern or several URLs, as data.val_urls takes). At most
train.eval_max_batches micro-batches per rank are read (--max-batches; 0 is the whole set): with a
limit, another number of ranks reads other batches, so compare runs at --max-batches 0 (the
white-box measures, taken on each rank's first batch, always depend on the ranks). Each rank
predicts micro-batches of train.micro_batch_size (--micro-batch-size) samples; the run's global
batch and offload play no part. Batch-norm statistics are rank 0's, in training's
evaluations as in the checkpoint.

The result is one JSON object on stdout (or in --output, which the DeepSpeed launcher needs: it logs
to stdout itself): step, checkpoint, model, engine, world_size, weights, data and metrics.
--mlflow-run ID (auto: the run that wrote the checkpoint) logs the metrics into that MLflow run at
the checkpoint's step under training's names, so they line up with its eval_* curves; a metric the
run logged at that step already gets a second point there. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import torch

from pretrain.checkpoint.export import CommittedStep, open_step
from pretrain.config import SECRET_WORDS, Config, config_from_dict
from pretrain.data.storage import add_storage_option_flag, parse_storage_options, url_to_fs
from pretrain.distributed import DistInfo, init_distributed, shutdown, strip_launcher_args
from pretrain.engines import ENGINES, Engine, build_engine, check_engine_config
from pretrain.errors import UserError
from pretrain.models import build_model
from pretrain.tasks import LanguageModelling, build_task
from pretrain.trainer import seed_everything

AUTO = "auto"  # --mlflow-run auto: the run the checkpoint's manifest names
Tensors = dict[str, torch.Tensor]  # by the model's names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter (DeepSpeed's) is not the result
            result = evaluate(args)
        if result is not None:  # rank 0
            emit(result.report, args.output, parse_storage_options(args.storage_option))
            with contextlib.redirect_stdout(sys.stderr):
                result.log_to_mlflow()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", help="the run's checkpoint store (checkpoint.url): a path or fsspec URL")
    parser.add_argument("--step", type=int, help="a committed step (default: the newest)")
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="URL",
        help="validation shards instead of the run's: a brace pattern (quoted) or shard URLs, as data.val_urls",
    )
    parser.add_argument(
        "--max-batches", type=int, help="micro-batches per rank, 0 = all (default: the run's train.eval_max_batches)"
    )
    parser.add_argument("--micro-batch-size", type=int, help="per rank (default: the run's train.micro_batch_size)")
    parser.add_argument("--engine", choices=ENGINES, help="wrap and shard the model so (default: the run's engine)")
    parser.add_argument("--ema", action="store_true", help="evaluate the weight average (ema.pt) too, as eval_ema_*")
    parser.add_argument("--whitebox", action="store_true", help="report the white-box measures per layer too")
    parser.add_argument("--output", metavar="PATH", help="write the JSON there (a path or fsspec URL), not to stdout")
    parser.add_argument(
        "--mlflow-run",
        metavar="ID",
        help=f"log the metrics into this MLflow run at the checkpoint's step ('{AUTO}': the run that wrote it)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="where that run is (default: the run's tracking.uri, else the mlflow.db in its run_dir)",
    )
    add_storage_option_flag(parser)
    return parser.parse_args(argv)


class MlflowTarget(NamedTuple):
    """The MLflow run the metrics go to, checked before evaluating."""

    client: Any  # an MlflowClient
    uri: str
    run_id: str


class Result(NamedTuple):
    """What rank 0 hands back: the report, and where to log its metrics."""

    report: dict[str, Any]
    mlflow: MlflowTarget | None

    def log_to_mlflow(self) -> None:
        """The metrics at the checkpoint's step, under the names training logs them by."""
        if self.mlflow is None:
            return
        from mlflow.entities import Metric

        from pretrain.tracking.mlflow import one_line

        target, now = self.mlflow, int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, self.report["step"]) for k, v in self.report["metrics"].items()]
        try:
            target.client.log_batch(target.run_id, metrics=metrics)
        except Exception as exc:
            raise UserError(
                f"evaluated, but logging to MLflow run {target.run_id} ({target.uri}) failed: {one_line(exc)}"
            ) from None
        print(f"logged {len(metrics)} metrics to MLflow run {target.run_id} ({target.uri})", file=sys.stderr)


def evaluate(args: argparse.Namespace) -> Result | None:
    """Collective: the report (and where to log it) on rank 0, None on the other ranks. Every
    check that can fail comes before the process group: a refusal stops every rank alike."""
    options = parse_storage_options(args.storage_option)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    with open_step(args.checkpoints, options, args.step, progress=is_main and sys.stderr.isatty()) as ckpt:
        cfg = evaluation_config(ckpt, args, options, world_size)
        mlflow = mlflow_target(args, cfg, ckpt.manifest) if is_main else None
        ema = ckpt.weights(ema=True) if args.ema else None  # first: a run without one is refused at once
        live = ckpt.weights()
    world = init_distributed(cfg.train.collective_timeout_s)
    try:
        metrics = run_task(cfg, world, live, ema, args.whitebox)
    finally:
        shutdown()
    if not world.is_main:
        return None
    report = {
        "checkpoint": ckpt.url,
        "step": ckpt.step,
        "model": cfg.model.name,
        "engine": cfg.engine.name,
        "world_size": world.world_size,
        "weights": ["live", "ema"] if args.ema else ["live"],
        "data": cfg.data.val_urls if cfg.data.source == "shards" else f"{cfg.data.source} (held-out split)",
        "metrics": metrics,
    }
    return Result(report, mlflow)


def evaluation_config(ckpt: CommittedStep, args: argparse.Namespace, options: dict, world_size: int) -> Config:
    """The run's resolved config (the manifest's) with the evaluation's changes, merged through the
    schemas and checked as training's config is, so that a bad value is the same one-line error.

    Changes: --data (source=shards), --max-batches, --micro-batch-size, --engine; the storage
    options the manifest masked (credentials) dropped and --storage-option's added; one
    micro-batch per rank and step (the run's global batch need not split over these ranks); offload
    off (no optimizer state is kept)."""
    saved = copy.deepcopy(ckpt.manifest["config"])
    data, train, engine = saved["data"], saved["train"], saved["engine"]
    # The credentials the manifest masked are dropped: the store's own (environment, files) serve, or the flags'.
    unmasked = {k: v for k, v in data["storage_options"].items() if not any(w in k.lower() for w in SECRET_WORDS)}
    data["storage_options"] = unmasked | options
    if args.data:
        data |= {"source": "shards", "val_urls": args.data[0] if len(args.data) == 1 else args.data}
    if args.max_batches is not None:
        train["eval_max_batches"] = args.max_batches
    if args.micro_batch_size is not None:
        train["micro_batch_size"] = args.micro_batch_size
    if args.engine is not None:
        engine["name"] = args.engine
    if engine["name"] != "deepspeed":  # a DeepSpeed run's settings, which other engines refuse
        engine["deepspeed_overrides"] = {}
    engine |= {"offload_optimizer": False, "offload_params": False}
    cfg = config_from_dict(saved)
    cfg.train.global_batch_size = cfg.train.micro_batch_size * world_size
    if cfg.data.source == "shards" and cfg.data.val_urls is None:
        raise UserError(f"{ckpt.url}: its run had no validation data (data.val_urls); give the shards with --data URL")
    check_engine_config(cfg, world_size)
    return cfg


def mlflow_target(args: argparse.Namespace, cfg: Config, manifest: dict[str, Any]) -> MlflowTarget | None:
    """None without --mlflow-run; else the run, checked: a wrong id or store is refused before evaluating."""
    run_id = args.mlflow_run
    if run_id is None:
        return None
    if run_id == AUTO:
        run_id = manifest.get("mlflow_run_id")
        if not run_id:
            raise UserError(f"--mlflow-run {AUTO}: the checkpoint records no MLflow run; give the run's id")
    uri = args.tracking_uri or cfg.tracking.uri or f"sqlite:///{os.path.abspath(cfg.run_dir)}/mlflow.db"
    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):
        raise UserError(f"no MLflow database at {uri}: give the training run's tracking store with --tracking-uri")
    from pretrain.tracking.mlflow import client_for, one_line

    client = client_for(uri, cfg.tracking.request_timeout_s)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise UserError(f"--mlflow-run {run_id}: not a run of {uri} ({one_line(exc)})") from None
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"--mlflow-run {run_id}: the run is deleted in {uri}: restore it, or give another run")
    return MlflowTarget(client, uri, run_id)


def run_task(cfg: Config, world: DistInfo, live: Tensors, ema: Tensors | None, whitebox: bool) -> dict[str, float]:
    """Collective: the run's task evaluates the live weights, and the average when given, in the
    engine the config builds, as pretrain/trainer.py builds them."""
    seed_everything(cfg.train.seed)  # as training: identical initial weights on every rank, replaced below
    model = build_model(cfg.model)
    engine = build_engine(model, cfg, world)
    task = build_task(cfg, model, world, None)
    language = isinstance(task, LanguageModelling)
    load(engine, live)
    measured = task.evaluate(engine)
    metrics = {k: v for k, v in measured.items() if k.startswith("eval_")}  # the rest: white-box measures
    if language:
        metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    if ema is not None:
        load(engine, ema)
        averaged = task.evaluate(engine)
        # Named as training's WeightAverage.on_eval names them.
        metrics |= {f"eval_ema_{k.removeprefix('eval_')}": v for k, v in averaged.items() if k.startswith("eval_")}
        if language:
            metrics["eval_ema_perplexity"] = perplexity(metrics["eval_ema_loss"])
    if whitebox:
        metrics |= {k: v for k, v in measured.items() if not k.startswith("eval_")}
    return metrics


@torch.no_grad()
def load(engine: Engine, weights: Tensors) -> None:
    """Collective: the model computes with `weights` (whole tensors by name), each rank taking its
    pieces, and its floating buffers (batch-norm statistics, whole on every rank) copied, as the
    weight average is put in place during training (pretrain/ema.py)."""
    engine.set_local_weights(engine.local_pieces(weights))
    for name, buffer in engine.model.named_buffers():
        if buffer.is_floating_point():
            buffer.copy_(weights[name])


def perplexity(loss: float) -> float:
    """exp(loss); inf, not an OverflowError, for a diverged model's loss."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf


def emit(report: dict[str, Any], output: str | None, options: dict) -> None:
    text = json.dumps(report, indent=2)
    if output is None:
        print(text)
        return
    fs, path = url_to_fs(output, options, "output")
    try:
        with fs.open(path, "w") as f:
            f.write(text + "\n")
    except OSError as exc:
        raise UserError(f"cannot write --output {output} ({exc}); the result: {json.dumps(report)}") from None
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    code = main()
    # Everything is done: the result written, the process group shut down, the loader's workers
    # stopped. Skip the interpreter's teardown, seconds of freeing torch's and DeepSpeed's modules
    # on every rank (as pretrain/main.py does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
