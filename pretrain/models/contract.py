"""The model contract: what engines, the trainer, the optimizer and the white-box probe may rely
on in a model, and nothing more. `build_model` checks every model against it, so a new model
that breaks it fails when it is built, not deep inside an engine."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class PretrainModel(Protocol):
    """What `build_model` returns.

    - `blocks`: the repeated layers, in order. Engines shard, wrap, checkpoint and compile each
      one as a unit; whatever is outside them (embeddings, head) is the root's.
    - `forward(inputs, labels)`: the scalar training loss; without labels, the logits. A batch
      is the dict of forward's keyword arguments (language models also take `document_ids`).
    - `flops_per_token()`: training FLOPs per token (forward + backward), for MFU.
    - `num_params()`: the parameter count to report (papers' convention).
    - `no_weight_decay()`: names of matrix-shaped parameters the optimizer must not decay.
    """

    blocks: nn.ModuleList

    def forward(self, inputs: Tensor, labels: Tensor | None = None) -> Tensor: ...

    def flops_per_token(self) -> float: ...

    def num_params(self) -> int: ...

    def no_weight_decay(self) -> set[str]: ...


@runtime_checkable
class SubspaceAttention(Protocol):
    """A token mixer that projects tokens onto per-head subspaces (MSSA, TSSA): `U` stacks the
    K bases, (D, D) as a Linear, and `n_head` is K."""

    U: nn.Linear
    n_head: int


@runtime_checkable
class TokenStatisticsAttention(SubspaceAttention, Protocol):
    """TSSA: `temp` (K, 1) scales the memberships; a causal one may add a learned `denom_bias`."""

    temp: nn.Parameter


@runtime_checkable
class WhiteboxBlock(Protocol):
    """A block the white-box probe measures: `ln_1` normalises what `attn` (a SubspaceAttention)
    mixes, and `ln_2` is the first module to see the residual stream after the mixing."""

    ln_1: nn.Module
    attn: nn.Module
    ln_2: nn.Module


@runtime_checkable
class SparseCodingBlock(WhiteboxBlock, Protocol):
    """A CRATE block: `ista` is the sparse-coding step, whose output's zeros the probe counts."""

    ista: nn.Module


def is_whitebox(block: nn.Module) -> bool:
    """Whether the probe measures this block: its mixer projects onto subspaces."""
    return isinstance(getattr(block, "attn", None), SubspaceAttention)


def check_model(model: nn.Module) -> None:
    """Raise TypeError naming what `model` lacks of the contract (a programming error, not a
    user's: every registered model is tested against it)."""
    name = type(model).__name__
    if not isinstance(model, PretrainModel):
        members = [*PretrainModel.__annotations__, *(k for k in vars(PretrainModel) if not k.startswith("_"))]
        missing = [m for m in members if not hasattr(model, m)]
        raise TypeError(f"{name} is not a PretrainModel (pretrain/models/contract.py): it lacks {', '.join(missing)}")
    if not isinstance(model.blocks, nn.ModuleList):
        raise TypeError(f"{name}.blocks is a {type(model.blocks).__name__}, not the nn.ModuleList engines wrap")
    for i, block in enumerate(model.blocks):
        if is_whitebox(block) and not isinstance(block, WhiteboxBlock):
            raise TypeError(f"{name}.blocks[{i}] has a subspace attention but not the ln_1 and ln_2 of a WhiteboxBlock")
