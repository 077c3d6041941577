"""Every engine trains the same run the same way: parity, accumulation, bf16 save/load.

Engines are driven directly through the Engine interface on fixed batches (the data pipeline
is tested elsewhere), in real local worlds of 1 or 2 processes with gloo.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import config, global_batches, rank_micro_batches, step, train, weight_errors

from pretrain.distributed import mean_over_ranks
from pretrain.engines import VARIANTS
from pretrain.launch import run_local_world
from pretrain.models import build_model


def run_engines(dist_info, model, variants, steps, global_batch, micro):
    """Each engine variant trained on the same batches; rank 0 returns {label: (losses, weights)}."""
    blocks = global_batches(steps, global_batch)
    out = {}
    for label, overrides in variants.items():
        engine, losses = train(dist_info, config(model, overrides, global_batch, micro), blocks)
        out[label] = (losses, engine.full_state_dict())
    return out if dist_info.rank == 0 else None


TWO_RANK_ENGINES = {
    **{label: VARIANTS[label] for label in ("ddp", "zero1", "zero2", "zero3", "fsdp")},
    "fsdp+ac": ["engine=fsdp", "engine.activation_checkpointing=full"],
    "zero3+ac": ["engine=deepspeed", "engine.zero_stage=3", "engine.activation_checkpointing=every_k"],
}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tost_gpt2", "gpt2"])
def test_all_engines_take_the_same_steps(model):
    """Every engine on two ranks, ToST with its fused TSSA operator, against one rank that runs
    the reference formula (model.tssa_impl=eager)."""
    steps, global_batch, micro = 10, 8, 2
    reference_run = {"single": ["engine=ddp", "model.tssa_impl=eager"]}
    (reference,) = run_local_world(run_engines, 1, model, reference_run, steps, global_batch, micro)
    ref_losses, ref_weights = reference["single"]
    assert ref_losses[-1] < ref_losses[0] - 0.5, ref_losses  # it learns, so agreement means something
    fused = {label: [*overrides, "model.tssa_impl=fused"] for label, overrides in TWO_RANK_ENGINES.items()}
    results = run_local_world(run_engines, 2, model, fused, steps, global_batch, micro)[0]
    for label, (losses, weights) in results.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), label
        assert set(ref_weights) <= set(weights), (label, set(ref_weights) - set(weights))
        total, per_tensor = weight_errors(weights, ref_weights)
        assert total < 1e-5, (label, total)
        worst = max(per_tensor, key=per_tensor.get)
        assert per_tensor[worst] < 1e-3, (label, worst, per_tensor[worst])


def bf16_train_save_load(dist_info, variants, root):
    """Per engine, in bf16: 8 steps, save, a 9th step; then a fresh engine (other init) loads."""
    blocks = global_batches(9, 8)
    out = {}
    for label, overrides in variants.items():
        cfg = config("tost_gpt2", overrides, lr=1e-2, precision="bf16")
        engine, losses = train(dist_info, cfg, blocks[:8])
        step_dir = os.path.join(root, label)
        os.makedirs(step_dir, exist_ok=True)
        engine.save(step_dir)
        saved = engine.full_state_dict()
        next_loss = step(engine, blocks[8], dist_info, cfg)
        restored, _ = train(dist_info, cfg, [], seed=cfg.train.seed + 1)
        restored.load(step_dir, dist_info.world_size)
        out[label] = (losses, saved, restored.full_state_dict(), next_loss, step(restored, blocks[8], dist_info, cfg))
    return out if dist_info.rank == 0 else None


@pytest.mark.slow
def test_bf16_runs_of_every_engine_train_save_and_load(tmp_path):
    variants = {k: v for k, v in TWO_RANK_ENGINES.items() if "+" not in k}
    results = run_local_world(bf16_train_save_load, 2, variants, str(tmp_path))[0]
    for label, (losses, saved, loaded, next_loss, restored_loss) in results.items():
        assert sum(losses[-2:]) / 2 < losses[0] - 0.5, (label, losses)
        assert saved.keys() == loaded.keys(), label
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), (label, name)
        assert restored_loss == next_loss, label  # optimizer state and schedule came back too


def refuse(loss: float) -> bool:
    """An `accept` that refuses every update, after a collective as the spike detector's."""
    mean_over_ranks(loss)
    return False


