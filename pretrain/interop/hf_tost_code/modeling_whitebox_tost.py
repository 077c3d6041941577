"""A ToST causal language model for Hugging Face transformers, exported by whitebox-pretrain
(tools/convert.py export-hf); loads with
AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).

The parameters carry the training code's names, so the weights load unchanged. The TSSA math is
`tssa.py` beside this file, a verbatim copy of the training code's pretrain/models/tssa.py.
`generate()` caches causal TSSA's recurrent state, the prefix sums S, M and P of every layer and
head: the prompt is read in one parallel pass, then each new token costs O(width) per layer,
whatever its position. Batches must be unpadded (an all-ones attention mask, or none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_whitebox_tost import ToSTConfig
from .tssa import TSSAState, prefix_state, token_statistics, token_statistics_step


class ToSTState:
    """generate()'s cache: one TSSAState per layer."""

    def __init__(self, layers: list[TSSAState]) -> None:
        self.layers = layers

    @property
    def t(self) -> int:
        """Tokens read so far."""
        return self.layers[0].t


@dataclass
class ToSTCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    tssa_state: ToSTState | None = None


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, n_head, D // n_head).transpose(1, 2)  # (B, K, T, p)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, K, T, p = x.shape
    return x.transpose(1, 2).reshape(B, T, K * p)


class CausalTSSA(nn.Module):
    def __init__(self, config: ToSTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.U = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.temp = nn.Parameter(torch.ones(config.n_head, 1))
        self.denom_bias = nn.Parameter(torch.zeros(config.n_head, config.seq_len))
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(
        self, x: torch.Tensor, state: TSSAState | None, use_cache: bool
    ) -> tuple[torch.Tensor, TSSAState | None]:
        """x (B, T, D): a sequence read in parallel (state None), or tokens that continue `state`."""
        w = split_heads(self.U(x), self.n_head)  # (B, K, T, p)
        if state is None:
            c, pi = token_statistics(w, self.temp, causal=True, denom_bias=self.denom_bias)
            state = prefix_state(w, pi) if use_cache else None
        else:
            steps = [token_statistics_step(w[:, :, i], self.temp, self.denom_bias, state) for i in range(w.shape[2])]
            c = torch.stack(steps, dim=2).to(x.dtype)
        return self.out_proj(merge_heads(c)), state


class LayerScale(nn.Module):
    def __init__(self, config: ToSTConfig) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((config.n_embd,), float(config.layerscale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class MLP(nn.Module):
    def __init__(self, config: ToSTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.out_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: ToSTConfig) -> None:
        super().__init__()
        scale = LayerScale if config.layerscale_init is not None else (lambda _: nn.Identity())
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalTSSA(config)
        self.ls_1 = scale(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.ls_2 = scale(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, state: TSSAState | None, use_cache: bool
    ) -> tuple[torch.Tensor, TSSAState | None]:
        mixed, state = self.attn(self.ln_1(x), state, use_cache)
        x = x + self.ls_1(self.drop(mixed))
        return x + self.ls_2(self.drop(self.mlp(self.ln_2(x)))), state


class ToSTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ToSTConfig
    base_model_prefix = "tost"
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}
    _is_stateful = True  # the cache cannot be cropped or reordered: no beam search, no assisted decoding

    def __init__(self, config: ToSTConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.seq_len, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Exported weights are loaded whole: nothing is left to initialise."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is TSSA's state, made by forward itself

    def forward(
        self,
        input_ids: torch.LongTensor,
        tssa_state: ToSTState | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ToSTCausalLMOutput:
        """Logits (B, T, V) for input_ids (B, T): the whole sequence, or with `tssa_state` the
        tokens that follow what it has read. `labels` are shifted inside, as transformers does."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("this ToST model reads unpadded batches only: the attention mask must be all ones")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        t0 = 0 if tssa_state is None else tssa_state.t
        T = input_ids.shape[1]
        if t0 + T > self.config.seq_len:
            raise ValueError(f"{t0 + T} tokens are more than the model's {self.config.seq_len} positions")
        positions = torch.arange(t0, t0 + T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        states = []
        for i, block in enumerate(self.blocks):
            x, state = block(x, None if tssa_state is None else tssa_state.layers[i], use_cache)
            states.append(state)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        cache = (tssa_state or ToSTState(states)) if use_cache else None
        return ToSTCausalLMOutput(loss=loss, logits=logits, tssa_state=cache)

    def prepare_inputs_for_generation(
        self, input_ids, tssa_state=None, attention_mask=None, use_cache=None, **kwargs
    ) -> dict:
        """Only the tokens the cached state has not read yet."""
        if tssa_state is not None:
            input_ids = input_ids[:, tssa_state.t :]
        return {"input_ids": input_ids, "tssa_state": tssa_state, "attention_mask": attention_mask} | {
            "use_cache": use_cache
        }

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["tssa_state"] = outputs.tssa_state
        return model_kwargs
