"""The training step tuned for GPUs, checked on CPU: one host sync per step, fused AdamW where asked
(and only on a GPU by the engines), batches pinned for a GPU run only, whole-model compile for DDP."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import config, global_batches, rank_micro_batches, train

import pretrain
from pretrain.batch import pinned
from pretrain.callbacks import Callback, Callbacks
from pretrain.config import ModelConfig, OptimConfig, SpikeConfig
from pretrain.distributed import DistInfo
from pretrain.guard import NonFiniteGuard
from pretrain.models import build_model
from pretrain.optim import build_optimizer
from pretrain.spikes import SpikeDetector

PRETRAIN = str(Path(pretrain.__file__).parent)


# Both slow: a process group and engine per case, and the fast part keeps its 90 s.
@pytest.mark.slow
@pytest.mark.parametrize("label", ["ddp", "fsdp"])
def test_a_step_reads_the_device_once_and_the_cpu_optimizer_is_not_fused(label, one_rank: DistInfo, monkeypatch):
    """Loss and gradient norm come back together, once per optimizer step, however many micro-batches."""
    cfg = config("gpt2", [f"engine={label}"], global_batch=8, micro=2)
    engine, _ = train(one_rank, cfg, [])
    assert not engine.optimizer.defaults["fused"]  # parameters on the CPU: torch's default AdamW, as before
    reads = []  # by our code: the CPU's for-loop AdamW reads its step counts, the fused GPU kernel does not

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def read(t, *args):
            if sys._getframe(1).f_code.co_filename.startswith(PRETRAIN):
                reads.append(name)
            return original(t, *args)

        return read

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    result = engine.train_step(rank_micro_batches(global_batches(1, 8)[0], 0, 1, 2))  # 4 micro-batches
    assert reads == ["tolist"]
    assert result.loss == pytest.approx(math.log(cfg.model.vocab_size), abs=0.5)  # a fresh model: near uniform
    assert 0 < result.grad_norm < 100


def test_fused_adamw_takes_the_same_step():
    def stepped(fused: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=32, seq_len=8))
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), fused=fused)
        assert bool(optimizer.defaults["fused"]) == fused
        ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            model(ids, ids).backward()
            optimizer.step()
            optimizer.zero_grad()
        return before, [p.detach() for p in model.parameters()]

    before, fused = stepped(True)
    _, plain = stepped(False)
    for start, f, p in zip(before, fused, plain, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-7)
        assert (f - start).abs().max() > 1e-4  # lr 6e-4 for two steps: every tensor moved


def test_the_engine_is_asked_to_accept_only_where_a_callback_judges_updates():
    guard = NonFiniteGuard(3, 2, is_main=True)
    assert not Callbacks([Callback(), guard]).judges_updates()
    assert Callbacks([guard, SpikeDetector(SpikeConfig(action="skip"), 2, is_main=True)]).judges_updates()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA's host allocator")
def test_batches_are_pinned_for_a_gpu_run():
    batch = {"input_ids": torch.arange(6).view(2, 3)[:, :-1], "labels": torch.arange(6).view(2, 3)}
    (out,) = list(pinned(iter([batch])))
    assert all(t.is_pinned() for t in out.values()) and torch.equal(out["input_ids"], batch["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_ddp_takes_the_eager_steps(scope: str, one_rank: DistInfo, monkeypatch):
    """engine.compile_scope: the whole model compiled as one (around DDP where there is DDP), or each
    block; either way the steps are eager's. aot_eager: dynamo's graphs and AOT autograd's joint
    forward-backward, without inductor's C++ build."""
    compiled = []

    def compile_with_aot_eager(module, *args, **kwargs):
        compiled.append(module)
        return original(module, backend="aot_eager")

    original = torch.nn.Module.compile
    blocks = global_batches(2, 4)
    _, eager = train(one_rank, config("gpt2", ["engine=ddp"], global_batch=4, micro=2), blocks)
    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    overrides = ["engine=ddp", "engine.compile=true", f"engine.compile_scope={scope}"]
    engine, losses = train(one_rank, config("gpt2", overrides, global_batch=4, micro=2), blocks)
    assert compiled == ([engine.wrapped] if scope == "model" else list(engine.model.blocks))
    assert engine.wrapped is engine.model  # one rank: no DDP wrapper, the model itself
    assert losses == pytest.approx(eager, rel=1e-5)
