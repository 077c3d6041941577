"""tools/convert.py --mlflow-run and --register: an export logged as an artifact of the training
run and registered as a model version, against a real local tracking store (a sqlite file, and
an `mlflow server`). The training run is a run made here; the source a weights directory of a
tiny model, built without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tool

from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.interop.weights import Weights, save_weights
from pretrain.models import build_model

CONVERT = tool("convert")
TINY = ["+exp=tost_gpt2_smoke", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=16"]


class Store:
    """A sqlite tracking store with one experiment whose artifacts stay beside it."""

    def __init__(self, root: Path, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.root = root
        self.uri = uri or f"sqlite:///{root}/mlflow.db"
        self.client = MlflowClient(tracking_uri=self.uri)
        location = None if uri else f"file://{root}/mlartifacts"
        self.experiment = self.client.create_experiment(f"training-{root.name}", artifact_location=location)

    def new_run(self) -> str:
        return self.client.create_run(self.experiment).info.run_id

    def artifacts(self, run_id: str, path: str | None = None) -> dict[str, bytes]:
        """The run's artifact files (under `path`) -> their bytes, by their path below it."""
        local = Path(self.client.download_artifacts(run_id, path or "", str(self.root / f"dl-{run_id}")))
        return {str(f.relative_to(local)): f.read_bytes() for f in sorted(local.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("mlflow"))


def weights_dir(
    path: Path, run_id: str | None, step: int = 7, source: str = "runs/x/checkpoints/step_00000007"
) -> Path:
    cfg = load_config(TINY).model
    provenance = {
        "source": source,
        "step": step,
        "tokens_seen": 896,
        "config_hash": f"hash-of-step-{step}",
        "mlflow_run_id": run_id,
        "weights": "live",
    }
    path.mkdir()
    save_weights(Weights(cfg, build_model(cfg).state_dict(), provenance), str(path))
    return path


def convert(capsys, *argv) -> tuple[int, str]:
    code = CONVERT.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def files(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_export_is_logged_to_the_run_and_registered_as_versions_1_then_2(store, tmp_path, capsys) -> None:
    run_id = store.new_run()
    source = weights_dir(tmp_path / "w", run_id)
    out = tmp_path / "out"
    code, err = convert(
        capsys,
        "export-safetensors",
        source,
        out,
        "--mlflow-run",
        run_id,
        "--register",
        "tiny",
        "--tracking-uri",
        store.uri,
    )
    assert code == 0, err
    assert store.artifacts(run_id) == {f"exports/export-safetensors-step7/{k}": v for k, v in files(out).items()}
    assert set(files(out)) == {"config.json", "model.safetensors"}

    version = store.client.get_model_version("tiny", "1")
    assert version.run_id == run_id
    assert version.source == f"runs:/{run_id}/exports/export-safetensors-step7"
    assert version.tags == {
        "step": "7",
        "config_hash": "hash-of-step-7",
        "source": "runs/x/checkpoints/step_00000007",
        "weights": "live",
        "tokens_seen": "896",
    }
    downloaded = Path(store.client.download_artifacts(run_id, "exports/export-safetensors-step7", str(tmp_path / "v1")))
    assert files(downloaded) == files(out)  # what version 1 points at is the export

    # Again, the provenance's run ('auto'), in bf16: version 2, beside the first export, not over it.
    code, err = convert(
        capsys,
        "export-safetensors",
        source,
        tmp_path / "out2",
        "--dtype",
        "bf16",
        "--mlflow-run",
        "auto",
        "--register",
        "tiny",
        "--tracking-uri",
        store.uri,
    )
    assert code == 0, err
    versions = store.client.search_model_versions("name='tiny'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    second = store.client.get_model_version("tiny", "2")
    assert second.source == f"runs:/{run_id}/exports/export-safetensors-step7-2"
    assert store.artifacts(run_id, "exports/export-safetensors-step7-2") == files(tmp_path / "out2")
    assert store.artifacts(run_id, "exports/export-safetensors-step7") == files(out)


def test_a_remote_output_is_logged_from_the_files_uploaded(store, tmp_path, capsys) -> None:
    import fsspec

    run_id = store.new_run()
    fs = fsspec.filesystem("memory")
    code, err = convert(
        capsys, "export-safetensors", weights_dir(tmp_path / "w", run_id), f"memory://{tmp_path.name}/out",
        "--max-shard-size", "20KB", "--mlflow-run", run_id, "--tracking-uri", store.uri,
    )  # fmt: skip
    assert code == 0, err
    written = {path.rsplit("/out/", 1)[1]: fs.cat_file(path) for path in fs.find(f"/{tmp_path.name}/out")}
    assert len(written) > 3  # shards and their index beside config.json
    assert store.artifacts(run_id, "exports/export-safetensors-step7") == written
    fs.rm(f"/{tmp_path.name}", recursive=True)


def test_without_mlflow_run_nothing_is_logged(store, tmp_path, capsys) -> None:
    run_id = store.new_run()
    code, err = convert(capsys, "export-safetensors", weights_dir(tmp_path / "w", run_id), tmp_path / "out")
    assert code == 0, err
    assert store.client.list_artifacts(run_id) == []


def test_register_without_mlflow_run_is_refused_and_nothing_written(store, tmp_path, capsys) -> None:
    source = weights_dir(tmp_path / "w", store.new_run())
    code, err = convert(capsys, "export-safetensors", source, tmp_path / "out", "--register", "tiny-refused")
    assert code == 2
    assert "--register needs --mlflow-run" in error_line(err)
    assert not (tmp_path / "out").exists()
    assert store.client.search_registered_models("name='tiny-refused'") == []


@pytest.mark.parametrize("run", ["0123456789abcdef0123456789abcdef", "auto"], ids=["unknown-id", "auto-without-one"])
def test_a_run_that_is_not_there_is_refused_before_anything_is_written(run, store, tmp_path, capsys) -> None:
    source = weights_dir(tmp_path / "w", None)
    out = tmp_path / "out"
    code, err = convert(capsys, "export-safetensors", source, out, "--mlflow-run", run, "--tracking-uri", store.uri)
    assert code == 2
    assert ("not a run of" if run != "auto" else "records no MLflow run") in error_line(err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no staging directory left either


def test_a_missing_sqlite_store_is_refused_and_not_created(tmp_path, capsys) -> None:
    db = tmp_path / "nowhere" / "mlflow.db"
    source = weights_dir(tmp_path / "w", "0123456789abcdef0123456789abcdef")
    code, err = convert(
        capsys,
        "export-safetensors",
        source,
        tmp_path / "out",
        "--mlflow-run",
        "auto",
        "--tracking-uri",
        f"sqlite:///{db}",
    )
    assert code == 2
    assert "no such MLflow database" in error_line(err)
    assert not db.parent.exists() and not (tmp_path / "out").exists()


def test_the_tracking_store_defaults_to_the_source_runs_tracking_uri(store, tmp_path, capsys) -> None:
    run_id = store.new_run()
    step_dir = tmp_path / "checkpoints" / "step_00000003"
    step_dir.mkdir(parents=True)
    (step_dir / "MANIFEST.json").write_text(json.dumps({"config": {"tracking": {"uri": store.uri}}}))
    source = weights_dir(tmp_path / "w", run_id, step=3, source=str(step_dir))
    code, err = convert(capsys, "export-safetensors", source, tmp_path / "out", "--mlflow-run", "auto")
    assert code == 0, err
    assert set(store.artifacts(run_id)) == {f"exports/export-safetensors-step3/{f}" for f in files(tmp_path / "out")}


def test_an_export_that_fails_logs_nothing(store, tmp_path, capsys, monkeypatch) -> None:
    run_id = store.new_run()
    source = weights_dir(tmp_path / "w", run_id)

    def fail(*_args) -> None:
        raise UserError("the disk is full")

    monkeypatch.setattr(CONVERT, "save_weights", fail)
    code, err = convert(
        capsys,
        "export-safetensors",
        source,
        tmp_path / "out",
        "--mlflow-run",
        run_id,
        "--register",
        "tiny-failed",
        "--tracking-uri",
        store.uri,
    )
    assert code == 2 and "the disk is full" in error_line(err)
    assert not (tmp_path / "out").exists()
    assert store.client.list_artifacts(run_id) == []
    assert store.client.search_registered_models("name='tiny-failed'") == []


def test_a_failure_to_log_says_the_export_was_written(store, tmp_path, capsys, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    run_id = store.new_run()
    source = weights_dir(tmp_path / "w", run_id)

    def unreachable(*_args) -> None:
        raise ConnectionError("the artifact store is unreachable\nsecond line")

    monkeypatch.setattr(MlflowClient, "log_artifacts", unreachable)
    out = tmp_path / "out"
    code, err = convert(
        capsys,
        "export-safetensors",
        source,
        out,
        "--mlflow-run",
        run_id,
        "--register",
        "tiny-unlogged",
        "--tracking-uri",
        store.uri,
    )
    assert code == 2
    line = error_line(err)
    assert f"wrote {out}, but logging it to MLflow run {run_id}" in line and "unreachable" in line
    assert set(files(out)) == {"config.json", "model.safetensors"}
    assert store.client.search_registered_models("name='tiny-unlogged'") == []


def test_import_hf_has_no_mlflow_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        CONVERT.main(["import-hf", "in", "out", "--mlflow-run", "abc"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --mlflow-run" in capsys.readouterr().err


@pytest.mark.slow  # starts `mlflow server` (seconds), unless another test of the session has
def test_export_is_logged_and_registered_on_an_mlflow_server(mlflow_server, tmp_path, capsys) -> None:
    store = Store(tmp_path, uri=mlflow_server)
    run_id = store.new_run()
    source = weights_dir(tmp_path / "w", run_id)
    for i, out in enumerate([tmp_path / "out", tmp_path / "out2"], start=1):
        code, err = convert(
            capsys,
            "export-safetensors",
            source,
            out,
            "--mlflow-run",
            run_id,
            "--register",
            "tiny-served",
            "--tracking-uri",
            mlflow_server,
        )
        assert code == 0, err
        version = store.client.get_model_version("tiny-served", str(i))
        assert version.tags["step"] == "7" and version.tags["config_hash"] == "hash-of-step-7"
    assert store.artifacts(run_id, "exports/export-safetensors-step7") == files(tmp_path / "out")
    assert store.artifacts(run_id, "exports/export-safetensors-step7-2") == files(tmp_path / "out2")
