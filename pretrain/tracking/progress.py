"""What a run reports as it goes: one console line and one set of MLflow metrics per step interval
(loss, lr, tokens/s, MFU, memory, tokens of each data source, ...), every evaluation's metrics, and
how long checkpoints took."""

from __future__ import annotations

import logging
import math
import time

from pretrain.callbacks import Callback, LoopState
from pretrain.distributed import mean_over_ranks, sum_over_ranks
from pretrain.engines.base import StepResult
from pretrain.tracking.metrics import memory_gib, mfu, peak_flops

log = logging.getLogger("pretrain")


class MetricsLog(Callback):
    """Every `train.log_interval` steps and after the last. The interval's loss is the mean over its
    applied steps (neither skipped nor withheld) and over ranks; its time excludes what checkpoint saves blocked."""

    def __init__(self, flops_per_token: float) -> None:
        self.flops_per_token = flops_per_token
        self.losses: list[float] = []  # of the interval's applied steps
        self.steps = 0  # taken in the interval, withdrawn ones included: their time was spent
        self.started = time.perf_counter()

    def on_fit_start(self, loop: LoopState) -> None:
        self.started = time.perf_counter()

    def on_step_start(self, loop: LoopState) -> None:
        self.steps += 1

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        if not (result.bad or result.withheld):
            self.losses.append(result.loss)
        if loop.step % loop.cfg.train.log_interval == 0 or loop.at_end:
            self._log_interval(loop, result)
        self._log_committed_saves(loop)

    def _log_interval(self, loop: LoopState, result: StepResult) -> None:
        elapsed = time.perf_counter() - self.started
        loop.last_loss = mean_over_ranks(sum(self.losses) / len(self.losses) if self.losses else math.nan)
        tokens_per_s = loop.tokens_per_step * self.steps / elapsed
        metrics = {
            "loss": loop.last_loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "data_skipped": sum_over_ranks(loop.data.skipped_samples()),
            **loop.callbacks.interval_metrics(),
            "tokens_seen": loop.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / loop.task.tokens_per_sample,
            "step_time_s": elapsed / self.steps,
            "memory_gib": memory_gib(loop.dist.device),
        }
        by_source = self._source_tokens(loop)
        metrics.update({f"tokens_seen/{name}": tokens for name, tokens in by_source.items()})
        peak = peak_flops(loop.dist.device, loop.cfg.engine.precision, loop.cfg.train.peak_tflops)
        utilisation = mfu(tokens_per_s / loop.dist.world_size, self.flops_per_token, peak)
        if utilisation is not None:
            metrics["mfu"] = utilisation
        loop.tracker.log_metrics(metrics, loop.step)
        if loop.dist.is_main:
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | mfu %s | mem %.2f GiB | %.3f s/step%s",
                loop.step,
                loop.cfg.train.max_steps,
                loop.last_loss,
                result.lr,
                result.grad_norm,
                tokens_per_s,
                "-" if utilisation is None else f"{100 * utilisation:.1f}%",
                metrics["memory_gib"],
                metrics["step_time_s"],
                "".join(f" | {name} {_short(tokens)} tok" for name, tokens in by_source.items()),
            )
        self.losses.clear()
        self.steps, self.started = 0, time.perf_counter()

    @staticmethod
    def _source_tokens(loop: LoopState) -> dict[str, int]:
        """Tokens each source of a mixture (data.sources, more than one) has given training, over all
        ranks: the data's count, which goes on past a reload while tokens_seen (the model's) goes back."""
        samples = loop.data.source_samples()
        return {name: n * loop.task.tokens_per_sample for name, n in samples.items()} if len(samples) > 1 else {}

    def on_eval(self, loop: LoopState, metrics: dict[str, float]) -> None:
        loop.tracker.log_metrics(metrics, loop.step)
        if loop.dist.is_main:
            evals = " | ".join(
                f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_")
            )
            log.info("eval at step %d | %s", loop.step, evals)

    def on_save(self, loop: LoopState, blocked_s: float) -> None:
        loop.tracker.log_metrics({"ckpt_blocked_s": blocked_s}, loop.step)
        self.started += blocked_s  # saving is not training time
        self._log_committed_saves(loop)

    def on_fit_end(self, loop: LoopState) -> None:
        self._log_committed_saves(loop)

    @staticmethod
    def _log_committed_saves(loop: LoopState) -> None:
        for saved_step, seconds in loop.checkpoints.committed_save_seconds().items():
            loop.tracker.log_metrics({"ckpt_save_s": seconds}, saved_step)


def _short(n: float) -> str:
    """1234567 -> '1.23M': a count at a glance."""
    for size, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
