"""cluster/slurm/train.sbatch on a real Slurm (tools/slurm_local.py: munged, slurmctld and two slurmd
on this host as node1 and node2, whose names do not resolve). Jobs are submitted as the README
says, from a directory outside the repository, and train the smoke experiment for real."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, last_wins, launch_command, mlflow_run

from tools.slurm_local import LocalSlurm, SlurmUnavailable

SBATCH = REPO / "cluster" / "slurm" / "train.sbatch"
STEPS = 8
JOB_TIMEOUT_S = 180
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2)
    try:
        cluster.up()
    except SlurmUnavailable as e:
        cluster.down()
        if os.geteuid() != 0:
            pytest.skip(f"no local Slurm: {e}")
        raise
    yield cluster
    cluster.down()


class Job:
    """One `sbatch` submission and what Slurm says of it."""

    def __init__(self, slurm: LocalSlurm, workdir: Path, overrides: list[str], *options: str, **env: str) -> None:
        self.slurm, self.log = slurm, workdir / "job.log"
        workdir.mkdir(parents=True, exist_ok=True)
        _, launch_env = launch_command("python", [])
        submitted = subprocess.run(
            ["sbatch", "--parsable", f"--output={self.log}", *options, str(SBATCH), *overrides],
            cwd=workdir,
            env={**launch_env, **slurm.env, **env},
            capture_output=True,
            text=True,
        )
        assert submitted.returncode == 0, submitted.stderr
        self.id = submitted.stdout.strip().split(";")[0]

    def show(self, what: str = "job") -> dict[str, str]:
        name = self.id if what == "job" else f"{self.id}.0"
        out = subprocess.run(["scontrol", "-o", "show", what, name], env=self.slurm.env, capture_output=True, text=True)
        return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)

    def wait_for(self, predicate, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        """Until `predicate()`; an ended job fails the wait at once (what did not come never will)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            ended = self.show().get("JobState") in ENDED
            assert not ended or predicate(), f"job {self.id} ended with no {what}: {self.state()}"
            assert time.monotonic() < deadline, f"job {self.id}: no {what} after {timeout_s} s: {self.state()}"
            time.sleep(0.2)

    def wait_for_line(self, pattern: str) -> None:
        self.wait_for(lambda: re.search(pattern, self.text()), repr(pattern))

    def finish(self) -> dict[str, str]:
        self.wait_for(lambda: self.show().get("JobState") in ENDED, "end")
        return self.show()

    def state(self) -> str:
        """What a failed assertion should say: Slurm's view of the job, and its log's tail."""
        shown = self.show()
        fields = ("JobState", "Reason", "ExitCode", "Restarts", "NodeList", "StartTime", "EndTime")
        return " ".join(f"{k}={shown.get(k)}" for k in fields) + "\n" + self.text()[-3000:]

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def losses(self) -> dict[int, str]:
        """Step -> loss as logged; a step logged twice (trained twice) is an error."""
        found = re.findall(r"step (\d+)/\d+ \| loss (\S+)", self.text())
        steps = [int(s) for s, _ in found]
        assert len(steps) == len(set(steps)), f"a step was trained twice: {steps}"
        return {int(s): loss for s, loss in found}


