"""Engines, the trainer and its callbacks in this process, on a world of one rank (gloo): the fast
part's cover of what the slow tests run on two ranks and under launchers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import config, global_batches, metric_history, mlflow_run, step, train

from pretrain.checkpoint.manager import NotCommitted
from pretrain.config import load_config
from pretrain.distributed import DistInfo, init_distributed, shutdown, single_process_env
from pretrain.engines import VARIANTS
from pretrain.errors import UserError
from pretrain.faults import FAIL_ENV
from pretrain.prepare.text import write_token_shards
from pretrain.trainer import Trainer

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TINY_RUN = [
    "+exp=tost_gpt2_smoke",
    *("model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.seq_len=32"),
    *("train.global_batch_size=4", "train.micro_batch_size=2", "train.log_interval=1"),
    "data.num_workers=0",
    *("engine=ddp", "engine.precision=fp32", "optim.warmup_steps=2", "optim.decay_steps=8"),
    *("train.eval_interval=2", "train.eval_max_batches=1", "checkpoint.interval=2", "train.ema_decay=0.9"),
]


@pytest.fixture(scope="module")
def one_rank():
    """A process group of this process alone, as a plain `python` run makes; the environment it
    needs is put back afterwards, so that launchers started by other tests do not inherit it."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    os.environ.update(single_process_env())
    try:
        yield init_distributed()
    finally:
        shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize(
    "label",
    # ZeRO-0 and -1 differ from ZeRO-2 in what they partition, not in this path: in the slow part.
    [pytest.param(label, marks=[pytest.mark.slow] if label in ("zero0", "zero1") else []) for label in VARIANTS],
)
def test_each_engine_accumulates_as_one_batch_and_resumes_exactly_from_its_files(
    label: str, one_rank: DistInfo, tmp_path
) -> None:
    """Three steps of 2 micro-batches of 2 equal three steps of one micro-batch of 4; an engine
    built afresh (another init) from the files saved then takes the fourth step exactly as the
    engine that saved them."""
    blocks = global_batches(4, 4)
    accumulating = config("tost_gpt2", VARIANTS[label], global_batch=4, micro=2)
    engine, losses = train(one_rank, accumulating, blocks[:3])
    _, big_batch_losses = train(one_rank, config("tost_gpt2", VARIANTS[label], global_batch=4, micro=4), blocks[:3])
    assert losses == pytest.approx(big_batch_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    engine.save(str(tmp_path))
    fourth = step(engine, blocks[3], one_rank, accumulating)
    restored, _ = train(one_rank, accumulating, [], seed=accumulating.train.seed + 1)
    restored.load(str(tmp_path), saved_world_size=1)
    assert step(restored, blocks[3], one_rank, accumulating) == fourth
    logits = restored.predict({"input_ids": blocks[3][:2, :-1], "labels": blocks[3][:2, 1:]})
    assert logits.shape == (2, 16, accumulating.model.vocab_size)


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> list[str]:
    """Small train and validation shard sets: the data.urls and data.val_urls of a run."""
    root = tmp_path_factory.mktemp("text")
    overrides = []
    for split, key, n in (("train", "data.urls", 2000), ("val", "data.val_urls", 200)):
        documents = [f"step {i}: the {i % 7} cats saw {i % 11} dogs and {i % 3} birds." for i in range(n)]
        index = write_token_shards(documents, str(root / split), block_len=33, blocks_per_shard=64)
        overrides.append(f'{key}="{root / split}/shard-{{000000..{len(index["shards"]) - 1:06d}}}.tar"')
    return ["data=shards", *overrides]


def test_a_run_logs_evaluates_checkpoints_and_resumes_exactly(one_rank: DistInfo, text_shards, tmp_path) -> None:
    """Trainer.fit with every default callback, 3 steps; then the same run resumed from step 2's
    checkpoint takes step 3 again, exactly as the first time, in the same MLflow run."""
    run = [*TINY_RUN, *text_shards, f"run_dir={tmp_path}", "train.max_steps=3"]
    first = Trainer(load_config(run), one_rank).fit()
    client, mlflow = mlflow_run(tmp_path)
    metrics = mlflow.data.metrics
    assert {"eval_loss", "eval_ema_loss", "rc_in_layer00", "pi_entropy_layer01", "ckpt_blocked_s"} <= metrics.keys()
    assert metrics["steps_skipped"] == 0 and metrics["reloads"] == 0 and metrics["tokens_seen"] == 3 * 4 * 32
    assert sorted(metric_history(tmp_path, "eval_loss")) == [2, 3]  # every 2 steps and at the end
    assert sorted(metric_history(tmp_path, "ckpt_save_s")) == [2, 3]  # both saves committed, and timed
    assert (tmp_path / "whitebox.png").is_file()

    again = Trainer(load_config([*run, "checkpoint.resume=2"]), one_rank).fit()
    assert mlflow_run(tmp_path)[1].info.run_id == mlflow.info.run_id
    history = client.get_metric_history(mlflow.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 3]
    assert history[2].value == history[3].value == first == again  # model, optimizer, schedule, data, RNG
    ema = torch.load(tmp_path / "checkpoints" / "step_00000003" / "ema.pt", weights_only=True)
    assert ema.keys() >= {"wte.weight", "blocks.0.attn.U.weight"}


@pytest.mark.parametrize("async_upload", [True, False])
def test_a_run_whose_last_save_fails_does_not_report_done(
    one_rank: DistInfo, text_shards, tmp_path, monkeypatch, caplog, async_upload
) -> None:
    """The store fails (as a full disk would) in the upload of step 3, the final save: fit raises
    NotCommitted, which names the step and where a restart would begin, and the failed attempt's
    files are gone from the store and from staging. A failed save before a committed last one
    only counts in the closing line."""

    def run(run_dir: Path) -> list[str]:
        return [*TINY_RUN, *text_shards, f"run_dir={run_dir}", "train.max_steps=3"] + [
            f"checkpoint.async_upload={async_upload}",
            f"checkpoint.staging_dir={run_dir / 'staging'}",
        ]

    store = tmp_path / "checkpoints"
    monkeypatch.setenv(FAIL_ENV, "upload.first_file:3")
    with pytest.raises(NotCommitted) as failed:
        Trainer(load_config(run(tmp_path)), one_rank).fit()
    assert str(failed.value) == (
        f"no checkpoint was saved for step 3: 1 of 2 saves of this run failed (see the errors above); "
        f"a restart would begin at step 2 of {store}"
    )
    assert sorted(p.name for p in store.iterdir()) == ["step_00000002"]
    staging = tmp_path / "staging"
    assert staging.is_dir() and not any(staging.iterdir())  # staged, then removed

    monkeypatch.setenv(FAIL_ENV, "upload.first_file:2")
    with caplog.at_level(logging.INFO, logger="pretrain"):
        again = tmp_path / "again"
        Trainer(load_config(run(again)), one_rank).fit()
    assert f"done: checkpoints in {again / 'checkpoints'} (1 of 2 saves failed; the last committed)" in caplog.text
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["step_00000003"]


def test_an_unwritable_checkpoint_store_is_refused_before_training(one_rank: DistInfo, text_shards, tmp_path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    run = [*TINY_RUN, *text_shards, f"run_dir={tmp_path}", f"checkpoint.url={tmp_path / 'a-file' / 'checkpoints'}"]
    with pytest.raises(
        UserError, match=r"checkpoint.url .*a-file/checkpoints is not writable \((FileExistsError|NotADirectoryError)"
    ):
        Trainer(load_config(run), one_rank).fit()
    assert not (tmp_path / "mlflow.db").exists()  # refused before the run began
