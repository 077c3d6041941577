"""GPT-2: the causal LM skeleton with multi-head softmax attention (the baseline)."""

from __future__ import annotations

from functools import partial

from pretrain.config import ModelConfig
from pretrain.models.attention import SelfAttention
from pretrain.models.lm import CausalLM


class GPT2LM(CausalLM):
    """GPT-2 language model: the causal LM skeleton with causal softmax attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, mixer=partial(SelfAttention, causal=True, n_tokens=cfg.seq_len))
