"""cluster/launch_node.sh, the per-node launcher of the Slurm and Kubernetes templates, on every exit
path with 2, 4 and 8 ranks. The ranks are tests/cluster/fake_rank.sh (through PYTHON=), so that 8
of them cost nothing; the real ranks meet the launcher in tests/test_e2e.py and the Slurm tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO

LAUNCHER = REPO / "cluster" / "launch_node.sh"
FAKE_RANK = Path(__file__).with_name("fake_rank.sh")
GRACE_S = 1  # STOP_GRACE_S: how long hung peers of a failed rank live on

pytestmark = pytest.mark.slow


def start(tmp_path: Path, ranks: int, plan: str, pid1: bool = False, **env: str) -> subprocess.Popen:
    """The launcher as one node of `ranks` fake ranks following `plan` (see fake_rank.sh); with
    `pid1`, as PID 1 of a new PID namespace, as in a container."""
    cmd = [str(LAUNCHER)]
    if pid1:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
    env = {
        **os.environ,
        "NNODES": "1",
        "NODE_RANK": "0",
        "PROCS_PER_NODE": str(ranks),
        "MASTER_ADDR": "127.0.0.1",
        "PYTHON": str(FAKE_RANK),
        "STOP_GRACE_S": str(GRACE_S),
        "FAKE_DIR": str(tmp_path),
        "FAKE_PLAN": plan,
        **env,
    }
    # A session of its own, so that a launcher that never ends can be killed with all its ranks.
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def launcher_pid(proc: subprocess.Popen, pid1: bool) -> int:
    """The launcher's pid as seen from here: under unshare, the child that is PID 1 inside."""
    if not pid1:
        return proc.pid
    for _ in range(100):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise AssertionError("unshare started no child")


def wait_for_ranks(tmp_path: Path, ranks: int) -> list[int]:
    """Block until every rank has written its pid, so that a signal finds them all started."""
    deadline = time.monotonic() + 10
    while len(pids := sorted(tmp_path.glob("rank-*.pid"))) < ranks:
        assert time.monotonic() < deadline, f"{len(pids)} of {ranks} ranks started"
        time.sleep(0.02)
    time.sleep(0.1)  # the pid is written before the rank's trap is set
    return [int(p.read_text()) for p in pids]


def finish(proc: subprocess.Popen, tmp_path: Path, within_s: float) -> tuple[int, str, float]:
    """The launcher's exit code, stderr and run time; it must end within `within_s`, write no flood
    of messages, and leave no rank running."""
    began = time.monotonic()
    try:
        _, err = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"the launcher did not end within {within_s} s; stderr: {err[-2000:]}") from None
    took = time.monotonic() - began
    assert len(err) < 4000 and "no such job" not in err, err[-2000:]
    for pid_file in tmp_path.glob("rank-*.pid"):
        cmdline = Path(f"/proc/{pid_file.read_text().strip()}/cmdline")
        assert not (cmdline.exists() and b"fake_rank" in cmdline.read_bytes()), f"{pid_file.name} still runs"
    return proc.returncode, err, took


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_all_ranks_succeed(tmp_path, ranks):
    code, _, _ = finish(start(tmp_path, ranks, "ok"), tmp_path, within_s=10)
    assert code == 0
    assert len(list(tmp_path.glob("rank-*.pid"))) == ranks


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_one_rank_fails_and_its_hung_peers_are_killed_after_the_grace(tmp_path, ranks):
    """The failed rank's code is the node's, however many peers are killed after it."""
    code, err, took = finish(start(tmp_path, ranks, "one_fails", FAKE_RANK="1", FAKE_CODE="3"), tmp_path, 10)
    assert code == 3, err
    assert took >= GRACE_S and "rank pid" in err and "exited 3" in err


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_all_ranks_fail_together(tmp_path, ranks):
    code, err, took = finish(start(tmp_path, ranks, "all_fail", FAKE_CODE="1"), tmp_path, 10)
    assert code == 1, err
    assert took < GRACE_S  # every rank was reaped; nothing waited for the grace


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("forward", [True, False], ids=["kubernetes", "slurm"])
def test_preempted(tmp_path, ranks, forward):
    """Kubernetes signals only the launcher, which forwards; Slurm signals every process."""
    proc = start(tmp_path, ranks, "preempt", FORWARD_SIGNALS="1" if forward else "0")
    ranks_pids = wait_for_ranks(tmp_path, ranks)
    os.kill(proc.pid, signal.SIGTERM)
    if not forward:
        for pid in ranks_pids:
            os.kill(pid, signal.SIGTERM)
    code, err, _ = finish(proc, tmp_path, within_s=10)
    assert code == 75, err


def test_a_lost_peer_elsewhere_is_exit_4_but_a_rank_killed_here_is_its_signal(tmp_path):
    """Ranks that stopped because a peer on another node was lost report 4 (the node is healthy);
    a rank killed here (the OOM killer's SIGKILL) reports 137, and its peers' 4s do not hide it."""
    code, err, _ = finish(start(tmp_path, 4, "one_fails", FAKE_RANK="9", FAKE_PEERS="notice"), tmp_path, 10)
    assert code == 4, err
    killed = tmp_path / "killed"
    killed.mkdir()
    code, err, _ = finish(
        start(killed, 4, "one_fails", FAKE_RANK="2", FAKE_PEERS="notice", FAKE_CODE="kill"), killed, 10
    )
    assert code == 128 + signal.SIGKILL and "was killed by signal 9" in err, err


def test_schedulers_can_renumber_the_preempted_and_lost_peer_codes(tmp_path):
    """Kubeflow's ExitCode restart policy retries only 128-255."""
    proc = start(tmp_path, 2, "preempt", FORWARD_SIGNALS="1", PREEMPTED_EXIT="143")
    wait_for_ranks(tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, tmp_path, 10)[0] == 143
    lost = tmp_path / "lost"
    lost.mkdir()
    assert (
        finish(start(lost, 2, "one_fails", FAKE_RANK="9", FAKE_PEERS="notice", LOST_PEER_EXIT="129"), lost, 10)[0]
        == 129
    )


def test_a_notice_after_a_rank_failed_stops_the_node_at_once(tmp_path):
    """No checkpoint can commit once a rank has failed, so a scheduler's TERM need not wait out
    STOP_GRACE_S: the launcher kills the hung ranks and exits with the failure."""
    proc = start(tmp_path, 8, "one_fails", FAKE_RANK="1", FAKE_CODE="3", STOP_GRACE_S="600")
    wait_for_ranks(tmp_path, 8)
    time.sleep(0.6)  # rank 1 has failed
    proc.send_signal(signal.SIGTERM)
    code, err, took = finish(proc, tmp_path, within_s=10)
    assert code == 3 and took < 5, (code, took, err)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
@pytest.mark.parametrize("plan", ["preempt", "one_fails"])
def test_as_pid_1_of_a_container(tmp_path, plan):
    """PID 1 receives only the signals it handles, and adopts every orphan: the pod's TERM reaches
    the ranks (exit 75), and a failed rank ends the pod with its code."""
    proc = start(tmp_path, 4, plan, pid1=True, FORWARD_SIGNALS="1", FAKE_RANK="1", FAKE_CODE="3")
    wait_for_ranks(tmp_path, 4)
    if plan == "preempt":
        os.kill(launcher_pid(proc, pid1=True), signal.SIGTERM)
    code, err, _ = finish(proc, tmp_path, within_s=10)
    assert code == (75 if plan == "preempt" else 3), err
