"""ToST language models for Hugging Face transformers, which has no ToST class: the export carries
its own configuration and modeling code (hf_tost_code/), loaded with trust_remote_code=True.

The modeling code imports the TSSA math from `tssa.py` beside it, which is this repository's
pretrain/models/tssa.py copied verbatim at export: the math has one source, and an export always
holds the version it was trained with. The parameters keep our names; the head is tied to wte.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from pretrain.data.tokenizer import gpt2_tokenizer
from pretrain.interop.hf_gpt2 import WHITEBOX_KEY, write_tokenizer
from pretrain.interop.weights import Weights, stored_tensors, write_json, write_safetensors
from pretrain.models import tssa

CODE_DIR = Path(__file__).parent / "hf_tost_code"
CONFIG_MODULE, MODELING_MODULE, TSSA_MODULE = "configuration_whitebox_tost", "modeling_whitebox_tost", "tssa"
MODEL_FIELDS = (
    "vocab_size",
    "n_layer",
    "n_head",
    "n_embd",
    "seq_len",
    "bias",
    "layerscale_init",
    "dropout",
    "norm_eps",
    "gelu_approximate",
)


def export_hf_tost(weights: Weights, directory: str, dtype: str, max_shard_bytes: int | None) -> None:
    """A directory that AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True) loads."""
    write_safetensors(stored_tensors(weights, dtype)[0], directory, max_shard_bytes)
    for module in (CONFIG_MODULE, MODELING_MODULE):
        shutil.copyfile(CODE_DIR / f"{module}.py", os.path.join(directory, f"{module}.py"))
    shutil.copyfile(tssa.__file__, os.path.join(directory, f"{TSSA_MODULE}.py"))
    model = asdict(weights.model)
    eot = gpt2_tokenizer().eot_token  # the tokenizer written beside
    config = {
        "architectures": ["ToSTForCausalLM"],
        "model_type": "whitebox_tost",
        "auto_map": {
            "AutoConfig": f"{CONFIG_MODULE}.ToSTConfig",
            "AutoModelForCausalLM": f"{MODELING_MODULE}.ToSTForCausalLM",
        },
        **{field: model[field] for field in MODEL_FIELDS},
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        WHITEBOX_KEY: {"model": model, "provenance": weights.provenance},
    }
    write_json(os.path.join(directory, "config.json"), config)
    write_tokenizer(directory, weights.model.seq_len)
