"""Our GPT-2 baseline <-> Hugging Face transformers' GPT2LMHeadModel, both ways, exactly.

The two are the same network: learned positions, pre-norm blocks, fused q|k|v projection, MLP of
ratio 4, final LayerNorm, head tied to the token embedding. They differ in layout only:
- transformers keeps GPT-2's original Conv1D, whose weight is (in, out): our Linear's transposed;
- its blocks always have biases: a model trained with model.bias=false exports zeros there, and
  imports only when they are zeros;
- its activation is a name: our exact GELU is "gelu", our tanh GELU "gelu_pytorch_tanh" (the
  same torch kernel); the original GPT-2's "gelu_new" is the same formula, imported as tanh;
- it has no LayerScale, which a model with model.layerscale_init set cannot lose: refused.
The vocabulary is the model's (50304, GPT-2's 50257 padded) and the tokenizer GPT-2's files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.data.tokenizer import ENCODER_FILE, ENDOFTEXT, MERGES_FILE, gpt2_files_dir, gpt2_tokenizer
from pretrain.errors import UserError
from pretrain.interop.weights import (
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    Weights,
    read_safetensors,
    write_json,
    write_safetensors,
)

ACTIVATIONS = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}  # model.gelu_approximate -> transformers' name
IMPORTED_ACTIVATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # transformers' (in, out) weights
# Our name in a block -> transformers' name in a block.
BLOCK_NAMES = {
    "ln_1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.out_proj": "attn.c_proj",
    "ln_2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.out_proj": "mlp.c_proj",
}
WHITEBOX_KEY = "whitebox"  # in config.json: the model config and provenance, read back by import-hf
BIASED = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")


def hf_config(model: ModelConfig, provenance: dict[str, Any], dtype: str) -> dict[str, Any]:
    """transformers' GPT2Config for `model`, as config.json holds it."""
    eot = gpt2_tokenizer().eot_token
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": model.seq_len,
        "n_embd": model.n_embd,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_inner": None,
        "activation_function": ACTIVATIONS[model.gelu_approximate],
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.dropout,
        "layer_norm_epsilon": model.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        WHITEBOX_KEY: {"model": asdict(model), "provenance": provenance},
    }


