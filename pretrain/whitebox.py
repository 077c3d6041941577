"""White-box measurements: what each layer of a CRATE or ToST model does to its tokens.

- Compression (docs/models.md): Rc = 1/2 sum_k logdet(I_p + p / (N eps2) W_k^T W_k), with
  W_k (N, p) the head-k projection, by the layer's U, of LN1-normed tokens whose rows are then
  unit-normed. `rc_in` is taken on the tokens entering the attention step, `rc_out` on those
  leaving it (Z + attention, normed by the same LN1, projected by the same U): the drop is the
  layer's compression.
- Sparsity of CRATE's ISTA output: the fraction of exact zeros.
- ToST: the entropy of the memberships pi over heads, mean over tokens.

They are measured on one forward pass through forward hooks, so model code knows nothing of
them; layers without a subspace projection U (softmax attention) have nothing to measure.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import Tensor, nn

from pretrain.callbacks import Callback, LoopState
from pretrain.models.contract import PretrainModel, SparseCodingBlock, TokenStatisticsAttention, is_whitebox
from pretrain.models.layers import split_heads
from pretrain.models.tost import CausalTSSA, token_statistics

EPS2 = 0.01  # the coding precision eps^2 of docs/models.md
MEASURES = ("rc_in", "rc_out", "sparsity", "pi_entropy")


def coding_rate(w: Tensor, eps2: float = EPS2) -> Tensor:
    """Rc per sample (B,) of head projections w (B, K, N, p), in fp64 through a Cholesky logdet."""
    w = w.double()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # unit rows
    N, p = w.shape[-2:]
    gram = w.transpose(-1, -2) @ w  # (B, K, p, p)
    eye = torch.eye(p, dtype=torch.float64, device=w.device)
    cholesky = torch.linalg.cholesky(eye + (p / (N * eps2)) * gram)
    logdet = 2 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B, K)
    return 0.5 * logdet.sum(-1)


def membership_entropy(pi: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of pi (B, K, N) over the head axis."""
    pi = pi.double()
    return -(pi * pi.clamp_min(1e-30).log()).sum(1).mean()


class Probe:
    """Hooks on every white-box block of `model` (its mixer projects onto subspaces; see
    pretrain/models/contract.py): within the `with` block, each forward pass records the
    measures per layer (`values`)."""

    def __init__(self, model: PretrainModel) -> None:
        self.blocks = [(i, b) for i, b in enumerate(model.blocks) if is_whitebox(b)]
        self.values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._handles: list = []

    def __enter__(self) -> Probe:
        for i, block in self.blocks:
            self._handles.append(block.attn.register_forward_pre_hook(self._attention_input(i, block)))
            self._handles.append(block.ln_2.register_forward_pre_hook(self._attention_output(i, block)))
            if isinstance(block, SparseCodingBlock):
                self._handles.append(block.ista.register_forward_hook(self._sparsity(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _heads(self, block: nn.Module, normed: Tensor) -> Tensor:
        return split_heads(block.attn.U(normed), block.attn.n_head)  # (B, K, N, p)

    def _attention_input(self, i: int, block: nn.Module):
        def hook(attn: nn.Module, args: tuple) -> None:
            w = self._heads(block, args[0])
            self.values["rc_in"][i].append(coding_rate(w).mean().item())
            if isinstance(attn, TokenStatisticsAttention):  # the memberships it computes from the same w
                _, pi = token_statistics(
                    w, attn.temp, causal=isinstance(attn, CausalTSSA), denom_bias=getattr(attn, "denom_bias", None)
                )
                self.values["pi_entropy"][i].append(membership_entropy(pi).item())

        return hook

    def _attention_output(self, i: int, block: nn.Module):
        def hook(ln_2: nn.Module, args: tuple) -> None:
            w = self._heads(block, block.ln_1(args[0]))
            self.values["rc_out"][i].append(coding_rate(w).mean().item())

        return hook

    def _sparsity(self, i: int):
        def hook(ista: nn.Module, args: tuple, out: Tensor) -> None:
            self.values["sparsity"][i].append((out == 0).double().mean().item())

        return hook

    def metrics(self) -> dict[str, float]:
        """{"<measure>_layer<ii>": mean over the recorded passes}."""
        return {
            f"{name}_layer{i:02d}": sum(v) / len(v) for name, layers in self.values.items() for i, v in layers.items()
        }


class WhiteboxPlot(Callback):
    """After the last evaluation of a run, its measures against depth as the MLflow artifact
    whitebox.png (rank 0, which holds the averaged measures)."""

    def on_eval(self, loop: LoopState, metrics: dict[str, float]) -> None:
        if not (loop.at_end and loop.dist.is_main):
            return
        title = f"{loop.cfg.model.name}, step {loop.step}"
        path = plot(metrics, title, os.path.join(os.path.abspath(loop.cfg.run_dir), "whitebox.png"))
        if path:
            loop.tracker.log_artifact(path)


def plot(metrics: dict[str, float], title: str, path: str) -> str | None:
    """One PNG of each measure against depth (layer index); None when there is nothing to plot."""
    per_measure = {
        m: sorted((int(k.rsplit("layer", 1)[1]), v) for k, v in metrics.items() if k.startswith(m + "_layer"))
        for m in MEASURES
    }
    panels = [
        ("compression Rc (nats)", ("rc_in", "rc_out")),
        ("ISTA sparsity", ("sparsity",)),
        ("pi entropy (nats)", ("pi_entropy",)),
    ]
    panels = [(label, [m for m in names if per_measure[m]]) for label, names in panels]
    panels = [(label, names) for label, names in panels if names]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (label, names) in zip(axes[0], panels, strict=True):
        for name in names:
            layers, values = zip(*per_measure[name], strict=True)
            ax.plot(layers, values, marker="o", label=name)
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
