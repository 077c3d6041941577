"""What a checkpoint holds and when it counts as written.

A step directory `<root>/step_XXXXXXXX/` holds the engine's native files (written collectively
by every rank), one `data_rank{r}.json` and `rng_rank{r}.pt` per rank, and `meta.json`, which
rank 0 writes last, after every rank has finished: a directory without `meta.json` is an
interrupted save and is ignored. "Latest" is found by listing committed steps, never from a
pointer file that could name a half-written one.

Storage here is the local (or shared) filesystem; uploading to object storage and manifests
with checksums belong to a store behind this same save/load surface.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.distributed import DistInfo
from pretrain.engines.base import Engine
from pretrain.errors import UserError

META_FILE = "meta.json"
STEP_DIR_RE = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Restored:
    step: int
    data_state: dict[str, Any]
    meta: dict[str, Any]


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: str, dist_info: DistInfo):
        self.root = root
        self.dist = dist_info

    def committed_steps(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        steps = []
        for name in os.listdir(self.root):
            match = STEP_DIR_RE.match(name)
            if match and os.path.isfile(os.path.join(self.root, name, META_FILE)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> str | None:
        steps = self.committed_steps()
        return os.path.join(self.root, step_dir_name(steps[-1])) if steps else None

    def save(self, step: int, engine: Engine, data_state: dict[str, Any], meta: dict[str, Any]) -> str:
        """Collective: every rank calls it with its own data state; returns the step directory."""
        step_dir = os.path.join(self.root, step_dir_name(step))
        os.makedirs(step_dir, exist_ok=True)
        engine.save(step_dir)
        rank = self.dist.rank
        _write_json_atomic(os.path.join(step_dir, f"data_rank{rank}.json"), data_state)
        torch.save(_rng_state(), os.path.join(step_dir, f"rng_rank{rank}.pt"))
        dist.barrier()
        if self.dist.is_main:
            _write_json_atomic(os.path.join(step_dir, META_FILE),
                               {**meta, "step": step, "world_size": self.dist.world_size})
        dist.barrier()
        return step_dir

    def load(self, step_dir: str, engine: Engine) -> Restored:
        meta_path = os.path.join(step_dir, META_FILE)
        if not os.path.isfile(meta_path):
            raise UserError(f"{step_dir} is not a committed checkpoint (no {META_FILE}); "
                            f"pick a step directory that has one, or checkpoint.resume=none")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["world_size"] != self.dist.world_size:
            raise UserError(f"checkpoint {step_dir} was written by {meta['world_size']} ranks but this run "
                            f"has {self.dist.world_size}; resume with the same number of processes")
        engine.load(step_dir)
        rank = self.dist.rank
        with open(os.path.join(step_dir, f"data_rank{rank}.json")) as f:
            data_state = json.load(f)
        _set_rng_state(torch.load(os.path.join(step_dir, f"rng_rank{rank}.pt"), weights_only=False))
        return Restored(meta["step"], data_state, meta)
