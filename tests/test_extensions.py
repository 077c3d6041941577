"""DeepSpeed's op builds: a lock that a killed build left is removed; a running build is waited for.
(tests/test_e2e.py starts a DeepSpeed run over such a lock.)"""

from __future__ import annotations

import fcntl
import logging
import os
import threading

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
