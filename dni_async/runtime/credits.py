"""Flow control by credits: the steps the coordinator has sent and not yet seen finished.

How many may be open and what finishes one is the mode's to say (`Mode.batches_in_flight`,
`Mode.finishes`, `Mode.pieces`); this table only keeps count.
"""

from __future__ import annotations

import numpy as np


class OpenSteps:
    def __init__(self, mode, cfg):
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
        for step, *_ in parts:
            self.open[step] = set(self.waits)
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
            if step % self.pieces == self.pieces - 1:   # a batch is done with its last piece
                self.completed_batches += 1