def overrides(run_dir: Path, corpus_cache: str, *extra: str) -> list[str]:
    return last_wins(
        [
            "+exp=tost_gpt2_smoke",
            *TINY,
            f"run_dir={run_dir}",
            f"data.cache_dir={corpus_cache}",
            "engine.precision=fp32",
            f"train.max_steps={STEPS}",
            "checkpoint.interval=4",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, corpus_cache) -> dict[int, str]:
    """An uninterrupted 2-node job's losses. Beside it, on node1, a second job runs at the same
    time with PROCS_PER_NODE=2 exported: jobs sharing a node each rendezvous on a port of their
    own. Both drop the script's --exclusive (--oversubscribe) to share node1."""
    root = tmp_path_factory.mktemp("reference")
    two_nodes = Job(slurm, root / "two-nodes", overrides(root / "run", corpus_cache), "--nodes=2", "--oversubscribe")
    beside = Job(
        slurm,
        root / "beside",
        overrides(root / "run-beside", corpus_cache, "train.max_steps=2"),
        "--nodes=1",
        "--nodelist=node1",
        "--oversubscribe",
        PROCS_PER_NODE="2",
    )
    for job in (two_nodes, beside):
        state = job.finish()
        assert state["JobState"] == "COMPLETED", job.state()
        assert "done: checkpoints in" in job.text()
    assert "2 nodes x 1 ranks" in two_nodes.text() and "1 nodes x 2 ranks" in beside.text()
    ports = [re.search(r"rendezvous 127\.0\.0\.1:(\d+)", job.text()).group(1) for job in (two_nodes, beside)]
    assert ports[0] != ports[1]
    losses = two_nodes.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_a_submission_from_anywhere_trains_on_two_nodes_whose_names_do_not_resolve(reference):
    """No --gpus-per-node on a partition without GPUs, a submission outside the repository,
    rendezvous on the first node's NodeAddr: all of this ran in `reference`."""
    with pytest.raises(OSError):
        socket.gethostbyname("node1")
    assert len(reference) == STEPS


def test_a_notice_to_the_batch_shell_checkpoints_requeues_and_resumes_with_the_same_losses(
    slurm, reference, tmp_path, corpus_cache
):
    """`scancel --batch --signal=USR1` (what `--signal=B:USR1@...` does) reaches only the batch
    shell, which passes it to the ranks: they commit a checkpoint and exit 75, the script requeues
    the job, and the requeued job resumes and ends with every step's loss as in an uninterrupted run.
    The job has whole nodes, and its step every CPU of them."""
    job = Job(slurm, tmp_path, overrides(tmp_path / "run", corpus_cache), "--nodes=2")
    job.wait_for_line(r"step 2/")
    assert job.show()["NumCPUs"] == str(2 * slurm.cpus_per_node)
    # What task/affinity or a cgroup would bind each node's ranks to (task/none here binds nothing).
    assert {environ(pid)["SLURM_CPUS_PER_TASK"] for pid in ranks_of(job.id)} == {str(slurm.cpus_per_node)}
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], env=slurm.env, check=True)
    job.wait_for(lambda: job.show().get("Restarts") == "1" and job.show()["JobState"] == "PENDING", "requeue")
    stopped_at = int(re.search(r"preempted \(SIGUSR1\) after step (\d+)", job.text()).group(1))
    assert stopped_at < STEPS and "requeueing job" in job.text()
    assert mlflow_run(tmp_path / "run")[1].info.status == "KILLED"
    # A requeued job waits about two minutes before it may start again. Let it start in a few
    # seconds: a start in the second of its requeue would meet the old run's revoked credential.
    subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now+3"], env=slurm.env, check=True)
    state = job.finish()
    assert state["JobState"] == "COMPLETED", job.state()
    assert f"(step {stopped_at})" in job.text() and "restart 1" in job.text()
    assert job.losses() == reference


def test_a_rank_killed_with_sigkill_ends_the_job_non_zero_within_bounded_time(slurm, tmp_path, corpus_cache):
    job = Job(slurm, tmp_path, overrides(tmp_path / "run", corpus_cache, "train.max_steps=200"), "--nodes=2")
    job.wait_for_line(r"step 2/")
    (rank1,) = [pid for pid in ranks_of(job.id) if environ(pid)["RANK"] == "1"]
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.monotonic()
    state = job.finish()
    took = time.monotonic() - killed_at
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", state
    assert took < 60, took  # the survivor notices within seconds (heartbeat), then both launchers end
    assert "rank 1 was lost during step" in job.text()
    assert "was killed by signal 9" in job.text()


def ranks_of(job_id: str) -> list[int]:
    """Pids of the job's training ranks (children of a node launcher), found by their environment."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if not Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[1].endswith(b"launch_node.sh"):
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and b"pretrain/main.py" in (proc / "cmdline").read_bytes():
            found.append(int(proc.name))
    return found


def environ(pid: int) -> dict[str, str]:
    pairs = (v.decode().split("=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
    return dict(pairs)
