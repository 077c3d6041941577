"""DeepSpeed's op builds: a lock that a killed build left is removed; a running build is waited for."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading

import pytest
from helpers import MAIN, REPO, TINY

from pretrain.engines.extensions import BUILD_LOCK, TORCH_LOCK, exclusive_build


def test_a_lock_left_by_a_dead_build_is_removed_and_a_live_build_is_waited_for(tmp_path, caplog) -> None:
    build_dir = tmp_path / "deepspeed_shm_comm"
    build_dir.mkdir()
    (build_dir / TORCH_LOCK).touch()  # what a build killed midway leaves
    with caplog.at_level(logging.WARNING, logger="pretrain"), exclusive_build(str(build_dir)):
        assert not (build_dir / TORCH_LOCK).exists()
    assert f"removing {build_dir / TORCH_LOCK}, left by a build of this op that was killed" in caplog.text

    # A live build holds the flock (and its own lock file): the next one waits, and removes nothing.
    with open(tmp_path / BUILD_LOCK, "w") as live:
        fcntl.flock(live, fcntl.LOCK_EX)
        (build_dir / TORCH_LOCK).touch()
        entered = threading.Event()

        def build() -> None:
            with exclusive_build(str(build_dir)):
                entered.set()

        waiter = threading.Thread(target=build)
        waiter.start()
        assert not entered.wait(0.5) and (build_dir / TORCH_LOCK).exists()
        os.remove(build_dir / TORCH_LOCK)  # the live build finishes
    waiter.join(timeout=10)
    assert entered.is_set()


@pytest.mark.slow
def test_a_deepspeed_run_starts_after_a_build_that_was_killed(tmp_path) -> None:
    """A fresh extension cache holding the lock a killed first build left: without the cleanup the
    run would wait on it for ever; with it, it says so, builds (saying so first), and trains."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / TORCH_LOCK).touch()
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(extensions),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    args = ["+exp=tost_gpt2_smoke", *TINY, f"run_dir={tmp_path / 'run'}", "engine.zero_stage=2", "train.max_steps=1"]
    run = subprocess.run(
        [sys.executable, MAIN, *args, f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "left by a build of this op that was killed" in out
    assert "building DeepSpeed's deepspeed_shm_comm op into" in out
    assert (extensions / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
