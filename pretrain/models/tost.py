"""Token Statistics Transformer (ToST): attention replaced by Token Statistics Self-Attention.

TSSA has no queries or keys: each head scores a token by its share of the head's per-coordinate
energy, turns the scores into memberships pi over heads, and shrinks the token by the
pi-weighted second moment of its head. Cost is O(T * D); no T x T tensor is ever formed.
Causal TSSA uses inclusive prefix statistics (s <= t), computed with cumsum.

The statistics have three implementations of one function, picked by `model.tssa_impl`: eager
(`token_statistics`, the formula of docs/models.md, the reference the tests hold the others to),
fused (one chunked operator with a hand-written backward, pretrain/models/tssa_fused.py) and
triton (GPU kernels, pretrain/models/tssa_triton.py). They share the parameters, so a checkpoint
does not depend on the one that trained it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from pretrain.batch import document_ids
from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.models.layers import TokenMixer, merge_heads, split_heads
from pretrain.models.lm import CausalLM
from pretrain.models.tssa import TSSAState, prefix_state, token_statistics, token_statistics_step
from pretrain.models.tssa_fused import projected_token_statistics_fused, token_statistics_fused

TSSA_IMPLS = ("auto", "eager", "fused", "triton")  # model.tssa_impl
Statistics = Callable[..., tuple[Tensor, Tensor]]  # token_statistics' signature


def check_impl(impl: str) -> None:
    """Refuses, in one line, a model.tssa_impl that names no implementation."""
    if impl not in TSSA_IMPLS:
        raise UserError(f"model.tssa_impl={impl!r} is not one of {', '.join(TSSA_IMPLS)}")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation model.tssa_impl means for tensors on `device` (auto: triton on CUDA
    where the triton package imports, else fused); refuses, in one line, one that cannot run."""
    check_impl(impl)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_reason() is None else "fused"
    if impl == "triton":
        reason = _triton_reason()
        if reason is None and device.type != "cuda" and torch.cuda.is_available():
            reason = f"model.tssa_impl=triton needs CUDA tensors and this model is on {device}; use fused or auto"
        if reason is not None:
            raise UserError(reason)
    return impl


def statistics_impl(impl: str, device: torch.device) -> Statistics:
    """The `token_statistics` of the implementation model.tssa_impl names, for tensors on `device`."""
    impl = resolve_impl(impl, device)
    if impl == "triton":
        return _triton().token_statistics_triton
    return token_statistics_fused if impl == "fused" else token_statistics


def _triton():  # noqa: ANN202 (a module)
    """pretrain.models.tssa_triton, imported on first use: the triton package is optional."""
    from pretrain.models import tssa_triton

    return tssa_triton


def _triton_reason() -> str | None:
    """None when the Triton kernels can run here, else why not, in one line."""
    try:
        return _triton().available()
    except ImportError as err:
        return f"model.tssa_impl=triton needs the triton package ({err}); pip install triton, or use fused"


def tssa(w: Tensor, temp: Tensor) -> Tensor:
    """Non-causal TSSA core (vision), the reference: w (B, K, N, p), temp (K, 1) -> c (B, K, N, p)."""
    return token_statistics(w, temp, causal=False)[0]


def causal_tssa(w: Tensor, temp: Tensor, denom_bias: Tensor) -> Tensor:
    """Causal TSSA core, the reference: token t sees statistics of tokens s <= t; denom_bias (K, max_seq_len)."""
    return token_statistics(w, temp, causal=True, denom_bias=denom_bias)[0]


class TSSAOutput(nn.Linear):
    """A TSSA layer's out_proj, Linear(D, D). Called on the merged heads (B, T, D) it is a Linear;
    called on the projected tokens w (B, K, T, p) with the statistics' parameters, it runs TSSA
    first, and with the fused implementation both in one operator whose backward keeps w instead
    of c (one (B, T, D) activation fewer per layer). TSSA runs inside this module's forward so
    that an engine which gathers a module's parameters around its forward (ZeRO-3) has gathered
    the weight that operator reads."""

    def forward(
        self,
        x: Tensor,
        temp: Tensor | None = None,
        denom_bias: Tensor | None = None,
        *,
        causal: bool = False,
        impl: str = "eager",
        document_ids: Tensor | None = None,
    ) -> Tensor:
        if temp is None:
            return super().forward(x)
        impl = resolve_impl(impl, x.device)
        stats = {"causal": causal, "denom_bias": denom_bias, "document_ids": document_ids}
        if impl == "fused":
            return projected_token_statistics_fused(x, temp, self, **stats)
        c, _ = statistics_impl(impl, x.device)(x, temp, **stats)
        return super().forward(merge_heads(c))


class TSSA(TokenMixer):
    """Non-causal TSSA layer (vision): shared projection U, per-head temperature, out_proj."""

    def __init__(self, cfg: ModelConfig, out_bias: bool = True) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.tssa_impl = cfg.tssa_impl
        self.U = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.temp = nn.Parameter(torch.ones(cfg.n_head, 1))
        self.out_proj = TSSAOutput(cfg.n_embd, cfg.n_embd, bias=out_bias)

    def forward(self, x: Tensor) -> Tensor:
        w = split_heads(self.U(x), self.n_head)  # (B, K, N, p)
        return self.out_proj(w, self.temp, causal=False, impl=self.tssa_impl)

    def flops_per_token(self) -> float:
        # Forward does ~12 elementwise ops per coordinate of w (square, 2 sums over tokens, clamp,
        # 3 divisions, 2 products, coordinate sum, 1 + m, sign); per-head softmax work is O(K),
        # negligible. Backward ~2x forward, so 3 * 12 = 36 FLOPs per coordinate: 36 * D per token.
        # The causal form does the same with prefix sums in place of sums.
        return 36 * self.n_embd

    def no_weight_decay(self) -> set[str]:
        return {"temp"}


