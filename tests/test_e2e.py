"""End to end, as users run it: real launchers, real DeepSpeed (gloo), real MLflow (sqlite)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import fsspec
import pytest
import torch
from helpers import REPO, TINY, check, launch, launch_and_signal, launch_watching, metric_history, mlflow_run

from pretrain.checkpoint.manager import NOT_COMMITTED_EXIT_CODE
from pretrain.distributed import free_port
from pretrain.engines.extensions import TORCH_LOCK
from pretrain.faults import FAIL_ENV, KILL_ENV, NAN_ENV, SPIKE_ENV
from pretrain.heartbeat import LOST_RANK_EXIT_CODE
from pretrain.preemption import PREEMPTED_EXIT_CODE

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def smoke(run_dir, corpus_cache, *extra: str) -> list[str]:
    return [
        "+exp=tost_gpt2_smoke",
        *TINY,
        f"run_dir={run_dir}",
        f"data.cache_dir={corpus_cache}",
        "engine.precision=fp32",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "optim.decay_steps=8",
        "checkpoint.interval=4",
        *extra,
    ]


def preempt_node(args: list[str], to: str, forward_signals: str) -> int:
    """Run through the node launcher, SIGTERM `to` "every" process or the "launcher" once
    training starts; asserts the documented exit code and returns the step it stopped after."""
    code, out = launch_and_signal(
        "node", args, when="tost: ", sig=signal.SIGTERM, to=to, env={"FORWARD_SIGNALS": forward_signals}
    )
    assert code == PREEMPTED_EXIT_CODE, out[-3000:]
    (at,) = re.findall(r"preempted \(SIGTERM\) after step (\d+)", out)
    return int(at)


@pytest.mark.faults
def test_deepspeed_zero2_trains_checkpoints_tracks_and_resumes_exactly(tmp_path, corpus_cache):
    ref = tmp_path / "uninterrupted"
    check(launch("deepspeed", smoke(ref, corpus_cache, "engine.zero_stage=2", "train.max_steps=8")))

    losses = metric_history(ref)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 1.0, losses
    _, run = mlflow_run(ref)  # exactly one run: only rank 0 tracks
    assert run.data.params["model.name"] == "tost" and run.data.params["engine.zero_stage"] == "2"
    assert run.data.params["train.max_steps"] == "8" and float(run.data.params["optim.lr"]) == 1e-2
    assert {"lr", "grad_norm", "tokens_per_s", "step_time_s", "memory_gib"} <= set(run.data.metrics)
    # Evaluated at the end on the held-out stdlib documents, with ToST's white-box measures by layer.
    assert metric_history(ref, "eval_loss")[8] < losses[1]
    assert {f"{m}_layer{i:02d}" for m in ("rc_in", "rc_out", "pi_entropy") for i in (0, 1)} <= set(run.data.metrics)
    client, _ = mlflow_run(ref)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["whitebox.png"]

    ckpt = ref / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000004", "step_00000008"]
    last = ckpt / "step_00000008"
    manifest = json.loads((last / "MANIFEST.json").read_text())
    assert manifest["step"] == 8 and manifest["world_size"] == 2 and manifest["mlflow_run_id"] == run.info.run_id
    assert manifest["engine"] == "deepspeed" and manifest["config"]["engine"]["zero_stage"] == 2
    assert manifest["tokens_seen"] == 8 * 8 * 32  # steps x global batch x seq_len
    written = {str(p.relative_to(last)) for p in last.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == written
    for rank in (0, 1):
        assert f"data_rank{rank}.json" in written and f"rng_rank{rank}.pt" in written
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in written
    assert "mp_rank_00_model_states.pt" in written

    # A flipped byte in the newest checkpoint: the restart reports it, resumes from step 4, and
    # continues exactly where the uninterrupted run went.
    model_file = last / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    resumed = check(launch("deepspeed", smoke(ref, corpus_cache, "engine.zero_stage=2", "train.max_steps=8")))
    assert "skipping damaged checkpoint: " + str(model_file) + " does not match its sha256" in resumed.stdout
    assert "step_00000004 (step 4)" in resumed.stdout
    continued = metric_history(ref, "replay/loss")  # the same MLflow run, steps 5-8 taken again
    assert [continued[s] for s in range(5, 9)] == [losses[s] for s in range(5, 9)]
    assert metric_history(ref) == losses  # each step once under "loss"
    recommitted = json.loads((last / "MANIFEST.json").read_text())
    assert recommitted["committed_unix"] > manifest["committed_unix"] and recommitted["tokens_seen"] == 8 * 8 * 32

    # tools/generate.py samples from the newest committed checkpoint in ToST's recurrent form,
    # printing only the prompt and its continuation.
    generate = [
        sys.executable,
        str(REPO / "tools" / "generate.py"),
        str(ckpt),
        "--prompt",
        "def main(",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]
    text = subprocess.run(generate, capture_output=True, text=True, timeout=120, check=True).stdout
    assert text.startswith("def main(") and len(text) > len("def main(\n")


@pytest.mark.faults
def test_kubernetes_style_notice_to_the_node_launcher_only_is_forwarded(tmp_path, corpus_cache):
    """Kubernetes signals PID 1 only: the node launcher passes the notice on, and exits 75."""
    run_dir = tmp_path / "k8s"
    args = smoke(run_dir, corpus_cache, "engine=fsdp", "train.max_steps=50")
    at = preempt_node(args, to="launcher", forward_signals="1")
    assert (run_dir / "checkpoints" / f"step_{at:08d}" / "MANIFEST.json").is_file()


@pytest.mark.faults
def test_a_preemption_whose_checkpoint_cannot_commit_does_not_ask_for_a_requeue(tmp_path, corpus_cache):
    """A store that fails every upload (as a read-only mount or a full disk would): the notice still
    stops the run after its step, but it exits NOT_COMMITTED_EXIT_CODE, saying that no checkpoint
    was saved, instead of 75, on which a scheduler would requeue it to start over forever."""
    run_dir = tmp_path / "cannot-save"
    args = smoke(run_dir, corpus_cache, "engine=ddp", "train.max_steps=50", "checkpoint.interval=1000")
    env = {"FORWARD_SIGNALS": "0", FAIL_ENV: "upload.first_file:*"}
    code, out = launch_and_signal("node", args, when="tost: ", sig=signal.SIGTERM, to="every", env=env)
    assert code == NOT_COMMITTED_EXIT_CODE, out[-3000:]
    assert "so that the scheduler requeues the run" not in out  # the preemption line of a committed save
    (at,) = set(re.findall(r"error: no checkpoint was saved for step (\d+): 1 of 1 saves of this run failed", out))
    assert f"a restart would begin at step 0: no step is committed of {run_dir / 'checkpoints'}; preempted" in out
    assert not any((run_dir / "checkpoints").glob("step_*")), f"step {at}'s partial files were left"


def test_torchrun_rendezvous_fsdp_gpt2_tracked_on_an_mlflow_server_and_resumed(tmp_path, corpus_cache, mlflow_server):
    run_dir = tmp_path / "gpt2"
    args = smoke(run_dir, corpus_cache, "engine=fsdp", "checkpoint.interval=2", f"tracking.uri={mlflow_server}")
    args[0] = "+exp=gpt2_smoke"
    proc = check(launch("torchrun", args + ["train.max_steps=2"]))
    assert "gpt2:" in proc.stdout
    assert (run_dir / "checkpoints" / "step_00000002" / "dcp" / ".metadata").is_file()
    resumed = check(launch("torchrun", args + ["train.max_steps=3"]))
    assert "(step 2)" in resumed.stdout
    assert not (run_dir / "mlflow.db").exists()
    assert sorted(metric_history(run_dir, uri=mlflow_server)) == [1, 2, 3]
    _, run = mlflow_run(run_dir, uri=mlflow_server)
    assert run.data.params["model.name"] == "gpt2" and run.data.params["engine.name"] == "fsdp"
    assert run.info.status == "FINISHED"


def test_plain_python_single_and_deepspeed_engines_agree(tmp_path, corpus_cache):
    """`python pretrain/main.py` is a world of one; fp32 without sharding, DeepSpeed must take
    the same steps as plain PyTorch. The DeepSpeed run starts over the lock a killed build of
    its CPU all-reduce op left in torch's extension cache: without the cleanup it would wait for
    ever."""
    from torch.utils.cpp_extension import _get_build_directory

    stale = os.path.join(_get_build_directory("deepspeed_shm_comm", verbose=False), TORCH_LOCK)
    open(stale, "w").close()
    runs, outputs = {}, {}
    for engine in ("ddp", "deepspeed"):
        runs[engine] = tmp_path / engine
        args = smoke(runs[engine], corpus_cache, f"engine={engine}", "engine.zero_stage=0", "train.max_steps=3")
        outputs[engine] = check(launch("python", args, timeout=180)).stdout
    assert f"removing {stale}, left by a build of this op that was killed" in outputs["deepspeed"]
    assert not os.path.exists(stale)
    for key in ("loss", "grad_norm", "lr"):
        single, deepspeed = (metric_history(runs[e], key) for e in ("ddp", "deepspeed"))
        assert sorted(single) == [1, 2, 3]
        for step in (1, 2, 3):
            assert single[step] == pytest.approx(deepspeed[step], rel=1e-5), (key, step)


def test_smoke_experiment_streams_its_shards_from_s3(tmp_path, s3):
    from pretrain.prepare.embedded import stdlib_documents
    from pretrain.prepare.text import write_token_shards

    index = write_token_shards(
        stdlib_documents(300_000), s3.url("e2e/tokens"), 33, 128, storage_options=s3.storage_options
    )
    urls = s3.url(f"e2e/tokens/shard-{{000000..{len(index['shards']) - 1:06d}}}.tar")
    credentials = [f"+data.storage_options.{k}={v}" for k, v in s3.storage_options.items()]
    run_dir = tmp_path / "s3"
    checkpoints = [
        f"checkpoint.url={s3.url('e2e/checkpoints')}",
        "checkpoint.interval=2",
        *(f"+checkpoint.storage_options.{k}={v}" for k, v in s3.storage_options.items()),
    ]
    args = smoke(
        run_dir, "/unused", "data=shards", f'data.urls="{urls}"', *credentials, *checkpoints, "data.num_workers=2"
    )
    check(launch("deepspeed", args + ["train.max_steps=3"]))
    assert sorted(metric_history(run_dir)) == [1, 2, 3]
    assert not (run_dir / "checkpoints").exists()
    resumed = check(launch("deepspeed", args + ["train.max_steps=4"]))
    assert f"resumed from {s3.url('e2e/checkpoints/step_00000003')} (step 3)" in resumed.stdout
    assert "data.val_urls is not set: this run will not be evaluated" in resumed.stdout
    assert sorted(metric_history(run_dir)) == [1, 2, 3, 4]
    _, run = mlflow_run(run_dir)
    assert (
        run.data.params["data.storage_options.secret"] == "***" and run.data.params["data.storage_options.key"] == "***"
    )
    assert run.data.params["data.storage_options.endpoint_url"] == s3.endpoint
    assert "testing" not in (run_dir / "config.yaml").read_text()  # the moto credentials
    assert metric_history(run_dir, "data_skipped") == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}
    fs = fsspec.filesystem("s3", **s3.storage_options)
    manifest = fs.cat_file(f"{s3.bucket}/e2e/checkpoints/step_00000004/MANIFEST.json").decode()
    assert "testing" not in manifest and json.loads(manifest)["config"]["checkpoint"]["storage_options"]["key"] == "***"


@pytest.mark.parametrize(
    "engine",
    [["engine=fsdp"], ["engine=deepspeed", "engine.zero_stage=2"], ["engine=deepspeed", "engine.zero_stage=3"]],
    ids=["fsdp", "zero2", "zero3"],
)
def test_checkpoint_reshards_2_to_1_to_2_ranks_with_the_same_losses(engine, tmp_path, corpus_cache):
    """FSDP2 through DCP, DeepSpeed ZeRO-2 and ZeRO-3 through its universal checkpoint (ZeRO-3 with
    two of DeepSpeed's loader faults repaired: without that, 0.11 apart); the data continue the same
    sequence of global batches: 2 ranks to step 2, 1 rank to step 4, 2 ranks to step 6 take the
    steps of an unbroken 2-rank run (fp32, within 1e-5), and so does the average of the weights
    (train.ema_decay), which every checkpoint holds whole."""

    def args(run_dir, steps):
        return smoke(
            run_dir, corpus_cache, *engine, "checkpoint.interval=2", f"train.max_steps={steps}", "train.ema_decay=0.5"
        )

    check(launch("torchrun", args(tmp_path / "unbroken", 6)))
    expected = metric_history(tmp_path / "unbroken")
    resharded = tmp_path / "resharded"
    check(launch("torchrun", args(resharded, 2)))
    one = check(launch("python", args(resharded, 4)))
    assert "resharded: checkpoint written by 2 ranks, resumed on 1" in one.stdout + one.stderr
    check(launch("torchrun", args(resharded, 6)))
    got = metric_history(resharded)
    assert sorted(got) == list(range(1, 7))
    assert max(abs(got[s] - expected[s]) for s in got) < 1e-5, (got, expected)
    average, unbroken_average = (
        torch.load(run / "checkpoints" / "step_00000006" / "ema.pt", weights_only=True)
        for run in (resharded, tmp_path / "unbroken")
    )
    assert average.keys() == unbroken_average.keys() and "lm_head.weight" not in average  # tied to the embedding
    # As close as the weights themselves: Adam turns reduction-order rounding into ~1e-5 moves of
    # elements with near-zero gradients, so compare the whole average in norm.
    difference = sum((average[k] - unbroken_average[k]).square().sum() for k in average).sqrt()
    assert difference / sum(v.square().sum() for v in unbroken_average.values()).sqrt() < 1e-6
    assert metric_history(resharded, "eval_ema_loss")[6] == pytest.approx(
        metric_history(tmp_path / "unbroken", "eval_ema_loss")[6], abs=1e-4
    )


@pytest.mark.faults
def test_nan_steps_are_skipped_a_streak_reloads_and_a_relapse_gives_up(tmp_path, corpus_cache):
    """Rank 0's loss made NaN (fault injection) in step 3, then in steps 5 and 6: step 3 is
    skipped and counted; 5-6 reload the step-4 checkpoint and training goes on to step 8 with
    fresh data. When 5-6 fail again after the one reload allowed, the run stops with one line."""

    def args(run_dir):
        return smoke(
            run_dir,
            corpus_cache,
            "engine=fsdp",
            "checkpoint.interval=2",
            "train.max_steps=8",
            "train.bad_steps_to_reload=2",
            "train.max_reloads=1",
        )

    recovered = tmp_path / "recovered"
    out = check(launch("torchrun", args(recovered), env={NAN_ENV: "3,5,6"})).stdout
    assert "step 3 skipped" in out and "step 6 skipped: gradient norm nan (2 in a row" in out
    assert (
        "(step 4) after 2 steps in a row with a non-finite loss or gradient norm; the data go on from step 6's" in out
    )
    losses = metric_history(recovered)
    assert sorted(losses) == list(range(1, 9))
    # Skipped steps log a NaN loss; step 6's streak reloaded step 4 before it was logged, so after
    # the reload step 5 is taken again (under replay/) and step 6 for the first time.
    assert [s for s, loss in losses.items() if math.isnan(loss)] == [3, 5]
    replayed = metric_history(recovered, "replay/loss")
    assert list(replayed) == [5] and math.isfinite(replayed[5])
    assert metric_history(recovered, "steps_skipped")[8] == 3 and metric_history(recovered, "reloads")[8] == 1

    relapsed = launch("torchrun", args(tmp_path / "relapsed"), env={NAN_ENV: "5,6,5,6"})
    assert relapsed.returncode != 0
    assert (
        "error: steps 5-6 had a non-finite loss or gradient norm after 1 reloads of the last checkpoint "
        "(train.max_reloads=1): giving up"
    ) in relapsed.stderr


@pytest.mark.parametrize(
    "recipe, model, launcher, engine",
    [
        ("crate_base_smoke", "crate", "deepspeed", []),
        ("tost_vision_small_smoke", "tost_vision", "torchrun", ["engine=fsdp"]),
        ("vit_base_smoke", "vit", "python", []),
    ],
)
def test_vision_smoke_recipes_learn_digits_and_beat_chance(recipe, model, launcher, engine, tmp_path, corpus_cache):
    """Each family's smoke recipe, as users run it (ToST's with Mixup, CutMix and an average of
    the weights): the loss falls, and on the 299 held-out digits, evaluated midway and at the
    end and tracked in MLflow, the loss is well under chance's ln 10 and top-1 far above chance
    (0.1), for ToST's weight average too."""
    run_dir = tmp_path / recipe
    check(launch(launcher, [f"+exp={recipe}", f"run_dir={run_dir}", f"data.cache_dir={corpus_cache}", *engine]))
    losses = metric_history(run_dir)
    assert losses[300] < losses[25], losses
    assert metric_history(run_dir, "eval_loss")[300] < math.log(10) - 0.5
    top1, top5 = metric_history(run_dir, "eval_top1"), metric_history(run_dir, "eval_top5")
    assert sorted(top1) == [150, 300] and top1[300] > 0.4 and top5[300] >= top1[300]
    averaged = metric_history(run_dir, "eval_ema_top1")
    assert (sorted(averaged) == [150, 300] and averaged[300] > 0.4) if model == "tost_vision" else not averaged
    manifest = json.loads((run_dir / "checkpoints" / "step_00000300" / "MANIFEST.json").read_text())
    assert ("ema.pt" in manifest["files"]) == (model == "tost_vision")
    assert manifest["model"] == model
    # White-box measures per layer at each evaluation, and their plot against depth at the end.
    client, run = mlflow_run(run_dir)
    measured = {name.rsplit("_layer", 1)[0] for name in run.data.metrics if "_layer" in name}
    assert (
        measured
        == {"crate": {"rc_in", "rc_out", "sparsity"}, "tost_vision": {"rc_in", "rc_out", "pi_entropy"}, "vit": set()}[
            model
        ]
    )
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == (["whitebox.png"] if measured else [])


