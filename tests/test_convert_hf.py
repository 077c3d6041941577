"""tools/convert.py and Hugging Face transformers, both ways: GPT-2 as GPT2LMHeadModel, ToST as
its own modeling code (trust_remote_code), a transformers GPT-2 imported as a run's starting
point. Every model is built here from a config with random weights; nothing is downloaded."""

from __future__ import annotations

import ast
import json
from dataclasses import replace

import pytest
import torch
from helpers import PROVENANCE, REPO, make_torchvision_importable, random_model, tool, weights_dir

from pretrain.checkpoint.export import open_step
from pretrain.config import ModelConfig, load_config
from pretrain.data.tokenizer import gpt2_tokenizer
from pretrain.errors import UserError
from pretrain.interop.weights import initialise, load_weights
from pretrain.models import build_model

make_torchvision_importable()
transformers = pytest.importorskip("transformers", reason="a declared test dependency (the dev extra)")

SMALL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.seq_len=32"]
CONVERT = tool("convert")


def model_config(exp: str, *overrides: str) -> ModelConfig:
    return load_config([f"+exp={exp}", *SMALL, *overrides]).model


def convert(*argv: str) -> int:
    return CONVERT.main([str(a) for a in argv])


def tokens(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Our model's greedy continuation, re-reading the whole sequence each time."""
    out = prompt
    for _ in range(new):
        out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize(
    "overrides",
    [[], pytest.param(["model.bias=false"], marks=pytest.mark.slow), ["model.gelu_approximate=tanh"]],
    ids=["as-trained", "no-biases", "tanh-gelu"],
)
def test_gpt2_loads_in_transformers_with_the_same_logits_and_greedy_tokens(overrides, tmp_path) -> None:
    cfg = model_config("gpt2_smoke", *overrides)
    model = random_model(cfg)
    out = tmp_path / "hf"
    assert convert("export-hf", weights_dir(model, cfg, tmp_path / "w"), out) == 0

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    hf.eval()
    ids = tokens(20)
    with torch.no_grad():
        difference = (hf(ids).logits - model(ids)).abs().max().item()
    assert difference < 1e-4, difference
    generated = hf.generate(ids[:, :8], max_new_tokens=12, do_sample=False, attention_mask=torch.ones(2, 8))
    assert torch.equal(generated, greedy(model, ids[:, :8], 12))

    # The tokenizer and generation defaults travel with it, and work offline.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "The meaning of life is 42. <|endoftext|>"
    assert tokenizer(text)["input_ids"] == gpt2_tokenizer().encode(text, allowed_special="all")
    assert hf.generation_config.eos_token_id == gpt2_tokenizer().eot_token
    assert json.loads((out / "config.json").read_text())["whitebox"]["provenance"] == PROVENANCE


def test_tost_loads_with_remote_code_and_generates_from_its_recurrent_state(tmp_path) -> None:
    cfg = model_config("tost_gpt2_smoke")
    assert cfg.layerscale_init is not None and not cfg.bias  # the ToST recipe: LayerScale, no biases
    model = random_model(cfg)
    out = tmp_path / "hf"
    assert convert("export-hf", weights_dir(model, cfg, tmp_path / "w"), out) == 0

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    hf.eval()
    ids = tokens(24)
    with torch.no_grad():
        difference = (hf(ids).logits - model(ids)).abs().max().item()
    assert difference < 1e-4, difference

    # Cached decoding reads the prompt once, then one token per step; uncached re-reads everything.
    read: list[int] = []
    hf.wte.register_forward_hook(lambda _m, args, _out: read.append(args[0].shape[1]))
    prompt, mask = ids[:, :10], torch.ones(2, 10)
    cached = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=mask)
    assert read == [10] + [1] * 11
    read.clear()
    uncached = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=mask, use_cache=False)
    assert read == list(range(10, 22))
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0))


def test_the_exported_tssa_math_is_the_training_code_itself(tmp_path) -> None:
    """One source: the export carries pretrain/models/tssa.py byte for byte, and that module needs
    nothing but torch and the standard library (it runs where this package is not installed)."""
    cfg = model_config("tost_gpt2_smoke")
    out = tmp_path / "hf"
    assert convert("export-hf", weights_dir(random_model(cfg), cfg, tmp_path / "w"), out) == 0
    source = REPO / "pretrain" / "models" / "tssa.py"
    assert (out / "tssa.py").read_bytes() == source.read_bytes()
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "dataclasses", "functools", "torch"}, imported
    modeling = (out / "modeling_whitebox_tost.py").read_text()
    assert "from .tssa import" in modeling and "def token_statistics" not in modeling


def test_import_export_round_trip_is_bit_identical(tmp_path) -> None:
    cfg = model_config("gpt2_smoke", "model.bias=false")
    first, imported, second = tmp_path / "hf1", tmp_path / "init", tmp_path / "hf2"
    assert convert("export-hf", weights_dir(random_model(cfg), cfg, tmp_path / "w"), first) == 0
    assert convert("import-hf", first, imported) == 0
    assert convert("export-hf", imported, second) == 0
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert load_weights(str(imported), {}).model == cfg


