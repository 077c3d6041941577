"""Engines, the trainer and its callbacks in this process, on a world of one rank (gloo): the fast
part's cover of what the slow tests run on two ranks and under launchers."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, MlflowServer, config, global_batches, last_wins, metric_history, mlflow_run, step, train

from pretrain.callbacks import Callback, Callbacks, LoopState
from pretrain.checkpoint.manager import NotCommitted
from pretrain.config import SpikeConfig, load_config
from pretrain.distributed import DistInfo
from pretrain.engines import VARIANTS
from pretrain.errors import UserError
from pretrain.faults import FAIL_ENV
from pretrain.spikes import SpikeDetector
from pretrain.trainer import Trainer

TINY_RUN = [
    "+exp=tost_gpt2_smoke",
    *("model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.seq_len=32"),
    *("train.global_batch_size=4", "train.micro_batch_size=2", "train.log_interval=1"),
    "data.num_workers=0",
    *("engine=ddp", "engine.precision=fp32", "optim.warmup_steps=2", "optim.decay_steps=8"),
    *("train.eval_interval=2", "train.eval_max_batches=1", "checkpoint.interval=2", "train.ema_decay=0.9"),
]


@pytest.mark.parametrize(
    "label",
    # The fast part keeps DDP and FSDP2, within its 90 s; ZeRO-0 to 3 differ in what they partition,
    # not in this path: in the slow part.
    [pytest.param(label, marks=[] if label in ("ddp", "fsdp") else [pytest.mark.slow]) for label in VARIANTS],
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
    replayed = client.get_metric_history(mlflow.info.run_id, "replay/loss")
    assert [m.step for m in history] == [1, 2, 3] and [m.step for m in replayed] == [3]  # step 3 once under loss
    assert history[2].value == replayed[0].value == first == again  # model, optimizer, schedule, data, RNG
    assert not (tmp_path / "mlflow_journal.jsonl").stat().st_size  # every row sent
    ema = torch.load(tmp_path / "checkpoints" / "step_00000003" / "ema.pt", weights_only=True)
    assert ema.keys() >= {"wte.weight", "blocks.0.attn.U.weight"}


# The synchronous variant goes with the slow part: the fast part stays under its 90 s.
@pytest.mark.parametrize("async_upload", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_run_whose_last_save_fails_does_not_report_done(
    one_rank: DistInfo, text_shards, tmp_path, monkeypatch, caplog, async_upload
) -> None:
    """The store fails (as a full disk would) in the upload of step 3, the final save: fit raises
    NotCommitted, which names the step and where a restart would begin, and the failed attempt's
    files are gone from the store and from staging. A failed save before a committed last one
    only counts in the closing line, and a failed retention after a commit not even there."""

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
    assert staging.is_dir() and not any(p.is_file() for p in staging.rglob("*"))  # staged, then removed

    # Retention failing after step 3's commit (the store, deleting old steps) neither undoes the
    # commit nor counts as a failed save.
    monkeypatch.setenv(FAIL_ENV, "upload.first_file:2,retention:3")
    with caplog.at_level(logging.INFO, logger="pretrain"):
        again = tmp_path / "again"
        Trainer(load_config(run(again)), one_rank).fit()
    assert f"done: checkpoints in {again / 'checkpoints'} (1 of 2 saves failed; the last committed)" in caplog.text
    assert "checkpoint retention failed (old steps are kept): OSError: injected failure at retention" in caplog.text
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["step_00000003"]


def test_an_unwritable_checkpoint_store_is_refused_before_training(one_rank: DistInfo, text_shards, tmp_path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    run = [*TINY_RUN, *text_shards, f"run_dir={tmp_path}", f"checkpoint.url={tmp_path / 'a-file' / 'checkpoints'}"]
    with pytest.raises(
        UserError, match=r"checkpoint.url .*a-file/checkpoints is not writable \((FileExistsError|NotADirectoryError)"
    ):
        Trainer(load_config(run), one_rank).fit()
    assert not (tmp_path / "mlflow.db").exists()  # refused before the run began


class Outage(Callback):
    """Stops the tracking server after step `stop_at` and starts it again after step `start_at`
    (never, if None), as an outage in the middle of a run would."""

    def __init__(self, server: MlflowServer, stop_at: int, start_at: int | None) -> None:
        self.server, self.stop_at, self.start_at = server, stop_at, start_at

    def on_step_end(self, loop: LoopState, result) -> None:
        if loop.step == self.stop_at:
            self.server.stop()
        if loop.step == self.start_at:
            self.server.start()


class TrainerWith(Trainer):
    """A Trainer whose run has one more callback, last."""

    def __init__(self, cfg, dist_info: DistInfo, extra: Callback) -> None:
        super().__init__(cfg, dist_info)
        self.extra = extra

    def _callbacks(self, *args) -> Callbacks:
        callbacks = super()._callbacks(*args)
        callbacks.items.append(self.extra)
        return callbacks


@pytest.mark.slow
def test_a_tracking_outage_loses_and_repeats_no_metric(one_rank: DistInfo, text_shards, tmp_path, caplog) -> None:
    """A real `mlflow server`, stopped after step 3 and started again after step 8 of a 12-step run:
    training goes on, one warning says so, and the run's history holds every step once. Stopped
    after step 2 of another run for good, the rows wait on disk, and tools/mlflow_sync.py sends
    them once the server is back."""
    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    server.start()
    fast_retries = ["tracking.retry_backoff_s=0.2", "tracking.max_backoff_s=1", "tracking.request_timeout_s=2"]
    run = last_wins([*TINY_RUN, *text_shards, f"tracking.uri={server.uri}", *fast_retries, "train.eval_interval=4"])
    try:
        with caplog.at_level(logging.INFO, logger="pretrain"):
            TrainerWith(
                load_config([*run, f"run_dir={tmp_path / 'a'}", "train.max_steps=12", "tracking.experiment=a"]),
                one_rank,
                Outage(server, 3, 8),
            ).fit()
        assert caplog.text.count("unreachable (") == 1 and caplog.text.count("is back after") == 1
        client, mlflow = mlflow_run(tmp_path / "a", uri=server.uri, experiment="a")
        for key in ("loss", "lr", "tokens_seen", "grad_norm"):
            assert [m.step for m in client.get_metric_history(mlflow.info.run_id, key)] == list(range(1, 13)), key
        assert [m.step for m in client.get_metric_history(mlflow.info.run_id, "eval_loss")] == [4, 8, 12]
        assert mlflow.info.status == "FINISHED"
        assert (tmp_path / "a" / "mlflow_journal.jsonl").stat().st_size == 0

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pretrain"):
            b = tmp_path / "b"
            TrainerWith(
                load_config(
                    [*run, f"run_dir={b}", "train.max_steps=6", "tracking.flush_timeout_s=1", "tracking.experiment=b"]
                ),
                one_rank,
                Outage(server, 2, None),
            ).fit()
        assert re.search(r"still unreachable; \d+ rows wait in .*mlflow_journal.jsonl: send them with", caplog.text)
        server.start()
        synced = subprocess.run(
            [sys.executable, str(REPO / "tools" / "mlflow_sync.py"), str(b)], capture_output=True, text=True, check=True
        )
        assert re.fullmatch(r"sent (\d+) of \1 rows from mlflow_journal.jsonl to http://127.0.0.1:\d+\n", synced.stdout)
        client, mlflow = mlflow_run(b, uri=server.uri, experiment="b")
        assert [m.step for m in client.get_metric_history(mlflow.info.run_id, "loss")] == list(range(1, 7))
        assert mlflow.info.status == "FINISHED"
        assert (b / "mlflow_journal.jsonl").stat().st_size == 0
    finally:
        server.stop()


def test_the_spike_detector_judges_against_the_median_and_mad_of_recent_steps(one_rank: DistInfo) -> None:
    """Outliers are measured against steps that were not outliers; a flat loss's tiny MAD raises no
    alarm below min_rise; `patience` outliers in a row make a spike, whose update skip withholds."""
    cfg = SpikeConfig(action="skip", window=8, min_history=4, threshold=6.0, min_rise=0.05, patience=2)
    detector = SpikeDetector(cfg, max_reloads=2, is_main=True)
    accepted = [detector.accept_update(None, loss) for loss in [3.0, 3.01, 2.99, 3.0, 3.0, 3.1, 4.0, 4.0, 4.5, 3.0]]
    # warm-up (4), in range (3.0), within min_rise of a near-zero MAD (3.1), 1st outlier (applied),
    # 2nd and 3rd in a row (withheld), then back in range.
    assert accepted == [True] * 7 + [False, False, True]
    assert detector.interval_metrics() == {"spikes": 2}
    assert 4.0 not in detector.losses and 3.1 in detector.losses
    with pytest.raises(UserError, match="train.spike.action='sometimes' is not one of none, skip, rollback"):
        SpikeDetector(SpikeConfig(action="sometimes"), max_reloads=2, is_main=False)
