"""Every engine trains the same run the same way: parity, accumulation, bf16 save/load.

Engines are driven directly through the Engine interface on fixed batches (the data pipeline
is tested elsewhere), in real local worlds of 1 or 2 processes with gloo.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.engines import build_engine
from pretrain.launch import run_local_world
from pretrain.trainer import seed_everything

SEQ_LEN, ALPHABET = 16, 16
TINY_MODEL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", f"model.seq_len={SEQ_LEN}"]


def config(model: str, engine: list[str], global_batch: int = 8, micro: int = 2, lr: float = 3e-3):
    return load_config([f"+exp={model}_smoke", *TINY_MODEL, *engine, "engine.precision=fp32",
                        f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}",
                        f"optim.lr={lr}", "optim.warmup_steps=2", "optim.decay_steps=10"])


def global_batches(steps: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Fixed token blocks (size, SEQ_LEN + 1) for each step, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    # A small alphabet gives the model something to learn within a few steps.
    return [torch.randint(0, ALPHABET, (size, SEQ_LEN + 1), generator=g) for _ in range(steps)]


def rank_micro_batches(block: torch.Tensor, rank: int, world: int, micro: int) -> list[dict]:
    """This rank's share of a global batch, cut into micro-batches (rank-major, like a sampler)."""
    mine = block.chunk(world)[rank]
    return [{"input_ids": m[:, :-1], "labels": m[:, 1:]} for m in mine.split(micro)]


def mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def train(dist_info, cfg, blocks):
    seed_everything(cfg.train.seed)
    from pretrain.models import build_model

    engine = build_engine(build_model(cfg.model), cfg, dist_info)
    losses = []
    for block in blocks:
        micro = rank_micro_batches(block, dist_info.rank, dist_info.world_size, cfg.train.micro_batch_size)
        losses.append(mean_over_ranks(engine.train_step(micro).loss))
    return engine, losses


def run_engines(dist_info, model, variants, steps, global_batch, micro):
    """Each engine variant trained on the same batches; rank 0 returns {label: (losses, weights)}."""
    blocks = global_batches(steps, global_batch)
    out = {}
    for label, overrides in variants.items():
        engine, losses = train(dist_info, config(model, overrides, global_batch, micro), blocks)
        out[label] = (losses, engine.full_state_dict())
    return out if dist_info.rank == 0 else None


def weight_errors(weights: dict, ref: dict) -> tuple[float, dict[str, float]]:
    """Relative error of the whole model and of each tensor, in norm.

    Summing gradients in another order (all-reduce vs one process) is fp32 rounding; Adam,
    dividing by sqrt(v), turns it into ~1e-5 moves of elements whose gradient is near zero (the
    key bias has an exactly-zero one: softmax ignores a shift of every key). The model as a whole
    agrees to 1e-5; a real engine bug (a wrong averaging factor, a missed clip) is ~1e-1.
    """
    diff = {k: weights[k].double() - v.double() for k, v in ref.items()}
    total = sum(d.square().sum() for d in diff.values()).sqrt() / sum(v.double().square().sum() for v in ref.values()).sqrt()
    return total.item(), {k: (d.norm() / ref[k].double().norm()).item() for k, d in diff.items()}


TWO_RANK_ENGINES = {
    "ddp": ["engine=ddp"],
    "zero1": ["engine=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine=deepspeed", "engine.zero_stage=3"],
    "fsdp": ["engine=fsdp"],
    "fsdp+ac": ["engine=fsdp", "engine.activation_checkpointing=full"],
    "zero3+ac": ["engine=deepspeed", "engine.zero_stage=3", "engine.activation_checkpointing=every_k"],
}


@pytest.mark.parametrize("model", ["tost_gpt2", "gpt2"])
def test_all_engines_take_the_same_steps(model):
    steps, global_batch, micro = 10, 8, 2
    (reference,) = run_local_world(run_engines, 1, model, {"single": ["engine=ddp"]}, steps, global_batch, micro)
    ref_losses, ref_weights = reference["single"]
    assert ref_losses[-1] < ref_losses[0] - 0.5, ref_losses  # it learns, so agreement means something
    results = run_local_world(run_engines, 2, model, TWO_RANK_ENGINES, steps, global_batch, micro)[0]
    for label, (losses, weights) in results.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), label
        assert set(ref_weights) <= set(weights), (label, set(ref_weights) - set(weights))
        total, per_tensor = weight_errors(weights, ref_weights)
        assert total < 1e-5, (label, total)
        worst = max(per_tensor, key=per_tensor.get)
        assert per_tensor[worst] < 1e-3, (label, worst, per_tensor[worst])
