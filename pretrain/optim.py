"""AdamW or Lion with weight-decay groups, and the warmup + cosine schedule, shared by every engine."""

from __future__ import annotations

import math

import torch

from pretrain.config import OptimConfig
from pretrain.models.contract import PretrainModel


def param_groups(model: PretrainModel, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases, LayerScale gains (all 1-D) and whatever the model
    names in `no_weight_decay()` (position table, TSSA's `temp` and `denom_bias`) are exempt."""
    exempt = {id(model.get_parameter(name)) for name in model.no_weight_decay()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("adamw", "lion")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): each coordinate
    moves by lr in the sign of an interpolation of momentum and gradient; the momentum then
    takes the gradient with the slower beta2. Weight decay is decoupled, as in AdamW."""

    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(momentum * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                momentum.lerp_(p.grad, 1 - beta2)


def build_optimizer(model: PretrainModel, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """`optim.name`'s optimizer over the weight-decay groups. `fused` (the engines set it where the
    optimizer steps on a GPU): AdamW's single-kernel step, the fastest torch has, in place of a
    kernel per tensor; the same update up to rounding. Off, AdamW is torch's default."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Linear warmup to `lr` over `warmup_steps`, cosine decay to `min_lr` at `decay_steps`, then
    flat. The schedule depends only on these fields, never on how long a given run lasts, so a
    run stopped and resumed follows the same curve.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
