"""The checkpoint store: a step exists only once its manifest is written, its files are checked
against the manifest, and retention keeps what the config says; on local disk and on S3."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pretrain.checkpoint.store import MANIFEST_NAME, CheckpointStore, DamagedCheckpoint, Node, step_dir_name
from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.errors import UserError
from pretrain.trainer import Trainer

ONE_NODE = Node(index=0, count=1, is_leader=True)
ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> CheckpointStore:
    if request.param == "file":
        return CheckpointStore(str(tmp_path / "ckpt"), {}, str(tmp_path / "staging"), ONE_NODE)
    s3 = request.getfixturevalue("s3")
    return CheckpointStore(s3.url(f"ckpt/{tmp_path.name}"), s3.storage_options, str(tmp_path / "staging"), ONE_NODE)


def stage(store: CheckpointStore, step: int, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = os.path.join(store.staging_dir(step), relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def save(store: CheckpointStore, step: int, files: dict[str, bytes] | None = None) -> dict:
    stage(store, step, files or {"model.pt": f"weights {step}".encode(), "dcp/__0_0.distcp": os.urandom(1000)})
    store.upload(step, "attempt")
    return store.commit(step, "attempt", {"world_size": 1, "engine": "test"}, wait_s=5)


def test_a_step_exists_once_its_manifest_is_written_and_names_every_file(store):
    stage(store, 4, {"model.pt": b"abc", "sub/x.bin": b"0123456789"})
    store.upload(4, "a1")
    assert store.committed_steps() == []  # uploaded, not committed: a crash here loses nothing committed
    assert not os.path.exists(store.staging_dir(4))
    manifest = store.commit(4, "a1", {"world_size": 1, "engine": "test"}, wait_s=5)
    assert store.committed_steps() == [4]
    assert manifest["step"] == 4 and manifest["engine"] == "test"
    assert manifest["files"] == {
        "model.pt": {"size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        "sub/x.bin": {"size": 10, "sha256": "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882"},
    }
    assert store.manifest(4) == manifest
    directory = store.fetch(4)
    assert open(os.path.join(directory, "sub", "x.bin"), "rb").read() == b"0123456789"
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store._path(4, ""))) == sorted(
        [MANIFEST_NAME, "model.pt", "sub"]
    )


def test_commit_waits_for_every_node_then_gives_up_naming_it(tmp_path):
    nodes = [
        CheckpointStore(str(tmp_path / "ckpt"), {}, str(tmp_path / f"staging{n}"), Node(n, 2, True)) for n in (0, 1)
    ]
    stage(nodes[1], 2, {"stale": b"from a crashed attempt"})
    nodes[1].upload(2, "crashed")
    stage(nodes[0], 2, {"a": b"a"})
    nodes[0].upload(2, "now")
    with pytest.raises(UserError, match=r"no upload record from 1 node\(s\) after 0s .*now/node1.json"):
        nodes[0].commit(2, "now", {"world_size": 2}, wait_s=0)
    stage(nodes[1], 2, {"b": b"b"})
    nodes[1].upload(2, "now")
    assert sorted(nodes[0].commit(2, "now", {"world_size": 2}, wait_s=1)["files"]) == ["a", "b"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "does not match its sha256"),
        (lambda data: data + b"x", "has 1001 bytes, the manifest says 1000"),
        (None, "is missing"),
    ],
)
def test_damaged_files_are_named(store, damage, message):
    save(store, 3)
    path = store._path(3, "dcp/__0_0.distcp")
    if damage is None:
        store.fs.rm(path)
    else:
        store.fs.pipe_file(path, damage(store.fs.cat_file(path)))
    with pytest.raises(DamagedCheckpoint, match=rf"{step_dir_name(3)}/dcp/__0_0.distcp {message}"):
        store.fetch(3)


def test_unreadable_manifest_is_damage_not_a_crash(store):
    save(store, 5)
    store.fs.pipe_file(store._path(5, MANIFEST_NAME), b'{"format": "whitebox-checkpoint", "files": ')
    with pytest.raises(DamagedCheckpoint, match=f"{step_dir_name(5)}/{MANIFEST_NAME} is unreadable"):
        store.fetch(5)


def test_retention_keeps_the_last_n_and_every_mth_and_clears_old_unfinished_saves(store):
    for step in (2, 4, 6, 8, 10):
        save(store, step)
    stage(store, 7, {"model.pt": b"half"})
    store.upload(7, "a")  # uploaded, never committed (a crash before the manifest)
    stage(store, 12, {"model.pt": b"next"})
    store.upload(12, "a")  # newer than every committed step: maybe in flight, so never touched
    assert store.retain(keep_last=2, keep_every=4) == [2, 6, 7]
    assert store.committed_steps() == [4, 8, 10]
    assert store.fs.exists(store._path(12, "model.pt"))
    assert store.retain(keep_last=0, keep_every=0) == [4, 8]  # the newest committed one always stays
    assert store.committed_steps() == [10]


def test_saving_a_step_again_uncommits_it_first(store):
    save(store, 6, {"model.pt": b"first"})
    store.uncommit(6)
    assert store.committed_steps() == []
    assert save(store, 6, {"model.pt": b"second"})["files"]["model.pt"]["size"] == 6


def test_resume_setting_is_checked(tmp_path):
    cfg = load_config(["+exp=tost_gpt2_smoke", f"run_dir={tmp_path}", "checkpoint.resume=latest"])
    with pytest.raises(UserError, match="checkpoint.resume='latest' is neither auto, none nor a step number"):
        Trainer(cfg, ONE_RANK)._restore(None, None)
    manifest_keys = json.loads(json.dumps(load_config(["+exp=tost_gpt2_smoke"]).checkpoint.__dict__))
    assert manifest_keys["keep_last"] == 3 and manifest_keys["url"] is None


def test_config_changes_since_the_checkpoint_warn_or_refuse_naming_the_key(tmp_path, caplog):
    def trainer(*overrides):
        return Trainer(load_config(["+exp=tost_gpt2_smoke", f"run_dir={tmp_path}", *overrides]), ONE_RANK)

    saved = {"config": trainer()._checkpoint_record(None, 0)["config"]}
    with caplog.at_level("WARNING", logger="pretrain"):
        trainer("optim.lr=0.5", "model.dropout=0.1")._check_saved_config(saved)
    assert "config changed since the checkpoint: model.dropout 0.0 -> 0.1, optim.lr 0.002 -> 0.5" in caplog.text
    with pytest.raises(UserError, match=r"model.n_layer=3 but the checkpoint was trained with model.n_layer=4"):
        trainer("model.n_layer=3")._check_saved_config(saved)  # the smoke model has 4
    with pytest.raises(UserError, match=r"engine.name='fsdp' .* engine.name='deepspeed'.*checkpoint.resume=none"):
        trainer("engine=fsdp")._check_saved_config(saved)


# --------------------------------------------------------------------------- saves beside training


class FileWriter:
    """Stands in for an engine, whose only part in a save is writing its files into the step dir."""

    def __init__(self, n_bytes: int) -> None:
        self.n_bytes = n_bytes

    def save(self, step_dir: str) -> None:
        with open(os.path.join(step_dir, "engine.bin"), "wb") as f:
            f.write(bytes(range(256)) * (self.n_bytes // 256))


def uploads_in_the_background_and_survive_a_dead_store(dist_info, staging: str) -> dict:
    from moto.server import ThreadedMotoServer

    from pretrain.checkpoint.manager import CheckpointManager, SavePolicy
    from pretrain.distributed import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "k",
        "secret": "s",
        "skip_instance_cache": True,
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }  # a dead store fails fast
    store = CheckpointStore("s3://ckpt/run", options, staging, ONE_NODE)
    store.fs.mkdir("ckpt")

    def manager(on_upload_error):
        return CheckpointManager(store, dist_info, SavePolicy(3, 0, 5.0, True, on_upload_error))

    out = {}
    keep_going = manager("continue")
    out["blocked_s"] = keep_going.save(1, FileWriter(64 * 2**20), {"position": 1}, {"engine": "test"})
    out["committed_right_after_save"] = store.committed_steps()
    keep_going.wait()
    out["committed_after_wait"] = store.committed_steps()
    out["save_seconds"] = keep_going.committed_save_seconds()

    server.stop()  # the object store goes away before the next upload
    keep_going.save(2, FileWriter(1024), {"position": 2}, {"engine": "test"})
    keep_going.wait()  # on_upload_error=continue: reported, not raised
    out["failure"] = keep_going._failure
    stopping = manager("fail")
    stopping.save(3, FileWriter(1024), {"position": 3}, {"engine": "test"})
    try:
        stopping.wait()
    except UserError as exc:
        out["raised"] = str(exc)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # same process: same buckets
    server.start()
    out["committed_at_the_end"] = store.committed_steps()
    server.stop()
    return out


@pytest.mark.slow
def test_uploads_run_beside_training_and_a_dead_store_never_commits(tmp_path):
    from pretrain.launch import run_local_world

    (out,) = run_local_world(uploads_in_the_background_and_survive_a_dead_store, 1, str(tmp_path / "staging"))
    assert out["committed_right_after_save"] == []  # the 64 MiB upload was still running
    assert out["committed_after_wait"] == [1]
    assert out["save_seconds"][1] > out["blocked_s"]
    assert out["failure"].startswith("checkpoint step 2 was not committed:")
    assert out["raised"].startswith("checkpoint step 3 was not committed:") and "on_upload_error=fail" in out["raised"]
    assert out["committed_at_the_end"] == [1]