def lost_rank_run(launcher: str, run_dir, corpus_cache, fault: str, *extra: str) -> tuple[int, str, float]:
    """Launch with rank 1 signalling itself (`fault`, see faults.KILL_ENV) in step 5; returns the
    launcher's exit code, its output, and the seconds from the fault to the launcher's exit."""
    args = smoke(run_dir, corpus_cache, "checkpoint.interval=2", "train.heartbeat_s=0.5", *extra)
    faulted = []

    def on_line(line: str, proc: subprocess.Popen) -> None:
        if "fault injection: this rank sends itself" in line:
            faulted.append(time.monotonic())

    code, out = launch_watching(launcher, args, on_line, env={KILL_ENV: f"1:5:{fault}", "STOP_GRACE_S": "5"})
    assert faulted, out[-3000:]
    return code, out, time.monotonic() - faulted[0]


@pytest.mark.faults
@pytest.mark.parametrize(("launcher", "resume"), [("deepspeed", False), ("torchrun", True)])
def test_a_rank_killed_in_a_step_stops_every_rank_with_its_name_and_the_next_launch_resumes(
    launcher, resume, tmp_path, corpus_cache
):
    """Rank 1 is SIGKILLed in step 5's forward pass while rank 0 goes on into the step's
    collectives: rank 0 stops (exit 4) naming rank 1 and step 5, the launcher ends within a
    bounded time, and the next launch resumes from step 4, the last committed (once: resuming
    does not depend on the launcher)."""
    engine = "engine.zero_stage=2" if launcher == "deepspeed" else "engine=fsdp"
    code, out, after_s = lost_rank_run(launcher, tmp_path, corpus_cache, "SIGKILL", engine, "train.max_steps=6")
    assert code != 0
    assert "error: rank 1 was lost during step 5 (no heartbeat for" in out, out[-3000:]
    assert after_s < 40, after_s  # the gloo error and a 2.5-beat confirmation; the launchers' grace is 30 s
    if resume:
        args = smoke(tmp_path, corpus_cache, "checkpoint.interval=2", engine, "train.max_steps=6")
        resumed = check(launch(launcher, args))
        assert "(step 4)" in resumed.stdout and "step 6/6" in resumed.stdout


