"""MLflow tracking: one MLflow run per training run, continued on resume, logged by rank 0 only."""

from __future__ import annotations

import os
import time
from typing import Any

from pretrain.config import TrackingConfig, flatten

PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch request
RUN_ID_FILE = "mlflow_run_id"  # in run_dir: the run a restart before the first checkpoint continues


class Tracker:
    """Does nothing on ranks other than 0, so callers need no rank checks."""

    def __init__(self, cfg: TrackingConfig, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        from mlflow.tracking import MlflowClient  # heavy import: rank 0 only

        self.uri = cfg.uri or f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.cfg = cfg
        self.run_dir = run_dir

    def previous_run_id(self) -> str | None:
        """The MLflow run this run_dir's last start opened, if this tracking server still has it:
        a run restarted before its first checkpoint (which records the id) continues that run."""
        if not self.enabled or not os.path.isfile(path := os.path.join(self.run_dir, RUN_ID_FILE)):
            return None
        with open(path) as f:
            run_id = f.read().strip()
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:  # not on this tracking server (tracking.uri changed, run deleted): a new run
            return None
        return run_id

    def start(self, params: dict[str, Any], resume_run_id: str | None) -> str | None:
        """Continue `resume_run_id` if given, else open a new run and log `params` (flattened)."""
        if not self.enabled:
            return None
        self.run_id = self._open(params, resume_run_id)
        with open(os.path.join(self.run_dir, RUN_ID_FILE), "w") as f:
            f.write(self.run_id)
        return self.run_id

    def _open(self, params: dict[str, Any], resume_run_id: str | None) -> str:
        from mlflow.entities import Param

        if resume_run_id:
            self.client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
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
        return run_id

    def _artifact_location(self) -> str | None:
        # A local tracking database keeps its artifacts beside it, not in the current directory.
        if self.uri.startswith("sqlite:"):
            return "file://" + os.path.join(os.path.abspath(self.run_dir), "mlartifacts")
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
