"""Recurrent generation for causal ToST: equal to the parallel forward, O(D) per token."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import last_wins, tool, train_bpe, training_text
from torch.utils.flop_counter import FlopCounterMode

from pretrain.checkpoint.export import open_step
from pretrain.config import ModelConfig, load_config
from pretrain.data.tokenizer import TokenizerSpec
from pretrain.errors import UserError
from pretrain.models import build_model
from pretrain.prepare.text import write_token_shards
from pretrain.trainer import Trainer

STEPS = 64


def tost(seed: int = 0):
    """A small ToST LM whose TSSA branches matter: LayerScale 1 and non-trivial temp and
    denom_bias (their inits, 1 and 0, would leave those paths untested)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name="tost", n_layer=3, n_head=4, n_embd=64, seq_len=96, vocab_size=500, layerscale_init=1.0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.temp.uniform_(0.5, 2.0)
            block.attn.denom_bias.normal_(0, 0.5)
    return model


def test_recurrent_steps_equal_the_parallel_forward_over_64_tokens():
    model = tost()
    ids = torch.randint(0, 500, (2, STEPS))
    with torch.no_grad():
        parallel = model(ids)  # (2, 64, V)
        states = model.init_states(2)
        recurrent = torch.stack([model.step(ids[:, t], states) for t in range(STEPS)], dim=1)
    assert (parallel - recurrent).abs().max().item() < 1e-5


def test_the_cost_of_a_token_does_not_grow_with_its_position():
    """The state holds the same number of floats at every position, and a step at position 63
    does exactly the FLOPs of a step at position 1."""
    model = tost()
    ids = torch.randint(0, 500, (1, STEPS))
    states = model.init_states(1)
    sizes, flops = [], {}
    with torch.no_grad():
        for t in range(STEPS):
            counter = FlopCounterMode(display=False)
            with counter:
                model.step(ids[:, t], states)
            flops[t] = counter.get_total_flops()
            sizes.append(sum(s.S.numel() + s.M.numel() + s.P.numel() for s in states))
    assert len(set(sizes)) == 1 and sizes[0] == 3 * (64 + 64 + 4)  # per layer: S, M (D floats each), P (K)
    assert flops[1] == flops[STEPS - 1] > 0


def test_greedy_generation_takes_the_parallel_models_argmax_at_every_step():
    model = tost()
    prompt = torch.randint(0, 500, (2, 5))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(out[:, 5:], logits[:, 4:].argmax(-1))
    sampled = [
        model.generate(prompt, 8, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(*sampled)  # seeded sampling repeats


def test_a_parallel_prefill_leaves_the_state_and_logits_of_stepping_through_the_prompt():
    """ToSTLM.prefill reads the prompt in one forward; its per-layer (S, M, P, t) and next-token
    logits are those of T0 recurrent steps, and generation goes on from either alike."""
    model = tost()
    prompt = torch.randint(0, 500, (2, 41))
    with torch.no_grad():
        logits, states = model.prefill(prompt)
        stepped = model.init_states(2)
        for t in range(prompt.shape[1]):
            step_logits = model.step(prompt[:, t], stepped)
    assert len(states) == len(stepped) == 3
    for parallel, recurrent in zip(states, stepped, strict=True):
        assert parallel.t == recurrent.t == 41
        for name in ("S", "M", "P"):
            torch.testing.assert_close(getattr(parallel, name), getattr(recurrent, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, step_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        token = logits.argmax(-1)
        torch.testing.assert_close(model.step(token, states), model.step(token, stepped), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_generate_decodes_with_the_datas_tokenizer_and_a_resume_refuses_data_of_another(one_rank, tmp_path, capsys):
    """Two steps on shards of a tiny tokenizer.json: the checkpoint records it, tools/generate.py
    encodes the prompt (after BOS) and decodes with it, from the copy beside the shards or from
    --tokenizer; other tokenizer files are refused, and so is resuming on data they made."""

    def shards(name: str, seed: int) -> tuple[str, str]:
        tokenizer = train_bpe(tmp_path / f"tok{seed}", seed=seed)  # <s> 1, </s> 2, 300 ids
        spec = TokenizerSpec(str(tokenizer))
        index = write_token_shards(training_text(300, seed), str(tmp_path / name), 33, 64, spec)
        return str(tokenizer), f'data.urls="{tmp_path / name}/shard-{{000000..{len(index["shards"]) - 1:06d}}}.tar"'

    tokenizer, urls = shards("data", 0)
    run = [
        "+exp=tost_gpt2_smoke",
        *("model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.seq_len=32", "model.vocab_size=300"),
        *("train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=2", "checkpoint.interval=2"),
        *("data=shards", urls, "data.num_workers=0", "engine=ddp", "engine.precision=fp32"),
        *("optim.warmup_steps=1", "optim.decay_steps=2", f"run_dir={tmp_path / 'run'}"),
    ]
    Trainer(load_config(run), one_rank).fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    manifest = json.loads((checkpoints / "step_00000002" / "MANIFEST.json").read_text())
    hf = TokenizerSpec(tokenizer).load()
    assert manifest["tokenizer"] == {**hf.identity(), "url": str(tmp_path / "data" / "tokenizer")}

    prompt = "the quick brown"
    with open_step(str(checkpoints), {}) as step:
        model = build_model(step.model_config)
        model.load_state_dict(step.weights())
    ids = [hf.bos_id, *hf.encode(prompt)]
    new = model.eval().generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids) :].tolist()
    expected = hf.decode(hf.encode(prompt) + (new[: new.index(hf.eos_id)] if hf.eos_id in new else new))
    generate = tool("generate")
    common = [str(checkpoints), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"]
    for extra in ([], ["--tokenizer", tokenizer]):
        assert generate.main([*common, *extra]) == 0
        assert capsys.readouterr().out == expected + "\n"
    other, other_urls = shards("other", 1)
    assert generate.main([*common, "--tokenizer", other]) == 2
    assert f"tokenizer {other} (sha256" in capsys.readouterr().err

    with pytest.raises(UserError, match="the data were tokenized by tokenizer 'tok1'.*trained on tokenizer 'tok0'"):
        Trainer(load_config(last_wins([*run, other_urls, "train.max_steps=4"])), one_rank).fit()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch finds no CUDA GPU")
def test_generate_on_cuda_without_a_gpu_is_refused_in_one_line_before_reading_the_checkpoint(tmp_path, capsys):
    """--device cuda on a machine without CUDA: exit 2 and one line naming the flag, before the
    checkpoint store (here absent) is opened."""
    assert tool("generate").main([str(tmp_path / "absent"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == (
        "error: --device cuda: torch finds no CUDA GPU here (torch.cuda.is_available() is False); use cpu\n"
    )
