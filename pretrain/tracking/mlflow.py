"""MLflow tracking: one MLflow run per training run, continued on resume, logged by rank 0 only.

Only opening a new run talks to the server from the training thread (it needs the run's id).
Everything after that goes through the journal (journal.py): appended by training, sent in order
by a background thread, kept on local disk while the server is unreachable and sent when it is
back, so that tracking never stops or slows training.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from pretrain.config import TrackingConfig, flatten
from pretrain.errors import UserError
from pretrain.tracking.journal import Journal

log = logging.getLogger("pretrain")
PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch request
RUN_ID_FILE = "mlflow_run_id"  # in run_dir: the run a restart before the first checkpoint continues
REPLAYED_PREFIX = "replay/"  # metrics of steps a resumed run takes again (see Tracker.start)
SYNC_COMMAND = "python tools/mlflow_sync.py"


def client_for(uri: str, request_timeout_s: float):
    """An MlflowClient that gives up on an HTTP request after `request_timeout_s`, without
    MLflow's own retries (minutes, by default): the sender retries, with its own backoff. It
    prints no "View run at" line: the run's last log line names the run."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if uri.startswith(("http://", "https://")):
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(request_timeout_s)))
    return MlflowClient(tracking_uri=uri)


def unreachable(exc: Exception) -> bool:
    """True when `exc` says the server is down or failing (worth retrying), False when it refused
    the request itself (a 4xx: retrying would fail the same way)."""
    from mlflow.exceptions import MlflowException

    return not (isinstance(exc, MlflowException) and 400 <= exc.get_http_status_code() < 500)


def one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}"


