"""What a model learns from and how it is judged: language modelling or image classification.

The trainer asks its task for the training batches, the size of a sample in tokens (for
throughput and MFU) and an evaluation; it knows neither the data formats nor the metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Generator, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.batch import Batch
from pretrain.callbacks import Callback, LoopState
from pretrain.config import Config
from pretrain.data.build import build_image_loader, build_text_loader
from pretrain.data.loader import ShardLoader
from pretrain.data.mixing import BatchMixer
from pretrain.distributed import DistInfo, any_rank, mean_over_reporting_ranks
from pretrain.engines.base import Engine, StepResult
from pretrain.models.vision import ImageClassifier
from pretrain.whitebox import Probe

log = logging.getLogger("pretrain")
TOP_K = 5  # eval_top5
IGNORE = -100  # label of positions the language-model loss skips


class Task:
    tokens_per_sample: int

    def __init__(self, cfg: Config, dist_info: DistInfo, worker_init: Callable[[int], None]) -> None:
        self.cfg, self.dist, self.worker_init = cfg, dist_info, worker_init
        self._val: Iterable[Batch] | None = None
        # Shards without validation shards: the run trains, unevaluated (the embedded defaults hold theirs).
        self.evaluated = not (cfg.data.source == "shards" and cfg.data.val_urls is None)
        if not self.evaluated and dist_info.is_main:
            log.warning("data.val_urls is not set: this run will not be evaluated")

    def loader(self, train: bool) -> Iterable[Batch]:
        """The training loader (a ShardLoader), or one pass over the validation data."""
        raise NotImplementedError

    def batches(self, loader: ShardLoader) -> Generator[Batch, None, None]:
        """The training loader's micro-batches as the model takes them."""
        return iter(loader)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Collective: the task's metrics on one pass of the validation data (at most
        `train.eval_max_batches` micro-batches per rank), and the white-box measures."""
        raise NotImplementedError

    def _evaluation_pass(
        self, engine: Engine, dummy: Batch, score: Callable[[torch.Tensor, Batch], list[float]], size: int
    ) -> tuple[list[float], dict[str, float]]:
        """Sums of `score(output, batch)` (`size` numbers) over the validation pass and all
        ranks, and the white-box measures on each rank's first batch, averaged over ranks.

        Ranks hold different numbers of batches, but a sharded model's forward is collective:
        every rank steps until all are done, one that has run out feeding `dummy`, which scores
        nothing."""
        if self._val is None:
            self._val = self.loader(train=False)
        totals = torch.zeros(size, dtype=torch.float64)
        probe = Probe(engine.model)
        # Batch-norm statistics: rank 0's on every rank, as checkpoints hold them (and DDP keeps them),
        # so that an evaluation of a checkpoint (tools/evaluate.py) gives the value logged here.
        for buffer in engine.model.buffers():
            if buffer.is_floating_point():
                dist.broadcast(buffer, src=0)
        limit, taken, measured = self.cfg.train.eval_max_batches, 0, False
        # Closing stops the loader's workers; a rank without validation shards holds an empty tuple.
        with contextlib.closing(batch for batch in self._val) as batches:
            while True:
                batch = next(batches, None) if not limit or taken < limit else None
                if not any_rank(batch is not None):
                    break
                # Every rank probes its first forward, a dummy one included: the probes' own module
                # calls must be collective too under ZeRO-3. A dummy's measures are not kept.
                first, taken = taken == 0, taken + 1
                measured = measured or (first and batch is not None)
                batch = batch or dummy
                with probe if first else contextlib.nullcontext():
                    output = engine.predict(batch).float().cpu()
                totals += torch.tensor(score(output, batch), dtype=torch.float64)
        totals = totals.to(self.dist.device)
        dist.all_reduce(totals)
        return totals.tolist(), mean_over_reporting_ranks(probe.metrics() if measured else {})


class LanguageModelling(Task):
    def __init__(self, cfg: Config, dist_info: DistInfo, worker_init: Callable[[int], None]) -> None:
        super().__init__(cfg, dist_info, worker_init)
        self.tokens_per_sample = cfg.model.seq_len

    def loader(self, train: bool) -> Iterable[Batch]:
        cfg, world = self.cfg, self.dist
        return build_text_loader(
            cfg.data,
            seq_len=cfg.model.seq_len,
            vocab_size=cfg.model.vocab_size,
            batch_size=cfg.train.micro_batch_size,
            rank=world.rank,
            world_size=world.world_size,
            local_rank=world.local_rank,
            seed=cfg.train.seed,
            train=train,
            worker_init=self.worker_init,
        )

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Mean next-token loss over the validation tokens, and the white-box measures."""
        if not self.evaluated:
            return {}
        T = self.cfg.model.seq_len
        dummy = {"input_ids": torch.zeros(1, T, dtype=torch.long), "labels": torch.full((1, T), IGNORE)}

        def score(logits: torch.Tensor, batch: Batch) -> list[float]:
            labels = batch["labels"].reshape(-1)
            loss = F.cross_entropy(logits.reshape(len(labels), -1), labels, ignore_index=IGNORE, reduction="sum")
            return [loss.item(), (labels != IGNORE).sum().item()]

        (loss, tokens), whitebox = self._evaluation_pass(engine, dummy, score, 2)
        return {"eval_loss": loss / tokens, "eval_tokens": tokens, **whitebox}