@pytest.mark.slow  # trains a step
def test_a_transformers_gpt2_imports_and_a_run_starts_from_it(one_rank, text_shards, tmp_path) -> None:
    """A user's own transformers GPT-2 (the original's gelu_new, 50257 tokens, dropout 0.1) becomes
    a weights directory that checkpoint.init_from starts a run from, optimizer fresh."""
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=50257)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "user-gpt2")
    init = tmp_path / "init"
    assert convert("import-hf", tmp_path / "user-gpt2", init) == 0

    weights = load_weights(str(init), {})
    assert (weights.model.vocab_size, weights.model.gelu_approximate, weights.model.dropout) == (50257, "tanh", 0.1)
    ours = build_model(weights.model).eval()
    ours.load_state_dict(weights.tensors)
    ids = tokens(16)
    with torch.no_grad():
        difference = (hf(ids).logits - ours(ids)).abs().max().item()
    assert difference < 1e-4, difference

    from pretrain.trainer import Trainer

    fields = ["model.vocab_size=50257", "model.gelu_approximate=tanh", "model.bias=true"]
    run = [
        *("+exp=gpt2_smoke", *SMALL, *fields, f"checkpoint.init_from={init}", f"run_dir={tmp_path / 'run'}"),
        *(
            "train.max_steps=1",
            "optim.lr=1e-12",
            "optim.min_lr=1e-12",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
        ),
        *("engine=ddp", "engine.precision=fp32", "data.num_workers=0", "train.eval_max_batches=1", *text_shards),
    ]
    Trainer(load_config(run), one_rank).fit()
    with open_step(str(tmp_path / "run" / "checkpoints"), {}) as ckpt:
        trained = ckpt.weights()
    for name, imported in weights.tensors.items():  # a step of lr 1e-12 later: the imported weights still
        torch.testing.assert_close(trained[name], imported, rtol=0, atol=1e-9)

    with pytest.raises(UserError, match=r"checkpoint.init_from=.* built with model.vocab_size=50257.*: set it"):
        Trainer(load_config([o.replace("50257", "50304") for o in run]), one_rank).fit()


@pytest.mark.parametrize(
    ("exp", "overrides", "message"),
    [
        ("crate_tiny_smoke", [], "export-hf has no export for model.name=crate"),
        (
            "gpt2_smoke",
            ["model.layerscale_init=0.1"],
            "model.layerscale_init=0.1: transformers' GPT-2 has no LayerScale",
        ),
    ],
)
def test_exports_refused_with_one_line_and_nothing_written(exp, overrides, message, tmp_path, capsys) -> None:
    cfg = load_config([f"+exp={exp}", *overrides]).model if exp.startswith("crate") else model_config(exp, *overrides)
    source = weights_dir(random_model(cfg), cfg, tmp_path / "w")
    assert convert("export-hf", source, tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_an_existing_output_is_kept_without_overwrite_and_replaced_with_it(tmp_path, capsys) -> None:
    cfg = model_config("gpt2_smoke")
    source = weights_dir(random_model(cfg), cfg, tmp_path / "w")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert convert("export-hf", source, out) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert convert("export-hf", source, out, "--overwrite") == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "w"]  # no staging left behind


def test_a_store_without_committed_steps_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)  # a save that never committed
    assert convert("export-safetensors", tmp_path / "checkpoints", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "holds no committed checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_init_from_refuses_weights_of_another_model(tmp_path) -> None:
    cfg = model_config("gpt2_smoke")
    source = weights_dir(random_model(cfg), cfg, tmp_path / "w")
    other = replace(cfg, n_layer=3)
    with pytest.raises(UserError, match=r"built with model.n_layer=2: set it to start from its weights"):
        initialise(build_model(other), other, source, {})


def test_safetensors_shards_dtype_and_tied_weights_stored_once(tmp_path) -> None:
    """A size limit gives shards and an index (which transformers reads too); the tied head is one
    tensor in the files; bf16 halves the bytes and reads back as the weights rounded to bf16."""
    from safetensors import safe_open

    cfg = model_config("gpt2_smoke")
    model = random_model(cfg)
    source = weights_dir(model, cfg, tmp_path / "w")
    assert convert("export-safetensors", source, tmp_path / "sharded", "--max-shard-size", "100KB") == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    for file in files:  # at most the limit (plus the header), unless one tensor alone is larger
        tensors = [k for k, v in index["weight_map"].items() if v == file]
        assert len(tensors) == 1 or (tmp_path / "sharded" / file).stat().st_size <= 100_000 + 4_000, file
    assert "lm_head.weight" not in index["weight_map"] and "wte.weight" in index["weight_map"]
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    assert config["tied"] == {"lm_head.weight": "wte.weight"} and config["provenance"] == PROVENANCE
    back = load_weights(str(tmp_path / "sharded"), {})
    assert all(torch.equal(back.tensors[k], v) for k, v in model.state_dict().items())

    assert convert("export-safetensors", source, tmp_path / "bf16", "--dtype", "bf16") == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    half = load_weights(str(tmp_path / "bf16"), {})
    assert all(torch.equal(half.tensors[k], v.bfloat16().float()) for k, v in model.state_dict().items())

    assert convert("export-hf", source, tmp_path / "hf", "--max-shard-size", "100KB") == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = tokens(8)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
