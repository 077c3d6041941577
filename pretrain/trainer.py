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
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from pretrain.batch import Batch, pinned
from pretrain.callbacks import Callbacks, LoopState
from pretrain.checkpoint.manager import Checkpointable, CheckpointManager, NotCommitted, Restored, SavePolicy
from pretrain.checkpoint.store import CheckpointStore, Node
from pretrain.config import Config, config_changes, grad_accum_steps, redacted
from pretrain.data.shards import merge_states
from pretrain.data.tokenizer import describe_tokenizer, same_tokenizer
from pretrain.distributed import DistInfo
from pretrain.ema import WeightAverage
from pretrain.engines import build_engine
from pretrain.engines.base import Engine
from pretrain.errors import UserError
from pretrain.faults import FaultInjection
from pretrain.guard import NonFiniteGuard
from pretrain.heartbeat import Heartbeat, LostRank
from pretrain.interop.weights import initialise
from pretrain.models import build_model
from pretrain.preemption import Preempted, Preemption, PreemptionWatch
from pretrain.spikes import SpikeDetector
from pretrain.tasks import Evaluation, build_task
from pretrain.tracking.mlflow import Tracker
from pretrain.tracking.progress import MetricsLog
from pretrain.whitebox import WhiteboxPlot

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
        self.tokenizer: dict | None = None  # the training data's (ShardLoader.tokenizer), once they are built

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

    def _restore(
        self, ckpt: CheckpointManager, engine: Engine, extras: Sequence[Checkpointable] = ()
    ) -> Restored | None:
        resume = str(self.cfg.checkpoint.resume)
        if resume == "none":
            return None
        if resume != "auto" and not resume.isdecimal():
            raise UserError(f"checkpoint.resume={resume!r} is neither auto, none nor a step number")
        return ckpt.restore(
            engine, None if resume == "auto" else int(resume), check=self._check_saved_config, extras=extras
        )

    def _check_saved_config(self, manifest: dict) -> None:
        """Warn of every config key changed since the checkpoint; refuse the changes that make its
        state unusable (the model's shape, the engine that wrote the files), naming the key, and
        data made by another tokenizer than the checkpoint's (a checkpoint that records one)."""
        saved = manifest.get("tokenizer")
        if saved and self.tokenizer and not same_tokenizer(saved, self.tokenizer):
            raise UserError(
                f"the data were tokenized by {describe_tokenizer(self.tokenizer)}, but the checkpoint was trained on "
                f"{describe_tokenizer(saved)}: train on data prepared with the checkpoint's tokenizer, or set "
                "checkpoint.resume=none to start afresh"
            )
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
        if cfg.checkpoint.init_from:
            init_from = cfg.checkpoint.init_from
            origin = initialise(model, cfg.model, init_from, cfg.checkpoint.storage_options)
            if world.is_main:
                log.info("weights from %s (step %s of %s)", init_from, origin.get("step"), origin.get("source"))
        flops_per_token, n_params = model.flops_per_token(), model.num_params()
        engine = build_engine(model, cfg, world)
        task = build_task(cfg, model, world, watch.worker_init)
        data = task.loader(train=True)
        self.tokenizer = data.tokenizer
        ckpt = self.checkpoints()
        ckpt.check_writable()
        heartbeat = (
            Heartbeat(world, cfg.train.heartbeat_s, cfg.train.lost_rank_timeout_s)
            if world.world_size > 1 and cfg.train.heartbeat_s > 0
            else None
        )
        callbacks = self._callbacks(engine, watch, flops_per_token, heartbeat)

        step, run_id, tokens_seen = 0, None, 0
        seed_everything(cfg.train.seed + world.rank)  # dropout etc. differ across ranks
        restored = self._restore(ckpt, engine, callbacks.checkpointables())
        if restored:
            data.load_state_dict(merge_states(restored.data_states))
            step, run_id = restored.step, restored.manifest.get("mlflow_run_id")
            tokens_seen = restored.manifest["tokens_seen"]
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
        run_id = tracker.start(redacted(cfg), resume_run_id=run_id, step=step)
        loop = LoopState(
            cfg=cfg,
            dist=world,
            engine=engine,
            task=task,
            data=data,
            checkpoints=ckpt,
            tracker=tracker,
            run_id=run_id,
            callbacks=callbacks,
            step=step,
            tokens_seen=tokens_seen,
            tokens_per_step=cfg.train.global_batch_size * task.tokens_per_sample,
        )
        log.info(
            "%s: %.2fM params, %d ranks on %s, %d tokens/step, steps %d -> %d",
            cfg.model.name,
            n_params / 1e6,
            world.world_size,
            world.device,
            loop.tokens_per_step,
            step,
            cfg.train.max_steps,
        )
        # Closed on any way out, which stops the loader's workers (see ShardLoader.__iter__).
        with contextlib.closing(task.batches(data)) as batches:
            try:
                self._loop(loop, pinned(batches) if world.device.type == "cuda" else batches)
            except Preempted:
                tracker.finish("KILLED")
                raise
            except BaseException as exc:
                # A collective that failed because a peer is gone: say so, rather than how it failed.
                verdict = heartbeat.lost_peer() if heartbeat and not isinstance(exc, UserError) else None
                tracker.finish("FAILED")
                if verdict:
                    raise LostRank(verdict) from exc
                raise
            finally:
                if heartbeat:
                    heartbeat.stop()
        tracker.finish()
        if world.is_main:
            failed = (
                f" ({len(ckpt.failed)} of {len(ckpt.saved)} saves failed; the last committed)" if ckpt.failed else ""
            )
            log.info("done: checkpoints in %s%s, MLflow run %s in %s", ckpt.store.url, failed, run_id, tracker.uri)
        return loop.last_loss

    def _callbacks(
        self, engine: Engine, watch: PreemptionWatch, flops_per_token: float, heartbeat: Heartbeat | None
    ) -> Callbacks:
        """What the run does around its steps, in the order it is done (see pretrain/callbacks.py):
        the weight average comes before the log, whose on_eval records the average's metrics too,
        and the log before evaluation, so that an interval ending at an evaluation is logged first."""
        cfg, world = self.cfg, self.dist
        spikes_on = cfg.train.spike.action != "none"
        return Callbacks(
            [
                *filter(None, [FaultInjection.from_env(world.rank)]),  # tests only: None unless asked for
                *filter(None, [heartbeat]),  # with more than one rank
                *([WeightAverage(engine, cfg.train.ema_decay)] if cfg.train.ema_decay else []),
                NonFiniteGuard(cfg.train.bad_steps_to_reload, cfg.train.max_reloads, world.is_main),
                *([SpikeDetector(cfg.train.spike, cfg.train.max_reloads, world.is_main)] if spikes_on else []),
                MetricsLog(flops_per_token),
                Evaluation(),
                WhiteboxPlot(),
                Preemption(watch),
            ]
        )

    def _loop(self, loop: LoopState, batches: Iterator[Batch]) -> None:
        cfg, callbacks = self.cfg, loop.callbacks
        callbacks.on_fit_start(loop)
        accept = (lambda loss: callbacks.accept_update(loop, loss)) if callbacks.judges_updates() else None
        while loop.step < cfg.train.max_steps and not loop.stop_requested:
            micro_batches = [next(batches) for _ in range(self.grad_accum_steps)]
            callbacks.on_step_start(loop)
            result = loop.engine.train_step(micro_batches, accept)
            loop.step += 1
            loop.tokens_seen += loop.tokens_per_step
            callbacks.on_step_end(loop, result)
            if loop.reload_requested:
                self._reload(loop)
                continue
            scheduled = loop.step % cfg.checkpoint.interval == 0 and not loop.saves_held
            if scheduled or loop.stop_requested or loop.at_end:
                record = self._checkpoint_record(loop.run_id, loop.tokens_seen)
                extras = callbacks.checkpointables()
                blocked = loop.checkpoints.save(loop.step, loop.engine, loop.data.state_dict(), record, extras)
                callbacks.on_save(loop, blocked)
        self._check_last_save(loop)  # committed before the run reports done, or stops to be requeued
        callbacks.on_fit_end(loop)

    def _check_last_save(self, loop: LoopState) -> None:
        ckpt = loop.checkpoints
        if not ckpt.saved or ckpt.committed(ckpt.saved[-1]):
            return
        failed = ckpt.failed_saves()
        try:
            newest = ckpt.newest_committed()
            restart = "step 0: no step is committed" if newest is None else f"step {newest}"
        except Exception as exc:  # the store may be what failed
            restart = f"unknown: the store cannot be listed ({type(exc).__name__})"
        preempted = (
            "; preempted, but not exiting with 75, so that the scheduler does not requeue a run that cannot save"
            if loop.stop_requested
            else ""
        )
        raise NotCommitted(
            f"no checkpoint was saved for step {ckpt.saved[-1]}: {failed} of {len(ckpt.saved)} saves of "
            f"this run failed (see the errors above); a restart would begin at {restart} of {ckpt.store.url}"
            f"{preempted}"
        )

    def _reload(self, loop: LoopState) -> None:
        """Load the newest committed checkpoint's model, optimizer, schedule, RNG and extras; the
        data go on from here."""
        loop.checkpoints.wait()
        restored = loop.checkpoints.restore(loop.engine, extras=loop.callbacks.checkpointables())
        if restored is None:
            raise UserError(
                f"{loop.reload_requested} (up to step {loop.step}) and there is no committed checkpoint to "
                f"reload; lower optim.lr, raise optim.warmup_steps or check the data"
            )
        if self.dist.is_main:
            log.warning(
                "reloaded %s (step %d) after %s; the data go on from step %d's position",
                loop.checkpoints.store.step_url(restored.step),
                restored.step,
                loop.reload_requested,
                loop.step,
            )
        loop.step, loop.tokens_seen = restored.step, restored.manifest["tokens_seen"]
        loop.reload_requested = None

    def _checkpoint_record(self, run_id: str | None, tokens_seen: int) -> dict:
        """What the manifest says of the run besides its files: enough to tell, on resume, what
        wrote it (engine, config and its hash; credentials masked), which MLflow run to continue, and
        the data's tokenizer (for tools/generate.py; None for images)."""
        config = redacted(self.cfg)
        return {
            "engine": self.cfg.engine.name,
            "model": self.cfg.model.name,
            "tokenizer": self.tokenizer,
            "mlflow_run_id": run_id,
            "tokens_seen": tokens_seen,
            "config": config,
            "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        }