class CausalTSSA(TSSA):
    """Causal TSSA layer (language): TSSA over each prefix, with a learned positional prior on
    the head memberships (denom_bias)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, out_bias=cfg.bias)
        self.denom_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.seq_len))

    def forward(self, x: Tensor, document_ids: Tensor | None = None) -> Tensor:
        """x (B, T, D); with document_ids (B, T), the statistics restart at each document."""
        w = split_heads(self.U(x), self.n_head)  # (B, K, T, p)
        return self.out_proj(w, self.temp, self.denom_bias, causal=True, impl=self.tssa_impl, document_ids=document_ids)

    def prefill(self, x: Tensor, document_ids: Tensor | None = None) -> tuple[Tensor, TSSAState]:
        """`forward` on a whole prompt x (B, T, D), and the recurrent state after it: what T calls
        of `step` would give, in one parallel pass; with document_ids, the state of each row's
        last document."""
        w = split_heads(self.U(x), self.n_head)  # (B, K, T, p)
        statistics = statistics_impl(self.tssa_impl, w.device)
        c, pi = statistics(w, self.temp, causal=True, denom_bias=self.denom_bias, document_ids=document_ids)
        return self.out_proj(merge_heads(c)), prefix_state(w, pi, document_ids)

    def init_state(self, batch: int, device: torch.device) -> TSSAState:
        p = self.n_embd // self.n_head
        zeros = partial(torch.zeros, dtype=torch.float32, device=device)
        return TSSAState(zeros(batch, self.n_head, p), zeros(batch, self.n_head, p), zeros(batch, self.n_head))

    def step(self, x: Tensor, state: TSSAState) -> Tensor:
        """The recurrent form: x (B, 1, D), the next token, -> its output (B, 1, D), updating
        `state` in place; equal to `forward` on the whole prefix at that position, to rounding."""
        w = split_heads(self.U(x), self.n_head)[:, :, 0]  # (B, K, p)
        c = token_statistics_step(w, self.temp, self.denom_bias, state)  # (B, K, p)
        return self.out_proj(merge_heads(c.unsqueeze(2).to(x.dtype)))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"denom_bias"}


def restart_after_eos(states: list[TSSAState], tokens: Tensor, eos_id: int) -> None:
    """Every layer's state restarts in the rows whose last token (tokens (B,)) is EOS."""
    for state in states:
        state.restart(tokens == eos_id)


class ToSTLM(CausalLM):
    """ToST language model: the GPT-2 skeleton with causal TSSA as the token mixer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, mixer=CausalTSSA)

    def init_states(self, batch: int) -> list[TSSAState]:
        device = self.wte.weight.device
        return [block.attn.init_state(batch, device) for block in self.blocks]

    def step(self, tokens: Tensor, states: list[TSSAState], eos_id: int | None = None) -> Tensor:
        """Next-token logits (B, V) after `tokens` (B,), at position states[0].t, in O(D) per
        layer: no earlier token is looked at again. With eos_id, a row whose token is EOS starts a
        new document at the next token (its states restart), as `document_ids` has it in forward."""
        t = states[0].t
        if t >= self.seq_len:
            raise ValueError(f"position {t} is past model.seq_len={self.seq_len} (the position table)")
        x = self.wte(tokens)[:, None] + self.wpe.weight[t]  # (B, 1, D)
        for block, state in zip(self.blocks, states, strict=True):
            x = block(x, state)
        if eos_id is not None:
            restart_after_eos(states, tokens, eos_id)
        return self.lm_head(self.ln_f(x))[:, 0]

    def prefill(self, prompt: Tensor, eos_id: int | None = None) -> tuple[Tensor, list[TSSAState]]:
        """Next-token logits (B, V) after prompt (B, T0), and every layer's recurrent state after
        it, from one parallel forward: what T0 calls of `step` give, without T0 sequential steps.
        With eos_id, the prompt's documents are kept apart (`document_ids`) and the states are
        those of each row's last document (restarted if the prompt ends with EOS)."""
        if prompt.shape[1] == 0:
            raise ValueError("an empty prompt: generation needs at least one token to start from")
        ids = None if eos_id is None else document_ids(prompt, eos_id)
        x = self.embed(prompt)  # (B, T0, D)
        states = []
        for block in self.blocks:
            mixed, state = block.attn.prefill(block.ln_1(x), ids)
            x = block.after_mixer(x, mixed)
            states.append(state)
        if eos_id is not None:
            restart_after_eos(states, prompt[:, -1], eos_id)
        return self.lm_head(self.ln_f(x[:, -1])), states

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
    ) -> Tensor:
        """prompt (B, T0) followed by `max_new_tokens` sampled tokens (B, T0 + new). The prompt
        is read by one parallel forward (`prefill`), then each new token by `step`; temperature 0
        takes the most likely token. With eos_id, each EOS ends a document: what follows it sees
        nothing before it (the model trained with data.document_mask)."""
        logits, states = self.prefill(prompt, eos_id)
        out = [prompt]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            out.append(token[:, None])
            logits = self.step(token, states, eos_id)
        return torch.cat(out, dim=1)
