"""Fault injection for the crash tests: die like a lost node at a named point.

With WHITEBOX_CRASH_AT="<point>:<step>" in the environment, the process that reaches `point`
while handling `step` kills its whole process group (launcher, every rank, loader workers) with
SIGKILL, as a node failure would: no handler runs, no file is closed. Unset, as in every real
run, each point costs one environment lookup.

Points: "step" (after the optimizer update of `step`), and within the save of `step`:
"save.staged" (every rank's files staged, nothing uploaded), "upload.first_file" (one file
uploaded), "upload.recorded" (a node's upload record written), "commit.before_manifest" (all
uploads recorded, manifest not yet written), "commit.after_manifest" (committed).
"""

from __future__ import annotations

import os
import signal

ENV = "WHITEBOX_CRASH_AT"
POINTS = ("step", "save.staged", "upload.first_file", "upload.recorded", "commit.before_manifest",
          "commit.after_manifest")


def crash_point(point: str, step: int) -> None:
    if os.environ.get(ENV) == f"{point}:{step}":
        os.killpg(os.getpgrp(), signal.SIGKILL)
