"""Before a stage joins a run: does its longest piece of work fit between two heartbeats?

A stage sends its heartbeats from its own loop, between pieces of work, and the coordinator
takes a stage silent for `peer_timeout_s` for dead. The pieces are one batch's work (its
forward message and its gradient) and one row block of an evaluation (`nn.row_blocks`). If one
of them takes a sizable share of that allowance, a busy machine stretches it past the limit in
the middle of a run, and a healthy stage is reported silent. So each stage times one batch of
its own mode's program (on a copy of its model: nothing it has changes) and one evaluation
block, in its own process with its one BLAS thread, before it says hello, and refuses to start
with one line naming the setting to change when either takes more than 1/SHARE of
`peer_timeout_s - heartbeat_s`.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np

from dni_async.config import ConfigError
from dni_async.nn import row_blocks
from dni_async.nn.modes import mode_of
from dni_async.nn.program import StageProgram

SHARE = 2        # a piece of work may take at most 1/SHARE of the silence allowed
REPEATS = 2      # timed runs; the slowest counts (the first touches fresh memory, as a
                 # stage's first batch does)


def check(model, cfg, rank: int, eval_rows: int, extra_s: float = 0.0) -> dict:
    """The seconds one batch and one evaluation block take on this stage; ConfigError with one
    line when either does not fit. `extra_s`: work added to every batch (`slow_stage`)."""
    batch_s = time_batch(model, cfg, rank, enough_s=limit_s(cfg)) + extra_s
    rows = min(eval_rows, row_blocks.rows_per_block(*model.layer.W.shape))
    block_s = time_eval_block(model, rows, enough_s=limit_s(cfg))
    line = verdict(cfg, rank, batch_s, block_s, rows)
    if line:
        raise ConfigError(line)
    return {"batch_s": batch_s, "eval_block_s": block_s}


def limit_s(cfg) -> float:
    return (cfg.peer_timeout_s - cfg.heartbeat_s) / SHARE


def verdict(cfg, rank: int, batch_s: float, block_s: float, block_rows: int) -> str | None:
    """None when both pieces fit, else the line that says what to set."""
    if max(batch_s, block_s) <= limit_s(cfg):
        return None
    worst = max(batch_s, block_s)
    need = math.ceil((cfg.heartbeat_s + SHARE * worst) * 10) / 10
    what = (f"one batch of {cfg.batch_size} takes {batch_s:.2f} s" if batch_s >= block_s
            else f"one evaluation block of {block_rows} rows takes {block_s:.2f} s")
    lower = ", or lower batch_size" if batch_s >= block_s else ""
    return (f"stage {rank}: {what} here, too long for peer_timeout_s = {cfg.peer_timeout_s:g} s "
            f"(heartbeats wait for it): set peer_timeout_s to at least {need:g}{lower}")


def time_batch(model, cfg, rank: int, enough_s: float = math.inf) -> float:
    """Seconds of one batch of this stage's program (forward message, then its gradient); a
    run that takes more than `enough_s` is not repeated."""
    mode = mode_of(cfg)
    program = StageProgram(copy.deepcopy(model), mode, cfg, rank, send=lambda *a: None)
    w_in, w_out = model.layer.W.shape
    rng = np.random.default_rng(0)
    dtype = model.layer.W.dtype
    rows = cfg.batch_size
    x = rng.standard_normal((rows, w_in)).astype(dtype)
    y = np.zeros((rows, cfg.output_dim), dtype)
    y[:, 0] = 1
    g = (rng.standard_normal((rows, w_out)) * 1e-3).astype(dtype)
    m = mode.pieces(cfg)
    pieces = list(zip(np.array_split(x, m), np.array_split(y, m), np.array_split(g, m)))
    slowest = 0.0
    for rep in range(REPEATS):
        t0 = time.perf_counter()
        for j, (xm, ym, gm) in enumerate(pieces):
            program.on_forward(rep * m + j, xm, ym)
            if program.gradient_ops:
                program.on_gradient(rep * m + j, gm)
        slowest = max(slowest, time.perf_counter() - t0)
        if slowest > enough_s:
            break
    return slowest


def time_eval_block(model, rows: int, enough_s: float = math.inf) -> float:
    """Seconds of one evaluation block (a forward pass changes nothing: the model itself)."""
    w_in = model.layer.W.shape[0]
    x = np.random.default_rng(1).standard_normal((rows, w_in)).astype(model.layer.W.dtype)
    slowest = 0.0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        model.forward(x)
        slowest = max(slowest, time.perf_counter() - t0)
        if slowest > enough_s:
            break
    return slowest