class ImageClassification(Task):
    def __init__(
        self, cfg: Config, dist_info: DistInfo, worker_init: Callable[[int], None], tokens_per_image: int
    ) -> None:
        super().__init__(cfg, dist_info, worker_init)
        self.tokens_per_sample = tokens_per_image

    def loader(self, train: bool) -> Iterable[Batch]:
        cfg, world = self.cfg, self.dist
        return build_image_loader(
            cfg.data,
            image_size=cfg.model.image_size,
            batch_size=cfg.train.micro_batch_size,
            rank=world.rank,
            world_size=world.world_size,
            local_rank=world.local_rank,
            seed=cfg.train.seed,
            train=train,
            worker_init=self.worker_init,
        )

    def batches(self, loader: ShardLoader) -> Generator[Batch, None, None]:
        """Mixup / CutMix (data.image.*) applied to each micro-batch, drawn from its index in
        the run: this rank's turn in the run's sequence, the same on any layout."""
        image, stream = self.cfg.data.image, loader.stream
        mixer = BatchMixer(
            image.mixup_alpha,
            image.cutmix_alpha,
            image.mix_prob,
            image.cutmix_switch_prob,
            self.cfg.model.num_classes,
            self.cfg.train.seed,
        )
        if not mixer.active:
            yield from loader
            return
        for batch in loader:
            yield mixer(batch, stream.batches - stream.world_size + stream.rank)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy over the validation images, and the white-box measures."""
        if not self.evaluated:
            return {}
        size = self.cfg.model.image_size
        dummy = {"images": torch.zeros(1, 3, size, size), "labels": torch.tensor([-1])}

        def score(logits: torch.Tensor, batch: Batch) -> list[float]:
            labels = batch["labels"]
            logits, labels = logits[labels >= 0], labels[labels >= 0]
            best = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices  # (B, k)
            loss = F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0
            return [
                loss,
                (best[:, 0] == labels).sum().item(),
                (best == labels[:, None]).any(1).sum().item(),
                len(labels),
            ]

        (loss, top1, top5, images), whitebox = self._evaluation_pass(engine, dummy, score, 4)
        return {"eval_loss": loss / images, "eval_top1": top1 / images, f"eval_top{TOP_K}": top5 / images, **whitebox}


class Evaluation(Callback):
    """Evaluates every `train.eval_interval` steps and after the last step; the callbacks see the
    metrics through on_eval (the weight average adds its own pass, the log records them)."""

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        every = loop.cfg.train.eval_interval
        if loop.at_end or every and loop.step % every == 0:
            metrics = loop.task.evaluate(loop.engine)
            if metrics:  # an unevaluated run (shards without data.val_urls) has none
                loop.callbacks.on_eval(loop, metrics)


def build_task(cfg: Config, model: nn.Module, dist_info: DistInfo, worker_init: Callable[[int], None] | None) -> Task:
    if isinstance(model, ImageClassifier):
        return ImageClassification(cfg, dist_info, worker_init, model.n_tokens)
    return LanguageModelling(cfg, dist_info, worker_init)