def accept_all(loss: float) -> bool:
    """An `accept` that takes every update, after a collective, as the trainer's always does: a
    NaN on one rank must not keep another from joining it."""
    mean_over_ranks(loss)
    return True


def faulty_third_step(dist_info, variants, fault):
    """Per engine: steps on batches 0, 1, then batch 2 with the `fault` ("nan": rank 0's loss is
    NaN; "withhold": `accept` refuses the update), then batch 3; returns what every rank saw of
    the faulty step (withheld, skipped, bad), the weights around it, and the losses."""
    blocks = global_batches(4, 8)
    out = {}
    for label, overrides in variants.items():
        cfg = config("tost_gpt2", overrides)
        engine, losses = train(dist_info, cfg, blocks[:2])
        before = engine.full_state_dict()
        poisoned = engine.model.register_forward_hook(
            lambda module, args, loss: loss * float("nan") if fault == "nan" and dist_info.rank == 0 else loss
        )
        micro = rank_micro_batches(blocks[2], dist_info.rank, dist_info.world_size, cfg.train.micro_batch_size)
        result = engine.train_step(micro, accept=refuse if fault == "withhold" else accept_all)
        poisoned.remove()
        verdicts = [None] * dist_info.world_size
        torch.distributed.all_gather_object(verdicts, (result.withheld, result.skipped, result.bad))
        after = engine.full_state_dict()
        out[label] = (verdicts, before, after, losses + [step(engine, blocks[3], dist_info, cfg)])
    return out if dist_info.rank == 0 else None


def train_losses(dist_info, overrides, blocks):
    return train(dist_info, config("tost_gpt2", overrides), blocks)[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "verdict", "more"),
    [
        # DeepSpeed without ZeRO cannot skip: it applies a NaN step (bad, for the guard to reload).
        ("nan", (False, True, True), {"zero0": ["engine=deepspeed", "engine.zero_stage=0"]}),
        # What the spike detector's skip relies on, after the second of two micro-batches.
        ("withhold", (True, False, False), {"zero3": ["engine=deepspeed", "engine.zero_stage=3"]}),
    ],
)
def test_a_nan_or_withheld_step_changes_nothing_on_every_rank_as_if_it_never_ran(fault, verdict, more):
    """A NaN loss on one rank, or an update `accept` refuses, is made by no rank: the weights and
    the schedule stay, and the next step is the step an unbroken run takes next."""
    variants = {
        "ddp": ["engine=ddp"],
        "fsdp": ["engine=fsdp"],
        "zero2": ["engine=deepspeed", "engine.zero_stage=2"],
        **more,
    }
    results = run_local_world(faulty_third_step, 2, variants, fault)[0]
    blocks = global_batches(4, 8)
    (clean,) = run_local_world(train_losses, 1, ["engine=ddp"], [blocks[0], blocks[1], blocks[3]])
    for label, (verdicts, before, after, losses) in results.items():
        if label == "zero0":
            assert verdicts == [(False, False, True)] * 2
            assert all(torch.isnan(after[k]).any() for k in after if k.endswith("weight"))
            continue
        assert verdicts == [verdict] * 2, label
        assert all(torch.equal(before[k], after[k]) for k in before), label
        assert losses == pytest.approx(clean, rel=1e-5), label


def save_after_two_steps(dist_info, overrides, step_dir):
    cfg = config("tost_gpt2", overrides)
    engine, _ = train(dist_info, cfg, global_batches(2, 8))
    engine.save(step_dir)
    return engine.full_state_dict()


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine",
    [["engine=deepspeed", "engine.zero_stage=2"], ["engine=deepspeed", "engine.zero_stage=0"], ["engine=fsdp"]],
    ids=["zero2", "zero0", "fsdp"],
)
def test_export_reads_the_trained_weights_back_in_one_process(engine, tmp_path):
    """What tools read (pretrain.checkpoint.export) is exactly what the engine trained."""
    from pretrain.checkpoint.export import model_weights

    step_dir = str(tmp_path / "step_00000002")
    os.makedirs(step_dir)
    trained = run_local_world(save_after_two_steps, 2, engine, step_dir)[0]
    exported = model_weights(step_dir, engine[0].split("=")[1])
    assert set(exported) == set(trained)
    assert all(torch.equal(exported[k], trained[k].float()) for k in trained)