@pytest.mark.faults
def test_a_hung_rank_is_noticed_by_its_heartbeat_through_the_node_launcher(tmp_path, corpus_cache):
    """Rank 1 freezes (SIGSTOP) in step 5 with its connections open, so no collective fails: rank
    0's heartbeat watch gives it train.lost_rank_timeout_s, then every rank stops, and the node
    launcher exits 4 after killing the frozen rank."""
    code, out, after_s = lost_rank_run(
        "node", tmp_path, corpus_cache, "SIGSTOP", "engine=ddp", "train.max_steps=6", "train.lost_rank_timeout_s=3"
    )
    assert code == LOST_RANK_EXIT_CODE, out[-3000:]
    assert "error: rank 1 was lost during step 5 (no heartbeat for 3." in out
    assert after_s < 20, after_s  # 3 s of silence, then the node launcher's 5 s grace for the frozen rank


@pytest.mark.faults
@pytest.mark.parametrize(
    ("launcher", "engine", "action", "spiked"),
    [("deepspeed", "engine.zero_stage=2", "skip", "12,13"), ("torchrun", "engine=fsdp", "rollback", "12")],
)
def test_injected_loss_spikes_are_detected_and_skipped_or_rolled_back(
    launcher, engine, action, spiked, tmp_path, corpus_cache
):
    """Rank 0's loss is 30 times itself in the spiked steps (the other rank's is not), on 2 ranks:
    the detector finds exactly those steps; skip withholds their updates, rollback reloads step 8
    and goes on with the data; `spikes` counts them."""
    args = smoke(
        tmp_path,
        corpus_cache,
        engine,
        "train.max_steps=16",
        f"train.spike.action={action}",
        "train.spike.window=8",
        "train.spike.min_history=5",
    )
    out = check(launch(launcher, args, env={SPIKE_ENV: f"30:{spiked}"})).stdout
    detected = re.findall(r"step (\d+): loss [\d.]+ above the spike limit", out)
    assert detected == spiked.split(","), out[-3000:]
    assert metric_history(tmp_path, "spikes")[16] == len(detected)
    losses = metric_history(tmp_path)
    if action == "skip":
        assert "update skipped" in out
        assert [s for s, loss in losses.items() if math.isnan(loss)] == [12, 13]  # no applied step to average
    else:
        assert "(step 8) after a loss spike at step 12; the data go on from step 12's position" in out
        assert sorted(metric_history(tmp_path, "replay/loss")) == [9, 10, 11]  # taken again after the rollback
    assert math.isfinite(losses[16]) and losses[16] < losses[1] - 1.0


