"""An export published to MLflow: its directory logged as an artifact of the training run
(`--mlflow-run`), and registered as a new version of a registered model (`--register`).

Everything that can be checked before the export is (the flags, the tracking store, the run, a
free artifact path), so that a refusal writes nothing; the artifact is logged only once the
output is committed, from the committed files (a remote output's staged copy, not read back), so
that no artifact or model version stands for an export that failed.
A model version's source is `runs:/<run id>/<artifact path>`: MLflow 3's registry takes a plain
directory of files there, no MLmodel file needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from pretrain.checkpoint.store import MANIFEST_NAME
from pretrain.data.storage import url_to_fs
from pretrain.errors import UserError

ARTIFACT_DIR = "exports"  # in the run's artifacts: exports/<subcommand>-step<step>[-ema][-N]
AUTO = "auto"  # --mlflow-run auto: the run the source's provenance names
REQUEST_TIMEOUT_S = 60.0  # an HTTP request (not a whole upload) that waits longer fails
TAGS = ("step", "config_hash", "source", "weights", "tokens_seen")  # of the provenance, on a model version


def add_mlflow_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--mlflow-run",
        metavar="ID",
        help="log the written directory as an artifact of this MLflow run (the training run: 'auto' takes the "
        f"source's provenance mlflow_run_id), under {ARTIFACT_DIR}/<subcommand>-step<step>",
    )
    sub.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="where that run is (default: the source run's tracking.uri, read from its checkpoint's manifest, or "
        "the mlflow.db in its run_dir; else MLflow's default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    sub.add_argument(
        "--register",
        metavar="NAME",
        help="register the logged directory as a new version of registered model NAME (tags: step, "
        "config_hash, source, weights); needs --mlflow-run",
    )


@dataclass(frozen=True)
class Publication:
    """Where an export goes in MLflow, checked before it is written."""

    client: Any  # an MlflowClient
    uri: str
    run_id: str
    artifact_path: str
    register: str | None
    tags: dict[str, str]


def prepare_publication(args: argparse.Namespace, provenance: dict[str, Any], options: dict) -> Publication | None:
    """None without --mlflow-run; else the checked publication (a UserError when the flags, the
    tracking store or the run are wrong), before anything is written."""
    run_id, name = getattr(args, "mlflow_run", None), getattr(args, "register", None)
    if run_id is None:
        if name is not None:
            raise UserError("--register needs --mlflow-run: the run whose logged export becomes the model version")
        return None
    if name is not None and not name.strip():
        raise UserError("--register needs a registered model name")
    if run_id == AUTO:
        run_id = provenance.get("mlflow_run_id")
        if not run_id:
            raise UserError(
                f"--mlflow-run {AUTO}: {args.source} records no MLflow run (its provenance has no mlflow_run_id); "
                "give the run's id"
            )
    uri = args.tracking_uri or source_tracking_uri(args.source, provenance, options) or default_tracking_uri()
    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):
        raise UserError(f"--tracking-uri {uri}: no such MLflow database: give the training run's tracking store")
    from pretrain.tracking.mlflow import client_for, one_line

    client = client_for(uri, REQUEST_TIMEOUT_S)
    try:
        run = client.get_run(run_id)
        taken = {info.path for info in client.list_artifacts(run_id, ARTIFACT_DIR)}
    except Exception as exc:
        raise UserError(f"--mlflow-run {run_id}: not a run of {uri} ({one_line(exc)})") from None
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"--mlflow-run {run_id}: the run is deleted in {uri}: restore it, or give another run")
    return Publication(client, uri, run_id, free_artifact_path(args.command, provenance, taken), name, tags(provenance))


def free_artifact_path(command: str, provenance: dict[str, Any], taken: set[str]) -> str:
    """exports/<subcommand>-step<step>, -ema for the weight average, -2, -3... when the run holds one
    already: a logged export (which a model version may point at) is never overwritten."""
    step = provenance.get("step")
    base = f"{ARTIFACT_DIR}/{command}" + (f"-step{step}" if step is not None else "")
    base += "-ema" if provenance.get("weights") == "ema" else ""
    path, n = base, 1
    while path in taken:
        n += 1
        path = f"{base}-{n}"
    return path


def tags(provenance: dict[str, Any]) -> dict[str, str]:
    return {key: str(provenance[key]) for key in TAGS if provenance.get(key) is not None}


def source_tracking_uri(source: str, provenance: dict[str, Any], options: dict) -> str | None:
    """The tracking store of the run that wrote the checkpoint the weights come from, when its
    manifest is at hand: the store just read, or a local one. Its tracking.uri, or (null: training
    kept a sqlite file in its run_dir) that file when it is here. None when unknown."""
    step_url = provenance.get("source")
    if not isinstance(step_url, str):
        return None
    if not (step_url.startswith(source.rstrip("/") + "/") or "://" not in step_url):
        return None  # a remote store other than SOURCE: not worth a slow, failing read
    try:
        fs, path = url_to_fs(step_url, options, "checkpoint")
        config = json.loads(fs.cat_file(f"{path.rstrip('/')}/{MANIFEST_NAME}"))["config"]
    except Exception:
        return None
    uri = (config.get("tracking") or {}).get("uri")
    if uri:
        return uri
    db = os.path.join(config.get("run_dir") or "", "mlflow.db")
    return f"sqlite:///{os.path.abspath(db)}" if config.get("run_dir") and os.path.isfile(db) else None


def default_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def publish(publication: Publication, output: str, directory: str) -> None:
    """Log the committed `output`, whose files are in the local `directory`, to the run, and
    register it when asked. A failure is one UserError that says the export itself was written."""
    from pretrain.tracking.mlflow import one_line

    p = publication
    where = f"MLflow run {p.run_id} ({p.uri})"
    try:
        p.client.log_artifacts(p.run_id, directory, p.artifact_path)
    except Exception as exc:
        raise UserError(
            f"wrote {output}, but logging it to {where} failed ({one_line(exc)}); log it with `mlflow artifacts "
            f"log-artifacts --local-dir {output} --run-id {p.run_id} --artifact-path {p.artifact_path}`"
        ) from None
    print(f"logged {output} to {where} as {p.artifact_path}", file=sys.stderr)
    if p.register is None:
        return
    source = f"runs:/{p.run_id}/{p.artifact_path}"
    try:
        version = register(p.client, p.register, source, p.run_id, p.tags)
    except Exception as exc:
        raise UserError(
            f"wrote {output} and logged it to {where} as {p.artifact_path}, but registering it as model "
            f"{p.register!r} failed ({one_line(exc)})"
        ) from None
    print(f"registered {source} as model {p.register!r} version {version}", file=sys.stderr)


def register(client, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
    """A new version of registered model `name` (created on first use); returns its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source, run_id=run_id, tags=tags).version
