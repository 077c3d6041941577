"""Model registry: `cfg.model.name` -> a model that keeps the contract of `contract.py`."""

from __future__ import annotations

from collections.abc import Callable

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.models.contract import PretrainModel, check_model
from pretrain.models.crate import CRATE
from pretrain.models.gpt import GPT2LM
from pretrain.models.lm import CausalLM
from pretrain.models.tost import ToSTLM, check_impl
from pretrain.models.tost_vision import tost_vision
from pretrain.models.vision import ImageClassifier
from pretrain.models.vit import ViT

LANGUAGE_MODELS: dict[str, type[CausalLM]] = {"tost": ToSTLM, "gpt2": GPT2LM}
VISION_MODELS: dict[str, Callable[[ModelConfig], ImageClassifier]] = {
    "crate": CRATE,
    "vit": ViT,
    "tost_vision": tost_vision,
}
MODELS = {**LANGUAGE_MODELS, **VISION_MODELS}
GELU_APPROXIMATIONS = ("none", "tanh")  # torch's nn.GELU(approximate=...)


def build_model(cfg: ModelConfig) -> PretrainModel:
    """Build the model `cfg.name` names, after checking what the config alone can tell."""
    if cfg.name not in MODELS:
        raise UserError(f"model.name={cfg.name!r} is unknown; valid names: {', '.join(MODELS)}")
    if cfg.n_embd % cfg.n_head != 0:
        raise UserError(f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head}")
    if cfg.gelu_approximate not in GELU_APPROXIMATIONS:
        choices = ", ".join(GELU_APPROXIMATIONS)
        raise UserError(f"model.gelu_approximate={cfg.gelu_approximate!r} is not one of {choices}")
    check_impl(cfg.tssa_impl)
    model = MODELS[cfg.name](cfg)
    check_model(model)
    return model