def to_hf(model: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our GPT2LM's state dict -> GPT2LMHeadModel's (the tied head stored once, as wte)."""
    if model.layerscale_init is not None:
        raise UserError(
            f"model.layerscale_init={model.layerscale_init}: transformers' GPT-2 has no LayerScale, so this model "
            "cannot become a GPT2LMHeadModel; use export-safetensors"
        )
    out = {"transformer.wte.weight": tensors["wte.weight"], "transformer.wpe.weight": tensors["wpe.weight"]}
    for i in range(model.n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            weight = tensors[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if theirs in CONV1D else weight
            bias = tensors.get(f"blocks.{i}.{ours}.bias")
            out[f"transformer.h.{i}.{theirs}.bias"] = bias if bias is not None else torch.zeros(len(weight))
    out["transformer.ln_f.weight"] = tensors["ln_f.weight"]
    bias = tensors.get("ln_f.bias")
    out["transformer.ln_f.bias"] = bias if bias is not None else torch.zeros(model.n_embd)
    return out


def export_hf_gpt2(weights: Weights, directory: str, dtype: str, max_shard_bytes: int | None) -> None:
    """A directory that GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load, offline."""
    cast = DTYPES[dtype]
    write_safetensors(
        {k: v.to(cast) for k, v in to_hf(weights.model, weights.tensors).items()}, directory, max_shard_bytes
    )
    write_json(os.path.join(directory, "config.json"), hf_config(weights.model, weights.provenance, dtype))
    write_tokenizer(directory, weights.model.seq_len)


def write_tokenizer(directory: str, max_length: int) -> None:
    """GPT-2's tokenizer files (vocab.json, merges.txt) as transformers names them, and the
    generation defaults: <|endoftext|> begins and ends a text."""
    source = gpt2_files_dir()
    gpt2_tokenizer()  # checks the files' hashes
    shutil.copyfile(source / ENCODER_FILE, os.path.join(directory, "vocab.json"))
    shutil.copyfile(source / MERGES_FILE, os.path.join(directory, "merges.txt"))
    eot = gpt2_tokenizer().eot_token
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    write_json(
        os.path.join(directory, "tokenizer_config.json"),
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False, **special},
    )
    write_json(os.path.join(directory, "special_tokens_map.json"), special)
    write_json(os.path.join(directory, "generation_config.json"), {"bos_token_id": eot, "eos_token_id": eot})


def import_hf_gpt2(directory: str) -> Weights:
    """A local transformers GPT-2 directory (config.json and model.safetensors, sharded or not, or
    pytorch_model.bin) -> our GPT2LM's weights and config."""
    config = _read_json(os.path.join(directory, "config.json"))
    if config.get("model_type") != "gpt2":
        raise UserError(
            f"{directory}/config.json has model_type={config.get('model_type')!r}: import-hf reads GPT-2 only"
        )
    model = _model_config(config, directory)
    state = {k.removeprefix("transformer."): v for k, v in _read_state(directory).items()}
    for key in ("wte.weight", "wpe.weight", "ln_f.weight"):
        if key not in state:
            raise UserError(f"{directory}: the weights lack {key} (transformer.{key}): not a GPT-2 checkpoint")
    tensors = {
        "wte.weight": state["wte.weight"],
        "wpe.weight": state["wpe.weight"],
        "ln_f.weight": state["ln_f.weight"],
    }
    if model.bias:
        tensors["ln_f.bias"] = state["ln_f.bias"]
    for i in range(model.n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            weight = state[f"h.{i}.{theirs}.weight"]
            tensors[f"blocks.{i}.{ours}.weight"] = weight.t().contiguous() if theirs in CONV1D else weight
            if model.bias:
                tensors[f"blocks.{i}.{ours}.bias"] = state[f"h.{i}.{theirs}.bias"]
            elif state[f"h.{i}.{theirs}.bias"].any():
                raise UserError(f"{directory}: h.{i}.{theirs}.bias is not zero, but its model.bias is false")
    tensors["lm_head.weight"] = tensors["wte.weight"]
    tensors = {k: v.float() for k, v in tensors.items()}
    provenance = config.get(WHITEBOX_KEY, {}).get("provenance") or {"source": os.path.abspath(directory)}
    return Weights(model, tensors, provenance)


def _model_config(config: dict[str, Any], directory: str) -> ModelConfig:
    """Our config: the one we exported, or one read off transformers' fields (refusing those we cannot build)."""
    if WHITEBOX_KEY in config:
        return ModelConfig(**config[WHITEBOX_KEY]["model"])
    activation = config.get("activation_function", "gelu_new")
    problems = {
        "activation_function": activation not in IMPORTED_ACTIVATIONS,
        "n_inner": config.get("n_inner") not in (None, 4 * config["n_embd"]),
        "scale_attn_weights": not config.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": config.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": config.get("add_cross_attention", False),
        "tie_word_embeddings": not config.get("tie_word_embeddings", True),
    }
    for field, bad in problems.items():
        if bad:
            raise UserError(f"{directory}/config.json: {field}={config.get(field)!r} has no equivalent in our GPT-2")
    dropout = config.get("resid_pdrop", 0.0)
    return replace(
        ModelConfig(),
        name="gpt2",
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        n_embd=config["n_embd"],
        vocab_size=config["vocab_size"],
        seq_len=config["n_positions"],
        bias=True,
        dropout=dropout,
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        gelu_approximate=IMPORTED_ACTIVATIONS[activation],
    )


def _read_state(directory: str) -> dict[str, Tensor]:
    """Its safetensors (one file or sharded), else its pytorch_model.bin."""
    fs = LocalFileSystem()
    if fs.isfile(os.path.join(directory, SINGLE_FILE)) or fs.isfile(os.path.join(directory, INDEX_FILE)):
        return read_safetensors(fs, directory, directory)
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        return torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise UserError(f"{directory} holds no {SINGLE_FILE}, {INDEX_FILE} or pytorch_model.bin")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable ({exc})") from None