def send(client, row: dict) -> None:
    """Record one journal row on the server."""
    from mlflow.entities import Metric

    run_id = row["run"]
    if "metrics" in row:
        metrics = [Metric(k, float(v), row["ts"], row["step"]) for k, v in row["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif "artifact" in row:
        if os.path.exists(row["artifact"]):  # removed since: nothing to send
            client.log_artifact(run_id, row["artifact"])
    elif row["status"] == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=row["status"], end_time=row["ts"])


def send_pending(client, journal: Journal, offset: int = 0) -> tuple[int, int]:
    """Send the journal's rows from `offset` in order, until one fails with the server unreachable
    (raised). A row the server refuses is dropped with a warning. Returns (rows sent, next offset)."""
    sent = 0
    for row, end in journal.pending(offset):
        try:
            send(client, row)
        except Exception as exc:
            if unreachable(exc):
                raise
            log.warning("tracking: the server refused a row (dropped): %s; row %s", one_line(exc), row)
        sent += 1
        offset = journal.sent(end)
    return sent, offset


class Sender(threading.Thread):
    """Sends the journal's rows in order; on failure waits with exponential backoff and tries
    again, warning once per outage. `close` asks it to send what is left and stop."""

    def __init__(self, client, journal: Journal, cfg: TrackingConfig, uri: str):
        super().__init__(name="mlflow-sender", daemon=True)
        self.client, self.journal, self.cfg, self.uri = client, journal, cfg, uri
        self.wake = threading.Event()
        self.closing = False  # send what is left, then stop
        self.stopped = False  # stop now: what is left stays in the journal
        self.outage_since: float | None = None

    def run(self) -> None:
        offset, backoff = 0, self.cfg.retry_backoff_s
        while not self.stopped:
            self.wake.wait(timeout=backoff if self.outage_since is not None else None)
            self.wake.clear()
            try:
                sent, offset = send_pending(self.client, self.journal, offset)
            except Exception as exc:
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    log.warning(
                        "tracking: %s unreachable (%s); metrics wait in %s (at most tracking.buffer_max_mb=%g "
                        "MiB) and are sent when it is back; retrying every %g-%g s",
                        self.uri,
                        one_line(exc),
                        self.journal.path,
                        self.cfg.buffer_max_mb,
                        self.cfg.retry_backoff_s,
                        self.cfg.max_backoff_s,
                    )
                backoff = min(2 * backoff, self.cfg.max_backoff_s)
                continue
            if self.outage_since is not None:
                log.warning(
                    "tracking: %s is back after %.1f s; sent the %d rows that waited",
                    self.uri,
                    time.monotonic() - self.outage_since,
                    sent,
                )
                self.outage_since, backoff = None, self.cfg.retry_backoff_s
            if self.closing and offset == 0:
                return

    def notify(self) -> None:
        self.wake.set()

    def close(self, timeout_s: float) -> bool:
        """Send what is left within `timeout_s`; True when all of it was sent."""
        self.closing = True
        self.notify()
        self.join(timeout=timeout_s)
        flushed = not self.is_alive()
        self.stopped = True
        self.notify()
        return flushed


class Tracker:
    """Does nothing on ranks other than 0, so callers need no rank checks."""

    def __init__(self, cfg: TrackingConfig, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        self.replay_until = 0  # steps up to this one were logged by an earlier start of this run
        self.logged_until: dict[str, int] = {}  # by this start: metric -> highest step
        if not enabled:
            return
        self.uri = cfg.uri or f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db"
        self.client = client_for(self.uri, cfg.request_timeout_s)
        self.cfg = cfg
        self.run_dir = run_dir
        self.journal = Journal(run_dir, int(cfg.buffer_max_mb * 2**20))
        self.sender = Sender(self.client, self.journal, cfg, self.uri)

    def previous_run_id(self) -> str | None:
        """The MLflow run this run_dir's last start opened, if this tracking server still has it
        (or cannot be asked): a run restarted before its first checkpoint (which records the id)
        continues that run."""
        if not self.enabled or not os.path.isfile(path := os.path.join(self.run_dir, RUN_ID_FILE)):
            return None
        with open(path) as f:
            run_id = f.read().strip()
        try:
            self.client.get_run(run_id)
        except Exception as exc:  # not on this tracking server (tracking.uri changed, run deleted): a new run
            return run_id if unreachable(exc) else None
        return run_id

    def start(self, params: dict[str, Any], resume_run_id: str | None, step: int) -> str | None:
        """Continue `resume_run_id` from `step` if given, else open a new run and log `params`
        (flattened). Steps up to the highest one an earlier start logged are replayed (see
        `log_metrics`), so that each step's point appears once in the history (and mlflow ui's
        charts) under a metric's own name."""
        if not self.enabled:
            return None
        self.run_id = resume_run_id or self._open(params)
        with open(os.path.join(self.run_dir, RUN_ID_FILE), "w") as f:
            f.write(self.run_id)
        self.sender.start()
        if resume_run_id:
            self.replay_until = max(step, self._logged_until())
            self._append({"status": "RUNNING"})
        return self.run_id

    def _open(self, params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        try:
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(self.cfg.experiment, artifact_location=self._artifact_location())
            )
            run_id = self.client.create_run(experiment_id, run_name=self.cfg.run_name).info.run_id
            items = [Param(k, str(v)) for k, v in sorted(flatten(params).items())]
            for i in range(0, len(items), PARAMS_PER_CALL):
                self.client.log_batch(run_id, params=items[i : i + PARAMS_PER_CALL])
        except Exception as exc:
            raise UserError(
                f"tracking.uri={self.uri} cannot open a new MLflow run ({one_line(exc)}): start the server, "
                f"or set tracking.uri to a reachable one (null: a sqlite file in the run directory)"
            ) from exc
        return run_id

    def _logged_until(self) -> int:
        """The highest step this run has logged its loss at, on the server or waiting in the journal."""
        server = 0
        try:
            server = max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=0)
        except Exception as exc:
            log.warning("tracking: cannot read the run's history (%s); replayed steps are not marked", one_line(exc))
        return max(server, self.journal.max_step(self.run_id) or 0)

    def _artifact_location(self) -> str | None:
        # A local tracking database keeps its artifacts beside it, not in the current directory.
        if self.uri.startswith("sqlite:"):
            return "file://" + os.path.join(os.path.abspath(self.run_dir), "mlartifacts")
        return None

    def _append(self, row: dict) -> None:
        row = {"run": self.run_id, "ts": int(time.time() * 1000), **row}
        if not self.journal.append(row) and self.journal.refused == 1:
            log.warning(
                "tracking: %s is full (tracking.buffer_max_mb=%g); rows from %s on are not kept",
                self.journal.path,
                self.cfg.buffer_max_mb,
                row,
            )
        self.sender.notify()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log `metrics` at `step`; a metric at a step it was logged at or beyond already (the run
        resumed, or reloaded its checkpoint, and takes those steps again) goes to `replay/<name>`."""
        if not self.enabled:
            return
        row = {}
        for key, value in metrics.items():
            if step <= max(self.replay_until, self.logged_until.get(key, 0)):
                key = REPLAYED_PREFIX + key
            else:
                self.logged_until[key] = step
            row[key] = float(value)
        self._append({"step": step, "metrics": row})

    def log_artifact(self, path: str) -> None:
        if self.enabled:
            self._append({"artifact": os.path.abspath(path)})

    def finish(self, status: str = "FINISHED") -> None:
        """Record the run's end, and wait up to `tracking.flush_timeout_s` for every row to be sent;
        what the server has not taken by then stays in the journal, and the log says how to send it."""
        if not self.enabled or not self.run_id:
            return
        self._append({"status": status})
        if not self.sender.close(self.cfg.flush_timeout_s):
            log.warning(
                "tracking: %s is still unreachable; %d rows wait in %s: send them with `%s %s` once it is back "
                "(a resumed run sends them too)",
                self.uri,
                self.journal.rows(),
                self.journal.path,
                SYNC_COMMAND,
                self.run_dir,
            )
        if self.journal.refused:
            log.warning("tracking: %d rows were not kept (the journal was full)", self.journal.refused)
