"""What a model learns from and how it is judged: language modelling or image classification.

The trainer asks its task for the training batches, the size of a sample in tokens (for
throughput and MFU) and an evaluation; it knows neither the data formats nor the metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config
from pretrain.data import build_image_loader, build_text_loader
from pretrain.data.loader import Batch, ShardLoader
from pretrain.data.mixing import BatchMixer
from pretrain.distributed import DistInfo
from pretrain.engines.base import Engine
from pretrain.models.vision import ImageClassifier
from pretrain.whitebox import Probe

TOP_K = 5  # eval_top5


class Task:
    tokens_per_sample: int

    def train_loader(self) -> ShardLoader:
        raise NotImplementedError

    def batches(self, loader: ShardLoader) -> Iterator[Batch]:
        """The training loader's micro-batches as the model takes them."""
        return iter(loader)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Collective: metrics on held-out data (none by default)."""
        return {}


class LanguageModelling(Task):
    def __init__(self, cfg: Config, dist_info: DistInfo, worker_init: Callable[[int], None]) -> None:
        self.cfg, self.dist, self.worker_init = cfg, dist_info, worker_init
        self.tokens_per_sample = cfg.model.seq_len

    def train_loader(self) -> ShardLoader:
        cfg, world = self.cfg, self.dist
        return build_text_loader(cfg.data, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                                 batch_size=cfg.train.micro_batch_size, rank=world.rank, world_size=world.world_size,
                                 local_rank=world.local_rank, seed=cfg.train.seed, worker_init=self.worker_init)


class ImageClassification(Task):
    def __init__(self, cfg: Config, dist_info: DistInfo, worker_init: Callable[[int], None],
                 tokens_per_image: int) -> None:
        self.cfg, self.dist, self.worker_init = cfg, dist_info, worker_init
        self.tokens_per_sample = tokens_per_image
        self._val: ShardLoader | None = None

    def _loader(self, train: bool) -> ShardLoader:
        cfg, world = self.cfg, self.dist
        return build_image_loader(cfg.data, image_size=cfg.model.image_size, batch_size=cfg.train.micro_batch_size,
                                  rank=world.rank, world_size=world.world_size, local_rank=world.local_rank,
                                  seed=cfg.train.seed, train=train, worker_init=self.worker_init)

    def train_loader(self) -> ShardLoader:
        return self._loader(train=True)

    def batches(self, loader: ShardLoader) -> Iterator[Batch]:
        """Mixup / CutMix (data.image.*) applied to each micro-batch, drawn from its index in
        the run: this rank's turn in the run's sequence, the same on any layout."""
        image, stream = self.cfg.data.image, loader.stream
        mixer = BatchMixer(image.mixup_alpha, image.cutmix_alpha, image.mix_prob, image.cutmix_switch_prob,
                           self.cfg.model.num_classes, self.cfg.train.seed)
        if not mixer.active:
            yield from loader
            return
        for batch in loader:
            yield mixer(batch, stream.batches - stream.world_size + stream.rank)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy over one pass of the validation set. Ranks hold
        different numbers of batches but a sharded model's forward is collective: every rank
        steps until all are done, one that has run out feeding a dummy image that is not counted."""
        if self._val is None:
            self._val = self._loader(train=False)
        size = self.cfg.model.image_size
        dummy = {"images": torch.zeros(1, 3, size, size), "labels": torch.tensor([-1])}
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-k hits, images
        probe = Probe(engine.model)  # white-box measures, on each rank's first batch
        batches = iter(self._val)
        while True:
            batch = next(batches, None)
            if not _any_rank(batch is not None, self.dist.device):
                break
            measure = batch is not None and not probe.values
            batch = batch or dummy
            with probe if measure else contextlib.nullcontext():
                logits = engine.predict(batch).float().cpu()
            labels = batch["labels"]
            counted = labels >= 0
            logits, labels = logits[counted], labels[counted]
            best = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices  # (B, k)
            totals += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0,
                                    (best[:, 0] == labels).sum().item(), (best == labels[:, None]).any(1).sum().item(),
                                    len(labels)], dtype=torch.float64)
        totals = totals.to(self.dist.device)
        dist.all_reduce(totals)
        loss, top1, top5, images = totals.tolist()
        return {"eval_loss": loss / images, "eval_top1": top1 / images, f"eval_top{TOP_K}": top5 / images,
                **_mean_over_ranks(probe.metrics(), self.dist)}


def _mean_over_ranks(metrics: dict[str, float], dist_info: DistInfo) -> dict[str, float]:
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist_info.world_size).tolist()))


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([flag], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def build_task(cfg: Config, model: nn.Module, dist_info: DistInfo, worker_init: Callable[[int], None]) -> Task:
    if isinstance(model, ImageClassifier):
        return ImageClassification(cfg, dist_info, worker_init, model.n_tokens)
    return LanguageModelling(cfg, dist_info, worker_init)
