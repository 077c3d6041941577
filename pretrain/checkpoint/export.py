"""A committed checkpoint's model, read in one process without any engine: for the tools
(conversion, evaluation, generation) that need the trained weights, not the training state."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pretrain.checkpoint.store import CheckpointStore, DamagedCheckpoint, Node
from pretrain.config import ModelConfig
from pretrain.ema import EMA_FILE
from pretrain.engines.torch_native import DCP_DIR
from pretrain.errors import UserError
from pretrain.interop.weights import skeleton, tied_names
from pretrain.models import VISION_MODELS

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class CommittedStep:
    """One committed step whose files have been verified against its manifest, in a local directory."""

    url: str  # the step's own URL, <store>/step_XXXXXXXX
    step: int
    manifest: dict[str, Any]
    directory: str

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.manifest["config"]["model"])

    def provenance(self, ema: bool = False) -> dict[str, Any]:
        """What an export says of where its weights come from."""
        return {
            "source": self.url,
            "step": self.step,
            "tokens_seen": self.manifest.get("tokens_seen"),
            "config_hash": self.manifest.get("config_hash"),
            "mlflow_run_id": self.manifest.get("mlflow_run_id"),
            "weights": "ema" if ema else "live",
        } | self._data_image()

    def _data_image(self) -> dict[str, Any]:
        """A vision run's image normalisation and crop, which an export to timm writes for its users."""
        if self.model_config.name not in VISION_MODELS:
            return {}
        return {"data_image": self.manifest["config"]["data"]["image"]}

    def weights(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32, by the model's own names; with `ema`, the weight
        average the run kept beside them (train.ema_decay > 0)."""
        if not ema:
            return model_weights(self.directory, self.manifest["engine"])
        path = os.path.join(self.directory, EMA_FILE)
        if not os.path.isfile(path):
            raise UserError(f"{self.url} holds no {EMA_FILE}: the run kept no weight average (train.ema_decay=0)")
        average = {name: t.float() for name, t in torch.load(path, map_location="cpu", weights_only=True).items()}
        tied = tied_names(skeleton(self.model_config))
        # The average is kept per parameter, a shared tensor once: its other names (lm_head.weight) are restored.
        return average | {alias: average[name] for alias, name in tied.items()}


@contextlib.contextmanager
def open_step(
    url: str, storage_options: dict, step: int | None = None, progress: bool = False
) -> Iterator[CommittedStep]:
    """The newest committed step of the store at `url` (or `step`), verified; a remote store's
    files are downloaded into a temporary directory, removed on exit. Every problem is one UserError."""
    staging = tempfile.mkdtemp(prefix="whitebox-export-")
    try:
        store = CheckpointStore(url, storage_options, staging, Node(index=0, count=1, is_leader=True))
        committed = store.committed_steps()
        if not committed:
            raise UserError(f"{url} holds no committed checkpoint (no step_XXXXXXXX/ with a MANIFEST.json)")
        step = committed[-1] if step is None else step
        if step not in committed:
            raise UserError(f"--step {step} is not a committed checkpoint of {url} (committed: {committed})")
        try:
            manifest = store.manifest(step)
            total = sum(entry["size"] for entry in manifest["files"].values())
            verb = "verifying" if store.is_local else "downloading"
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{verb} step {step}", disable=not progress) as bar:
                directory = store.fetch(step, progress=bar.update)
        except DamagedCheckpoint as exc:
            raise UserError(f"{exc}; pick another --step") from None
        yield CommittedStep(store.step_url(step), step, manifest, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_weights(step_dir: str, engine: str) -> dict[str, torch.Tensor]:
    """The weights in a local, verified step directory written by `engine` (the manifest's):
    DeepSpeed ZeRO's partitions merged by its zero_to_fp32, or FSDP2/DDP's DCP shards joined."""
    if engine == "deepspeed":
        return _deepspeed_weights(step_dir)
    if not os.path.isdir(os.path.join(step_dir, DCP_DIR)):
        raise UserError(f"checkpoint {step_dir} holds no {DCP_DIR}/ directory for engine={engine}")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "state.pt")
        dcp_to_torch_save(os.path.join(step_dir, DCP_DIR), path)
        return {k: v.float() for k, v in torch.load(path, weights_only=False)["model"].items()}


def _deepspeed_weights(step_dir: str) -> dict[str, torch.Tensor]:
    if glob.glob(os.path.join(step_dir, "*optim_states.pt")):  # ZeRO: fp32 weights live in the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(step_dir))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    path = os.path.join(step_dir, DEEPSPEED_MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {step_dir} holds no DeepSpeed model file ({DEEPSPEED_MODEL_FILE})")
    return {k: v.float() for k, v in torch.load(path, weights_only=False)["module"].items()}
