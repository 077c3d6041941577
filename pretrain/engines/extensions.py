"""DeepSpeed's compiled ops (its CPU all-reduce, CPU Adam), built on first use into torch's
extension cache, once per environment.

torch guards a build with a `lock` file in the op's build directory and waits, silently and for
ever, while one exists. A build killed midway (kill -9, a preemption during the first start)
leaves it behind, and every later start hangs. So ops are built here, before DeepSpeed asks for
them, under an flock of ours on a file beside the cache: the kernel releases an flock when its
holder dies, so holding it, a `lock` file is what a dead build left, and it is removed with a
warning. (Another program building the same op at that moment, outside this project, would lose
its lock: that is the one case this does not cover.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator

log = logging.getLogger("pretrain")
BUILD_LOCK = "whitebox-build.lock"  # our flock, in the extensions root beside the ops' directories
TORCH_LOCK = "lock"  # torch's FileBaton, in an op's build directory


@contextlib.contextmanager
def exclusive_build(build_dir: str) -> Iterator[None]:
    """Hold this environment's build flock (waiting for a live build to finish), and remove a
    lock that a dead build left in `build_dir`."""
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(os.path.dirname(build_dir), BUILD_LOCK), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, TORCH_LOCK)
        if os.path.exists(stale):
            log.warning("removing %s, left by a build of this op that was killed (no build is running)", stale)
            os.remove(stale)
        yield


def build_deepspeed_ops(names: list[str]) -> None:
    """Build (or load, when built already) DeepSpeed's ops by builder name, e.g.
    "ShareMemCommBuilder"; DeepSpeed's own later requests then find them loaded. Names this
    machine's accelerator has no builder for, or cannot build, are DeepSpeed's to refuse."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # where torch's load() builds

    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        build_dir = _get_build_directory(builder.NAME, verbose=False)
        with exclusive_build(build_dir):
            if not os.path.exists(os.path.join(build_dir, f"{builder.NAME}.so")):
                log.warning(
                    "building DeepSpeed's %s op into %s: once per environment, about half a minute on 2 CPU cores",
                    builder.NAME,
                    build_dir,
                )
            builder.load(verbose=False)
