"""Kill -9 at any instant, restart with the same command: the run ends exactly as if nothing had
happened. Kill points are drawn by a seeded generator, always including every phase of a save."""

from __future__ import annotations

import random
import signal

import pytest
from helpers import TINY, check, launch, mlflow_run

from pretrain.faults import ENV, POINTS

STEPS, INTERVAL, KILLS, SEED = 8, 2, 6, 20261123
SAVE_PHASES = POINTS[1:]

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.faults]


def kill_points(seed: int) -> list[tuple[str, int]]:
    """KILLS distinct (point, step) pairs in the order a run reaches them: one in each phase of
    a save, the rest anywhere, all on steps a run of STEPS steps with saves every INTERVAL meets."""
    rng = random.Random(seed)
    saves = range(INTERVAL, STEPS + 1, INTERVAL)
    every = [("step", s) for s in range(1, STEPS + 1)] + [(p, s) for s in saves for p in SAVE_PHASES]
    chosen = {(phase, rng.choice(saves)) for phase in SAVE_PHASES[:4]}  # before/during/after upload, before manifest
    while len(chosen) < KILLS:
        chosen.add(rng.choice(every))
    return sorted(chosen, key=lambda p: (p[1], POINTS.index(p[0])))


def all_losses(run_dir) -> dict[int, list[float]]:
    """Every value ever logged for each step in the run's one MLflow run (kept across every
    restart, including one before the first checkpoint): under "loss" the first time, under
    "replay/loss" each time a restart took the step again."""
    client, run = mlflow_run(run_dir)
    by_step: dict[int, list[float]] = {}
    for key in ("loss", "replay/loss"):
        for m in client.get_metric_history(run.info.run_id, key):
            by_step.setdefault(m.step, []).append(m.value)
    return by_step


def args(engine: str, run_dir, checkpoint_url, corpus_cache, storage: list[str]) -> list[str]:
    return [
        "+exp=tost_gpt2_smoke",
        *TINY,
        f"run_dir={run_dir}",
        f"data.cache_dir={corpus_cache}",
        f"engine={engine}",
        "engine.precision=fp32",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "optim.decay_steps=8",
        f"train.max_steps={STEPS}",
        f"checkpoint.interval={INTERVAL}",
        f"checkpoint.url={checkpoint_url}",
        *storage,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_cache):
    """engine -> the per-step losses of an uninterrupted run, made once per engine."""
    runs: dict[str, dict[int, float]] = {}

    def losses(engine: str) -> dict[int, float]:
        if engine not in runs:
            clean = tmp_path_factory.mktemp(f"clean-{engine}")
            check(launch("node", args(engine, clean, clean / "checkpoints", corpus_cache, [])))
            runs[engine] = {step: values[-1] for step, values in all_losses(clean).items()}
        return runs[engine]

    return losses


# Each engine once and each store once: an engine's files reach a store through the same code
# whatever the engine (a chain is a minute of the suite's time on 2 cores).
@pytest.mark.parametrize("engine, store", [("deepspeed", "s3"), ("fsdp", "file")])
def test_kill_9_anywhere_then_restart_ends_exactly_like_an_uninterrupted_run(
    engine, store, tmp_path, corpus_cache, uninterrupted, request
):
    storage: list[str] = []
    url = str(tmp_path / "crashed-checkpoints")
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        storage = [f"+checkpoint.storage_options.{k}={v}" for k, v in s3.storage_options.items()]
        url = s3.url(f"faults/{tmp_path.name}")
    expected = uninterrupted(engine)
    assert sorted(expected) == list(range(1, STEPS + 1))

    crashed = tmp_path / "crashed"
    command = args(engine, crashed, url, corpus_cache, storage)
    for point, step in kill_points(SEED):
        proc = launch("node", command, env={ENV: f"{point}:{step}"})
        assert proc.returncode == -signal.SIGKILL or proc.returncode != 0 and "Killed" in proc.stderr, (
            f"{point}:{step} was not reached: exit {proc.returncode}\n{proc.stdout[-3000:]}"
        )
    check(launch("node", command))
    replayed = all_losses(crashed)
    assert sorted(replayed) == list(range(1, STEPS + 1))
    for step, values in replayed.items():
        assert values == [expected[step]] * len(values), step  # every replay of a step gave the same loss