def run_with_store_outage(args: list[str], server, at: str) -> tuple[int, str]:
    """Launch with plain python; once a stdout line contains `at`, stop the object store until the
    run has ended. Returns (exit code, output)."""
    stopped = []

    def on_line(line: str, proc: subprocess.Popen) -> None:
        if at in line and not stopped:
            server.stop()
            stopped.append(line)

    code, out = launch_watching("python", args, on_line)
    if stopped:
        server.start()
    return code, out


@pytest.mark.faults
def test_an_object_store_outage_while_streaming_waits_or_stops_resumably_and_skips_no_sample(tmp_path):
    """The shards stream from an S3 server (moto's, restarted on the same port with its buckets)
    that goes down after step 3 for longer than the retries: the run stops with one line, the next
    start resumes from its checkpoint, and every step's loss equals the uninterrupted run's: no
    sample was skipped or repeated. (An outage the retries outlast: test_streaming.py.)"""
    from moto.server import ThreadedMotoServer

    from pretrain.prepare.embedded import stdlib_documents
    from pretrain.prepare.text import write_token_shards

    port = free_port()

    class Store:  # stop and start again on one port; moto's buckets live in this process
        def start(self):
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            self.server.start()

        def stop(self):
            self.server.stop()

    store = Store()
    store.start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
        fsspec.filesystem("s3", **options).mkdir("outage")
        index = write_token_shards(stdlib_documents(40_000), "s3://outage/tokens", 33, 16, storage_options=options)
        urls = f"s3://outage/tokens/shard-{{000000..{len(index['shards']) - 1:06d}}}.tar"

        def args(run_dir, *extra):
            return smoke(
                run_dir,
                "/unused",
                "data=shards",
                f'data.urls="{urls}"',
                *(f"+data.storage_options.{k}={v}" for k, v in options.items()),
                "+data.storage_options.config_kwargs.retries.max_attempts=1",  # botocore's retries off: ours count
                "data.num_workers=1",
                "data.retry_backoff_s=0.2",
                "checkpoint.interval=2",
                "train.max_steps=10",
                *extra,
            )

        check(launch("python", args(tmp_path / "unbroken")))
        expected = metric_history(tmp_path / "unbroken")

        stopped = tmp_path / "stopped"
        code, out = run_with_store_outage(args(stopped, "data.retries=1"), store, "step 3/")
        assert code == 2, out[-3000:]
        (error,) = [line for line in out.splitlines() if line.startswith("error:")]
        assert re.match(
            r"error: cannot read shard s3://outage/tokens/shard-\d+\.tar: the store did not answer "
            r"\(EndpointConnectionError after 1 retries: .*\); check that it is reachable",
            error,
        )
        assert "Traceback" not in out
        resumed = check(launch("python", args(stopped, "data.retries=1")))
        assert "resumed from" in resumed.stdout
        kept, replayed = metric_history(stopped), metric_history(stopped, "replay/loss")
        assert kept == expected and all(replayed[s] == expected[s] for s in replayed)
    finally:
        store.stop()
