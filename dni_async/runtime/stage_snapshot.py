"""A stage's part of a checkpoint: what it writes, once what is still coming to it has come.

The coordinator asks for a checkpoint once every batch it sent is finished. In dni and cdni a
batch is finished when its loss is in, while the generator targets it caused (and, at a coupled
boundary, its gradient) may still be on the way: each was sent, or is about to be, by a
neighbour that will not stop before it has. So a stage first takes in what is still coming,
for at most SETTLE_S; whatever has not come by then is counted in the snapshot as
`targets_missing` (a resumed run never gets it), the live run keeps waiting for it as usual.
In lockstep modes nothing is still coming and the snapshot is taken at once.
"""

from __future__ import annotations

import time

import numpy as np

SETTLE_S = 1.0


def settle(held, pending, grad_in, take, limit_s: float = SETTLE_S) -> None:
    """Take gradients from `grad_in` (`take(sock)` handles one) while a step is held or a
    target pending, until none is or `limit_s` has passed."""
    if grad_in is None:
        return
    deadline = time.monotonic() + limit_s
    while (held or pending) and time.monotonic() < deadline:
        if grad_in.poll(min(50, max(1, int((deadline - time.monotonic()) * 1000)))):
            take(grad_in)


def arrays(model) -> dict:
    """The model's snapshot (its own arrays, not copies: the stage writes them before it
    trains on), with the targets it still waits for counted as missing."""
    out = dict(model.snapshot(copy=False))
    out["counter_targets_missing"] = np.array(model.counters["targets_missing"]
                                              + len(model.pending))
    return out
