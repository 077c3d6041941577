"""Noticing a lost rank: one killed (-9, out of memory) or on a node that failed.

Its peers would otherwise wait in their next collective: for the process-group timeout, or for
ever, or until a launcher that saw the loss kills them without a word. Every rank beats (adds 1 to
its counter in the rendezvous store) every `train.heartbeat_s` from a thread, and watches the next
rank's counter; a counter that stands still for `train.lost_rank_timeout_s` is a lost rank (one
that has not started yet, its rank still setting up, is not judged). The
watcher names it in the store, so that every rank stops with the same verdict, and ends its
process with LOST_RANK_EXIT_CODE, even where the training thread is stuck in a collective. When a
collective fails first (gloo reports a peer's closed connection at once), the training thread asks
for a verdict at once: a peer whose counter stops within a few beats is the cause.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from pretrain.callbacks import Callback, LoopState
from pretrain.distributed import DistInfo

log = logging.getLogger("pretrain")
LOST_RANK_EXIT_CODE = 4
BEAT_KEY = "whitebox/heartbeat/{rank}"
LOST_KEY = "whitebox/lost"
DONE = -(2**62)  # a counter set to this: the rank left the loop on purpose, it is not lost
BEATS_TO_CONFIRM = 2.5  # a failed collective's verdict: a peer whose counter stood still this many beats


class LostRank(Exception):
    """A peer rank is gone; the message names it and the step."""


class Heartbeat(Callback):
    def __init__(self, dist_info: DistInfo, interval_s: float, timeout_s: float) -> None:
        self.rank, self.world = dist_info.rank, dist_info.world_size
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.step = 0  # the step in progress
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(interval_s, 1.0)),
            wait_for_workers=False,
        )
        self.watched = (self.rank + 1) % self.world
        self.watched_beat_at = time.monotonic()  # when the watched rank's counter last moved
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="heartbeat", daemon=True)

    def on_fit_start(self, loop: LoopState) -> None:
        self.step = loop.step + 1
        self.thread.start()

    def on_step_start(self, loop: LoopState) -> None:
        self.step = loop.step + 1

    def stop(self) -> None:
        """This rank leaves the loop on purpose (done, preempted, or failed for its own reason)."""
        if self.thread.is_alive():
            self.stopped.set()
            self.thread.join()
            try:
                self.store.set(BEAT_KEY.format(rank=self.rank), str(DONE))
            except Exception:  # the store's host left first: nobody is watching any more
                pass

    def _watch(self) -> None:
        watched = self.watched
        last, since = None, time.monotonic()
        while True:
            try:
                self.store.add(BEAT_KEY.format(rank=self.rank), 1)
                if self.store.check([LOST_KEY]):
                    self._exit(self.store.get(LOST_KEY).decode())
                count = self.store.add(BEAT_KEY.format(rank=watched), 0)
            except Exception as exc:
                if self.stopped.is_set():  # this rank is leaving, and rank 0 (the store's host) has left
                    return
                self._exit(self._store_lost(exc))
            if count == DONE:
                return
            if count != last or count == 0:  # moving, or not started (still setting up): not silent
                last, since = count, time.monotonic()
                self.watched_beat_at = since
            elif time.monotonic() - since > self.timeout_s:
                try:
                    self._exit(self._declare(watched, time.monotonic() - since))
                except Exception as exc:
                    self._exit(self._store_lost(exc))
            if self.stopped.wait(self.interval_s):
                return

    def lost_peer(self) -> str | None:
        """After a failed collective: the verdict on a lost peer, if one is lost; None if every peer
        still beats (the failure has another cause). Waits a few beats."""
        peers = [r for r in range(self.world) if r != self.rank]
        started = time.monotonic()
        try:
            if started - self.watched_beat_at > BEATS_TO_CONFIRM * self.interval_s:  # silent for long already
                return self._declare(self.watched, started - self.watched_beat_at)
            silent = {r: n for r, n in self._counts(peers).items() if n not in (0, DONE)}  # beating until now
            while time.monotonic() < started + BEATS_TO_CONFIRM * self.interval_s and silent:
                time.sleep(self.interval_s / 2)
                if self.store.check([LOST_KEY]):
                    return self.store.get(LOST_KEY).decode()
                silent = {r: n for r, n in self._counts(list(silent)).items() if n == silent[r] and n != DONE}
        except Exception as exc:
            return self._store_lost(exc)
        if not silent:
            return None
        try:
            return self._declare(min(silent), time.monotonic() - started)
        except Exception as exc:
            return self._store_lost(exc)

    def _declare(self, peer: int, silent_s: float) -> str:
        """Name `peer` lost in the store, so that every rank stops with this verdict."""
        verdict = self._verdict(peer, silent_s)
        self.store.set(LOST_KEY, verdict)
        return verdict

    def _counts(self, ranks: list[int]) -> dict[int, int]:
        return {r: self.store.add(BEAT_KEY.format(rank=r), 0) for r in ranks}

    def _verdict(self, peer: int, silent_s: float) -> str:
        return (
            f"rank {peer} was lost during step {self.step} (no heartbeat for {silent_s:.1f} s: killed, out of "
            f"memory, or its node failed); every rank stops with exit code {LOST_RANK_EXIT_CODE}, and a restart "
            f"resumes from the newest committed checkpoint"
        )

    def _store_lost(self, exc: Exception) -> str:
        return (
            f"the rendezvous store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} is gone during step "
            f"{self.step} ({type(exc).__name__}): rank 0 ended (see its error) or rank 0's node was lost; "
            f"every rank stops with exit code {LOST_RANK_EXIT_CODE}, and a restart resumes from the newest "
            f"committed checkpoint"
        )

    def _exit(self, verdict: str) -> None:
        """The training thread may be stuck in a collective: end the process from here."""
        print(f"error: {verdict}", file=sys.stderr, flush=True)
        os._exit(LOST_RANK_EXIT_CODE)
