"""What training has asked the tracking server to record and the server has not acknowledged yet.

Training appends a row (one interval's metrics, a status, an artifact) and goes on; a sender sends
rows in order and truncates the file once every row in it is acknowledged. So a slow or
unreachable server never holds training up, nothing is lost while it is down (the rows wait on
local disk, up to a bound), and rows left when a run ends, or dies, are sent by the next start or
by `tools/mlflow_sync.py`. A row sent twice (acknowledged, then the process died before it
truncated) is harmless: it is the same metric with the same timestamp, which MLflow's SQL stores
keep once.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator

JOURNAL_FILE = "mlflow_journal.jsonl"  # in run_dir


class Journal:
    def __init__(self, run_dir: str, max_bytes: int):
        self.path = os.path.join(run_dir, JOURNAL_FILE)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()  # appends (training thread) against truncation (sender)
        self.refused = 0  # rows not kept because the journal was full

    def append(self, row: dict) -> bool:
        """Keep `row` until it is sent; False (and counted) when the journal is full."""
        line = json.dumps(row, separators=(",", ":")) + "\n"
        with self.lock:
            size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            if size + len(line) > self.max_bytes:
                self.refused += 1
                return False
            with open(self.path, "a") as f:
                f.write(line)
        return True

    def pending(self, start: int = 0) -> Iterator[tuple[dict, int]]:
        """The rows from offset `start` on, oldest first, each with the offset just past it."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            for line in iter(f.readline, b""):
                if not line.endswith(b"\n"):  # cut short by a kill while being written: never acknowledged
                    return
                yield json.loads(line), f.tell()

    def sent(self, offset: int) -> int:
        """Every row before `offset` is acknowledged: empty the file if no row came after them, and
        return where the next unsent row starts. Rows are not removed one by one, so the file
        grows only while rows wait (an outage)."""
        with self.lock:
            if os.path.exists(self.path) and os.path.getsize(self.path) == offset:
                os.truncate(self.path, 0)
                return 0
        return offset

    def rows(self) -> int:
        return sum(1 for _ in self.pending())

    def max_step(self, run_id: str) -> int | None:
        """The highest step of `run_id`'s metric rows still waiting here."""
        return max(
            (row["step"] for row, _ in self.pending() if row["run"] == run_id and "metrics" in row), default=None
        )
