"""Flow control by credits: the steps the coordinator has sent and not yet seen finished.

How many may be open and what finishes one is the mode's to say (`Mode.batches_in_flight`,
`Mode.finishes`, `Mode.pieces`); this table keeps count, and keeps time: a step that stays
open far longer than steps have been taking was lost on the way, and `overdue` names it.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

import numpy as np

LATENCY_FACTOR = 20     # a step is overdue after this many times the recent median latency


class OpenSteps:
    def __init__(self, mode, cfg):
        self.floor_s = 2 * cfg.peer_timeout_s          # never less than this
        self.first_s = max(self.floor_s, cfg.startup_timeout_s)   # before any step finished
        self.opened_at: dict[int, float] = {}
        self.latencies = deque(maxlen=64)              # seconds from sent to finished
        self.pieces = mode.pieces(cfg)
        self.waits = mode.finishes()
        self.limit = mode.batches_in_flight(cfg) * self.pieces   # open steps at most
        self.open: dict[int, set] = {}      # step -> the results it still waits for
        self.completed_batches = 0

    def __len__(self) -> int:
        return len(self.open)

    def room_for_batch(self) -> bool:
        return len(self.open) + self.pieces <= self.limit

    def split(self, batch: int, x, y) -> list:
        """A batch as the (step, x, y, meta) messages it is sent as, each marked open."""
        m = self.pieces
        if m == 1:
            parts = [(batch, x, y, None)]
        else:
            parts = [(batch * m + j, xm, ym, {"batch": batch, "mb": j, "of": m})
                     for j, (xm, ym) in enumerate(zip(np.array_split(x, m), np.array_split(y, m)))]
        now = time.monotonic()
        for step, *_ in parts:
            self.open[step] = set(self.waits)
            self.opened_at[step] = now
        return parts

    def expects(self, kind: str, step: int) -> bool:
        waits = self.open.get(step)
        return waits is not None and kind in waits

    def finish(self, kind: str, step: int) -> None:
        """One awaited result is in (check `expects` first)."""
        waits = self.open[step]
        waits.discard(kind)
        if not waits:
            del self.open[step]
            self.latencies.append(time.monotonic() - self.opened_at.pop(step))
            if step % self.pieces == self.pieces - 1:   # a batch is done with its last piece
                self.completed_batches += 1

    def deadline_s(self, scale: float = 1.0) -> float:
        """How long a step (or `scale` steps' worth of work) may take before it counts as lost."""
        if not self.latencies:
            return self.first_s
        return max(self.floor_s, LATENCY_FACTOR * scale * statistics.median(self.latencies))

    def overdue(self):
        """(step, seconds open, deadline) of the oldest step open past its deadline, or None."""
        if not self.open:
            return None
        step = min(self.opened_at, key=self.opened_at.get)
        age = time.monotonic() - self.opened_at[step]
        if age <= self.floor_s:      # no deadline is shorter: skip the median on the hot path
            return None
        limit = self.deadline_s()
        return (step, age, limit) if age > limit else None
