"""Send the metrics a run kept while its tracking server was unreachable.

    python tools/mlflow_sync.py runs/tost_gpt2_smoke
    python tools/mlflow_sync.py runs/owt-base --uri http://mlflow.internal:5000

A run appends what it records to <run_dir>/mlflow_journal.jsonl and a background thread sends
it. Rows still there when the run ended (the server was down) are sent in order by this command,
or by the next start of the run. The server is the run's `tracking.uri` (from its config.yaml)
unless --uri names another. Sending a row twice is harmless: MLflow keeps one copy.
"""

from __future__ import annotations

import argparse
import os
import sys

from omegaconf import OmegaConf

from pretrain.errors import UserError
from pretrain.tracking.journal import JOURNAL_FILE, Journal
from pretrain.tracking.mlflow import client_for, one_line, send_pending

REQUEST_TIMEOUT_S = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run's run_dir, which holds mlflow_journal.jsonl")
    parser.add_argument("--uri", help="the tracking server (default: the run's tracking.uri)")
    args = parser.parse_args(argv)
    try:
        print(sync(args.run_dir, args.uri))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def sync(run_dir: str, uri: str | None) -> str:
    journal = Journal(run_dir, max_bytes=0)
    if not os.path.isfile(journal.path):
        raise UserError(f"{journal.path} does not exist: is {run_dir} a run's run_dir?")
    uri = uri or tracking_uri(run_dir)
    waiting = journal.rows()
    try:
        sent, _ = send_pending(client_for(uri, REQUEST_TIMEOUT_S), journal)
    except Exception as exc:
        raise UserError(f"{uri} is unreachable ({one_line(exc)}); the rows stay in {journal.path}") from None
    return f"sent {sent} of {waiting} rows from {JOURNAL_FILE} to {uri}"


def tracking_uri(run_dir: str) -> str:
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise UserError(f"{config} does not exist: give the server with --uri")
    return OmegaConf.load(config).tracking.uri or f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db"


if __name__ == "__main__":
    sys.exit(main())
