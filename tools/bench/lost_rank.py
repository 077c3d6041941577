"""How long a run takes to notice a lost rank, and to end, under each launcher.

    python tools/bench/lost_rank.py                                  # deepspeed, torchrun, node
    python tools/bench/lost_rank.py --launchers node --heartbeat-s 0.5 --write-doc docs/benchmarks.md

Two CPU ranks train the embedded ToST smoke run (tiny model); rank 1 kills itself with SIGKILL
in step 5's forward pass (fault injection, WHITEBOX_KILL_RANK) while rank 0 goes on into the
step's collectives. Measured from the line the dying rank prints: until
a surviving rank prints its verdict (`error: rank 1 was lost ...`), and until the launcher exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_write_doc_flag, device_name, heading, publish

from pretrain.distributed import free_port
from pretrain.faults import KILL_ENV

REPO = Path(__file__).resolve().parents[2]
MAIN = str(REPO / "pretrain" / "main.py")
TINY_RUN = [
    "+exp=tost_gpt2_smoke",
    *("model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.seq_len=32"),
    *("train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=1", "train.max_steps=8"),
    *("data.stdlib_max_mb=0.25", "data.samples_per_shard=128", "engine.precision=fp32", "checkpoint.interval=2"),
]
FAULT_LINE = "fault injection: this rank sends itself"
VERDICT_LINE = "error: rank 1 was lost"


def command(launcher: str) -> tuple[list[str], dict[str, str]]:
    """Two ranks on this machine under `launcher`, as the README starts them."""
    port = str(free_port())
    if launcher == "deepspeed":
        return [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", port, MAIN], {}
    if launcher == "torchrun":
        rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        return [shutil.which("torchrun"), "--nnodes", "1", "--nproc_per_node", "2", *rdzv, MAIN], {}
    node = {"NNODES": "1", "NODE_RANK": "0", "PROCS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return [str(REPO / "cluster" / "launch_node.sh")], node


def measure(launcher: str, overrides: list[str]) -> dict:
    cmd, extra_env = command(launcher)
    env = {**os.environ, **extra_env, KILL_ENV: "1:5", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd + overrides, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    faulted = noticed = None
    for line in proc.stdout:
        if FAULT_LINE in line and faulted is None:
            faulted = time.monotonic()
        if VERDICT_LINE in line and noticed is None:
            noticed = time.monotonic()
    code = proc.wait()
    ended = time.monotonic()
    return {
        "launcher": launcher,
        "exit_code": code,
        "noticed_s": None if faulted is None or noticed is None else round(noticed - faulted, 2),
        "ended_s": None if faulted is None else round(ended - faulted, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launchers", nargs="+", default=["deepspeed", "torchrun", "node"])
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="train.heartbeat_s")
    add_write_doc_flag(parser)
    args = parser.parse_args()
    report = {"device": device_name(), "heartbeat_s": args.heartbeat_s, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for launcher in args.launchers:
            run_dir = f"{tmp}/{launcher}"
            overrides = [*TINY_RUN, f"run_dir={run_dir}", f"data.cache_dir={tmp}/cache"]
            overrides.append(f"train.heartbeat_s={args.heartbeat_s}")
            result = measure(launcher, overrides)
            report["runs"].append(result)
            print(f"{launcher}: {result}", file=sys.stderr)
    publish(report, args.write_doc, lambda cmd: markdown(report, cmd))
    return 0


def markdown(report: dict, cmd: str) -> tuple[str, str]:
    rows = "\n".join(
        f"| {r['launcher']} | {r['noticed_s']} | {r['ended_s']} | {r['exit_code']} |" for r in report["runs"]
    )
    text = f"""{heading("Time to notice a lost rank", report["device"])}

`{cmd}`

Two CPU ranks (gloo), `train.heartbeat_s={report["heartbeat_s"]}`; rank 1 is SIGKILLed in step 5's
forward pass. Seconds from its death to the survivor's verdict line and to the launcher's exit:

| launcher | noticed (s) | launcher exited (s) | launcher exit code |
|---|---|---|---|
{rows}
"""
    return f"lost_rank {report['device']}", text


if __name__ == "__main__":
    sys.exit(main())
