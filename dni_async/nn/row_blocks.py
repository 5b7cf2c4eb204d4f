"""Evaluation of a layer in row blocks, with room for other work between them.

A stage process sends its heartbeats from its own loop, so one long computation silences it:
an evaluation chunk of 4096 rows through a 4096 x 4096 layer is 69 G multiply-adds, seconds on
one core. Split into blocks of rows (at most MAX_BLOCK_MACS multiply-adds and
MAX_BLOCK_OUTPUTS outputs each), the stage can send a heartbeat between blocks. Rows are
independent in an evaluation pass (running statistics, no update), and the block size depends
on the layer's shape alone, so the pipeline and the one-process reference cut the same blocks
and get the same numbers.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

# 2^31 multiply-adds: tens of milliseconds on one core here, and enough rows (128 at
# 4096 x 4096) that each weight read serves many of them
MAX_BLOCK_MACS = 1 << 31
# 2^20 outputs (8 MB in float64): the activation's elementwise passes and their temporaries,
# which for a narrow input and a wide output cost more than the product itself
MAX_BLOCK_OUTPUTS = 1 << 20


def rows_per_block(w_in: int, w_out: int) -> int:
    return max(1, min(MAX_BLOCK_MACS // max(1, w_in * w_out), MAX_BLOCK_OUTPUTS // max(1, w_out)))


def forward(model, x, between=None, span=None):
    """`model.forward(x)`, block by block: `between()` runs after every block but the last,
    and each block is computed inside `span()` when given (a clock's timing span)."""
    rows = rows_per_block(*model.layer.W.shape)
    span = span or nullcontext
    if len(x) <= rows:
        with span():
            return model.forward(x)
    parts = []
    for i in range(0, len(x), rows):
        if parts and between is not None:
            between()
        with span():
            parts.append(model.forward(x[i:i + rows]))
    return np.concatenate(parts)
