"""Recurrent generation for causal ToST: equal to the parallel forward, O(D) per token."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ModelConfig
from pretrain.models import build_model

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
