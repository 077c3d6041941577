"""The training loop: data -> engine -> checkpoints and metrics. It knows the Engine interface,
not DeepSpeed or FSDP, and the model only through the registry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pretrain import whitebox
from pretrain.checkpoint.manager import Checkpointable, CheckpointManager, Restored, SavePolicy
from pretrain.checkpoint.store import CheckpointStore, Node
from pretrain.config import Config, config_changes, grad_accum_steps, redacted
from pretrain.data.shards import merge_states
from pretrain.distributed import DistInfo
from pretrain.ema import WeightAverage
from pretrain.engines import build_engine
from pretrain.engines.base import Engine
from pretrain.errors import UserError
from pretrain.faults import crash_point, nan_loss
from pretrain.guard import NonFiniteGuard
from pretrain.models import build_model
from pretrain.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch
from pretrain.tasks import build_task
from pretrain.tracking.metrics import memory_gib, mfu, peak_flops
from pretrain.tracking.mlflow import Tracker

log = logging.getLogger("pretrain")
# Config keys whose change makes a checkpoint's state unusable: the engine that wrote its files,
# and every model key except these (they change no parameter's shape).
STATE_SHAPING_KEYS = frozenset({"engine.name"})
MODEL_KEYS_FREE_TO_CHANGE = frozenset({"model.dropout"})


def stable_seed(*parts: int) -> int:
    """A 32-bit seed mixed from `parts`, the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=4).digest())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo):
        self.cfg = cfg
        self.dist = dist_info
        self.run_dir = os.path.abspath(cfg.run_dir)
        self.grad_accum_steps = grad_accum_steps(cfg.train, dist_info.world_size)
        self.tokens_per_step = 0  # global batch x the task's tokens per sample, once the model is built
        self.tokens_seen = 0  # by the model's current state: kept in checkpoints, as the batch size may change
        self.ema: WeightAverage | None = None  # with train.ema_decay, once the engine is built

    def checkpoints(self) -> CheckpointManager:
        """The checkpoint store at `checkpoint.url` (default: <run_dir>/checkpoints), staged in a
        node-local directory named after the URL so that concurrent runs never share one."""
        c, world = self.cfg.checkpoint, self.dist
        url = c.url or os.path.join(self.run_dir, "checkpoints")
        staging = c.staging_dir or os.path.join(
            tempfile.gettempdir(), "whitebox-staging", hashlib.sha256(url.encode()).hexdigest()[:16]
        )
        node = Node(
            index=world.rank // world.local_world_size,
            count=world.world_size // world.local_world_size,
            is_leader=world.local_rank == 0,
        )
        store = CheckpointStore(url, c.storage_options, staging, node)
        policy = SavePolicy(c.keep_last, c.keep_every, c.commit_wait_s, c.async_upload, c.on_upload_error)
        return CheckpointManager(store, world, policy)

    def _restore(self, ckpt: CheckpointManager, engine: Engine) -> Restored | None:
        resume = str(self.cfg.checkpoint.resume)
        if resume == "none":
            return None
        if resume != "auto" and not resume.isdecimal():
            raise UserError(f"checkpoint.resume={resume!r} is neither auto, none nor a step number")
        return ckpt.restore(
            engine, None if resume == "auto" else int(resume), check=self._check_saved_config, extras=self._extras()
        )

    def _check_saved_config(self, manifest: dict) -> None:
        """Warn of every config key changed since the checkpoint; refuse the changes that make its
        state unusable (the model's shape, the engine that wrote the files), naming the key."""
        changes = config_changes(manifest.get("config", {}), redacted(self.cfg))
        for key, (saved, current) in changes.items():
            if key in STATE_SHAPING_KEYS or (key.startswith("model.") and key not in MODEL_KEYS_FREE_TO_CHANGE):
                raise UserError(
                    f"{key}={current!r} but the checkpoint was trained with {key}={saved!r}: its state "
                    f"does not fit; set {key}={saved!r} to resume, or checkpoint.resume=none to start afresh"
                )
        if changes and self.dist.is_main:
            log.warning(
                "config changed since the checkpoint: %s",
                ", ".join(f"{k} {saved!r} -> {current!r}" for k, (saved, current) in changes.items()),
            )

    def fit(self) -> float:
        """Train to `train.max_steps`; returns the last logged loss (mean over ranks). Raises
        Preempted once a preemption signal's checkpoint is committed."""
        # From the start: a notice that comes during setup still ends the run after its first step.
        watch = PreemptionWatch(self.cfg.checkpoint.preempt_signals)
        try:
            return self._fit(watch)
        finally:
            watch.close()

    def _fit(self, watch: PreemptionWatch) -> float:
        cfg, world = self.cfg, self.dist
        if world.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            OmegaConf.save(OmegaConf.create(redacted(cfg)), os.path.join(self.run_dir, "config.yaml"))

        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        nan = nan_loss(model, world.rank)  # fault injection for the guard's tests; None in real runs
        flops_per_token = model.flops_per_token()
        n_params = model.num_params()
        engine = build_engine(model, cfg, world)
        self.ema = WeightAverage(engine, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.task = build_task(cfg, model, world, watch.worker_init)
        self.tokens_per_step = cfg.train.global_batch_size * self.task.tokens_per_sample
        data = self.task.loader(train=True)
        ckpt = self.checkpoints()

        step, run_id = 0, None
        seed_everything(cfg.train.seed + world.rank)  # dropout etc. differ across ranks
        restored = self._restore(ckpt, engine)
        if restored:
            data.load_state_dict(merge_states(restored.data_states))
            step, run_id = restored.step, restored.manifest.get("mlflow_run_id")
            self.tokens_seen = restored.manifest["tokens_seen"]
            log.info("resumed from %s (step %d)", ckpt.store.step_url(step), step)
            if restored.resharded:
                # The saved per-rank RNG streams belong to other ranks: start new ones, distinct
                # per rank and per resume point.
                seed_everything(stable_seed(cfg.train.seed, world.rank, step))
                if world.is_main:
                    log.warning(
                        "resharded: checkpoint written by %d ranks, resumed on %d; the data continue "
                        "the same sequence, per-rank random streams (dropout) start afresh",
                        restored.manifest["world_size"],
                        world.world_size,
                    )

        tracker = Tracker(cfg.tracking, self.run_dir, enabled=world.is_main)
        if run_id is None and str(cfg.checkpoint.resume) == "auto":
            run_id = tracker.previous_run_id()  # restarted before its first checkpoint committed
        run_id = tracker.start(redacted(cfg), resume_run_id=run_id)
        log.info(
            "%s: %.2fM params, %d ranks on %s, %d tokens/step, steps %d -> %d",
            cfg.model.name,
            n_params / 1e6,
            world.world_size,
            world.device,
            self.tokens_per_step,
            step,
            cfg.train.max_steps,
        )
        # Closed on any way out, which stops the loader's workers (see ShardLoader.__iter__).
        with contextlib.closing(self.task.batches(data)) as batches:
            try:
                last_loss = self._loop(step, engine, data, batches, ckpt, tracker, run_id, flops_per_token, watch, nan)
            except Preempted:
                tracker.finish("KILLED")
                raise
            except BaseException:
                tracker.finish("FAILED")
                raise
        tracker.finish()
        if world.is_main:
            log.info("done: checkpoints in %s, MLflow run %s in %s", ckpt.store.url, run_id, tracker.uri)
        return last_loss

    def _loop(self, step, engine, data, batches, ckpt, tracker, run_id, flops_per_token, watch, nan) -> float:
        cfg, world = self.cfg, self.dist
        peak = peak_flops(world.device, cfg.engine.precision)
        guard = NonFiniteGuard(cfg.train.bad_steps_to_reload, cfg.train.max_reloads, world.is_main)
        losses: list[float] = []  # of the interval's applied steps
        interval_steps, last_loss = 0, float("nan")
        interval_start = time.perf_counter()
        while step < cfg.train.max_steps:
            micro_batches = [next(batches) for _ in range(self.grad_accum_steps)]
            if nan:
                nan.step = step + 1
            result = engine.train_step(micro_batches)
            if nan:
                nan.step_done()
            step += 1
            interval_steps += 1
            self.tokens_seen += self.tokens_per_step
            if not result.bad:
                losses.append(result.loss)
                if self.ema:
                    self.ema.update()
            crash_point("step", step)
            if guard.reload_due(step, result):
                step = self._reload(ckpt, engine, step)
                continue

            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
                elapsed = time.perf_counter() - interval_start
                last_loss = self._mean_over_ranks(sum(losses) / len(losses) if losses else float("nan"))
                tokens_per_s = self.tokens_per_step * interval_steps / elapsed
                metrics = {
                    "loss": last_loss,
                    "lr": result.lr,
                    "grad_norm": result.grad_norm,
                    "data_skipped": self._sum_over_ranks(data.skipped_samples()),
                    "steps_skipped": guard.skipped,
                    "reloads": guard.reloads,
                    "tokens_seen": self.tokens_seen,
                    "tokens_per_s": tokens_per_s,
                    "samples_per_s": tokens_per_s / self.task.tokens_per_sample,
                    "step_time_s": elapsed / interval_steps,
                    "memory_gib": memory_gib(world.device),
                }
                utilisation = mfu(tokens_per_s / world.world_size, flops_per_token, peak)
                if utilisation is not None:
                    metrics["mfu"] = utilisation
                tracker.log_metrics(metrics, step)
                if world.is_main:
                    log.info(
                        "step %d/%d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | mfu %s | mem %.2f GiB"
                        " | %.3f s/step",
                        step,
                        cfg.train.max_steps,
                        last_loss,
                        result.lr,
                        result.grad_norm,
                        tokens_per_s,
                        "-" if utilisation is None else f"{100 * utilisation:.1f}%",
                        metrics["memory_gib"],
                        metrics["step_time_s"],
                    )
                losses.clear()
                interval_steps, interval_start = 0, time.perf_counter()

            if step == cfg.train.max_steps or cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                self._evaluate(engine, tracker, step)
            preempted = self._any_rank_signalled(watch)
            # No scheduled save in a streak of skipped steps: the one before it is what a reload wants.
            scheduled = step % cfg.checkpoint.interval == 0 and not guard.in_a_row
            if preempted or scheduled or step == cfg.train.max_steps:
                blocked = ckpt.save(step, engine, data.state_dict(), self._checkpoint_record(run_id), self._extras())
                tracker.log_metrics({"ckpt_blocked_s": blocked}, step)
                interval_start += blocked  # saving is not training time
            self._log_committed_saves(ckpt, tracker)
            if preempted:
                ckpt.wait()
                dist.barrier()  # no rank exits (and no launcher kills the rest) before rank 0 has committed
                self._log_committed_saves(ckpt, tracker)
                if world.is_main:
                    log.warning(
                        "preempted (%s) after step %d: checkpoint %s; exiting with %d so that the "
                        "scheduler requeues the run",
                        watch.signal_name or "signal on another rank",
                        step,
                        ckpt.store.step_url(step),
                        PREEMPTED_EXIT_CODE,
                    )
                raise Preempted(step)
        ckpt.wait()  # the last checkpoint is committed before the run reports done
        self._log_committed_saves(ckpt, tracker)
        return last_loss

    def _evaluate(self, engine: Engine, tracker: Tracker, step: int) -> None:
        """The task's metrics, and at the end of the run a plot of the white-box measures
        against depth (MLflow artifact whitebox.png)."""
        metrics = self.task.evaluate(engine)
        if not metrics:
            return
        if self.ema:
            with self.ema.applied():
                averaged = self.task.evaluate(engine)
            metrics |= {f"eval_ema_{k.removeprefix('eval_')}": v for k, v in averaged.items() if k.startswith("eval_")}
        tracker.log_metrics(metrics, step)
        if not self.dist.is_main:
            return
        log.info(
            "eval at step %d | %s",
            step,
            " | ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_")),
        )
        if step == self.cfg.train.max_steps:
            path = whitebox.plot(
                metrics, f"{self.cfg.model.name}, step {step}", os.path.join(self.run_dir, "whitebox.png")
            )
            if path:
                tracker.log_artifact(path)

    def _extras(self) -> list[Checkpointable]:
        """What checkpoints hold beside the engine."""
        return [self.ema] if self.ema else []

    def _reload(self, ckpt: CheckpointManager, engine: Engine, step: int) -> int:
        """Load the newest committed checkpoint's model, optimizer, schedule and RNG; the data
        go on from here. Returns the step to continue from."""
        ckpt.wait()
        restored = ckpt.restore(engine, extras=self._extras())
        if restored is None:
            raise UserError(
                f"steps up to {step} had a non-finite loss or gradient norm and there is no committed "
                f"checkpoint to reload; lower optim.lr, raise optim.warmup_steps or check the data"
            )
        if self.dist.is_main:
            log.warning(
                "reloaded %s (step %d) after %d skipped steps; the data go on from step %d's position",
                ckpt.store.step_url(restored.step),
                restored.step,
                self.cfg.train.bad_steps_to_reload,
                step,
            )
        self.tokens_seen = restored.manifest["tokens_seen"]
        return restored.step

    @staticmethod
    def _log_committed_saves(ckpt: CheckpointManager, tracker: Tracker) -> None:
        for saved_step, seconds in ckpt.committed_save_seconds().items():
            tracker.log_metrics({"ckpt_save_s": seconds}, saved_step)

    def _checkpoint_record(self, run_id: str | None) -> dict:
        """What the manifest says of the run besides its files: enough to tell, on resume, what
        wrote it (engine, config and its hash; credentials masked) and which MLflow run to continue."""
        config = redacted(self.cfg)
        return {
            "engine": self.cfg.engine.name,
            "model": self.cfg.model.name,
            "mlflow_run_id": run_id,
            "tokens_seen": self.tokens_seen,
            "config": config,
            "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        }

    def _any_rank_signalled(self, watch: PreemptionWatch) -> bool:
        """Whether a preemption signal reached any rank: all ranks must stop after the same step."""
        flag = torch.tensor([watch.signal_name is not None], dtype=torch.int32, device=self.dist.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _sum_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(t)
        return t.item()

    def _mean_over_ranks(self, value: float) -> float:
        return self._sum_over_ranks(value) / self.dist.world_size