def average_weights(dist_info, variants, root):
    """Per engine: an EMA (decay 0.5) over 3 steps, the weights after each step, the model's
    output with the average applied and after, and the average saved and loaded back."""
    from pretrain.ema import WeightAverage

    blocks = global_batches(4, 8)
    probe = {"input_ids": blocks[3][:2, :-1]}
    out = {}
    for label, overrides in variants.items():
        cfg = config("tost_gpt2", overrides)
        engine, _ = train(dist_info, cfg, [])
        ema = WeightAverage(engine, 0.5)

        def snapshot(engine=engine):  # unsharded CPU weights may come back as the live tensors themselves
            return {name: w.clone() for name, w in engine.full_state_dict().items()}

        history = [snapshot()]
        for block in blocks[:3]:
            step(engine, block, dist_info, cfg)
            ema.update()
            history.append(snapshot())
        live = engine.predict(probe)
        with ema.applied():
            averaged = engine.predict(probe)
        restored = engine.predict(probe)
        step_dir = os.path.join(root, label)
        os.makedirs(step_dir, exist_ok=True)
        ema.save(step_dir)
        torch.distributed.barrier()  # as a checkpoint save does before anything reads
        saved = ema.full()
        again = WeightAverage(engine, 0.5)  # starts from the live weights
        again.load(step_dir, dist_info.world_size)
        out[label] = (history, saved, again.full(), live, averaged, restored)
    return out if dist_info.rank == 0 else None


@pytest.mark.slow
def test_the_weight_average_follows_its_recursion_under_every_engine_and_is_what_evaluation_runs(tmp_path):
    """average_k = 0.5 average_(k-1) + 0.5 weights_k from the initial weights, kept on each
    rank's shard (ZeRO-3's flat partitions and its gathered small weights, FSDP2's DTensors):
    gathered whole it equals the recursion; applied, the model's output is that of a plain
    model holding it; after, the trained weights are back exactly; saved, it loads back."""
    variants = {k: TWO_RANK_ENGINES[k] for k in ("ddp", "zero2", "zero3", "fsdp")}
    results = run_local_world(average_weights, 2, variants, str(tmp_path))[0]
    for label, (history, saved, loaded, live, averaged, restored) in results.items():
        expected = {name: history[0][name].float() for name in saved}
        for weights in history[1:]:
            expected = {name: 0.5 * a + 0.5 * weights[name].float() for name, a in expected.items()}
        assert set(saved) == {n for n, _ in build_model(config("tost_gpt2", []).model).named_parameters()}, label
        assert max((saved[n] - expected[n]).abs().max().item() for n in saved) < 1e-6, label
        assert all(torch.equal(loaded[n], saved[n]) for n in saved), label
        plain = build_model(config("tost_gpt2", []).model)
        plain.load_state_dict(history[-1])
        with torch.no_grad():
            for name, weight in plain.named_parameters():  # one name per tied weight, as the average has
                weight.copy_(saved[name])
            reference = plain.eval()(input_ids=global_batches(4, 8)[3][:2, :-1])
        assert (averaged - reference).abs().max().item() < 1e-5, label
        assert (averaged - live).abs().max().item() > 1e-3, label  # the average is not the weights
        assert torch.equal(restored, live), label


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_a_weight_average_decay_outside_0_1_is_refused_naming_the_key(decay):
    from pretrain.ema import WeightAverage
    from pretrain.errors import UserError

    with pytest.raises(UserError, match=rf"train.ema_decay={decay} must be 0 \(no average\) or between 0 and 1"):
        WeightAverage(None, decay)
