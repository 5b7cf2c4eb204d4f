"""Runs a mode's programs (`modes.Op` lists) on one stage's `StageModel`.

The same object runs a stage inside a stage process and inside the one-process reference; the
two differ only in `send`, the function that hands a message on (a socket there, a queue here),
and in `span`, which times each op. So the order of every operation on a stage's arrays is the
same in both, and lockstep runs agree bit for bit.

`send(kind, step, arrays, meta)` gets kind "fwd" (h, y), "grad" (dL/dx or a generator target),
"loss" (meta["sums"]) or "done".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from dni_async.nn import metrics
from dni_async.nn.modes import Mode, Op

# the clock category each op's time is counted under (sends are timed by whoever sends)
SPAN = {Op.FORWARD: "forward", Op.SYNTHETIC_DELTA: "backward", Op.SYNTHETIC_UPDATE: "update",
        Op.LOSS_DELTA: "backward", Op.TRUE_DELTA: "backward", Op.UPDATE: "update",
        Op.ACCUMULATE: "update",
        Op.TRAIN_GENERATOR: "generator"}


def _no_span(category, step):
    return contextlib.nullcontext()


@dataclass
class Work:
    """What one message's program reads and writes as it runs."""
    step: int
    x: object = None       # the stage's input rows
    cache: object = None   # what the training forward pass leaves for the backward (x, h, norm)
    y: object = None       # the labels
    g: object = None       # what came back from downstream: dL/dh, or the generator's target
    meta: dict = field(default_factory=dict)
    h: object = None
    delta: object = None
    upstream: object = None   # dL/dx, or the target for the previous stage's generator
    guess: object = None      # the generator's guess, until the update remembers it


class StageProgram:
    def __init__(self, model, mode: Mode, cfg, rank: int, send, span=_no_span):
        self.model, self.mode, self.cfg = model, mode, cfg
        self.rank, self.n = rank, cfg.n_stages
        self.send, self.span = send, span
        coupled = cfg.true_boundaries
        self.forward_ops = mode.on_forward(rank, self.n, coupled)
        self.gradient_ops = mode.on_gradient(rank, self.n, coupled)
        self.limit = mode.holds(cfg, rank)
        self.waits = mode.waits_before_next(rank, self.n, coupled)
        self.pieces = mode.pieces(cfg)
        self.held: dict[int, tuple] = {}      # step -> (cache, meta) while its gradient is out
        self.last = None                      # the last message's Work (fidelity reads it)
        self.handlers = {op: getattr(self, "_" + op.value) for op in Op}

    # -- admission: what a well-formed message must also be to be run ----------------------

    def admits_batch(self, step: int, rows: int) -> bool:
        """A training batch has the configured size, and a stage that waits for gradients
        holds no more steps than its mode allows."""
        if rows != self.cfg.batch_size // self.pieces:
            return False
        if Op.HOLD not in self.forward_ops:
            return True
        return step not in self.held and len(self.held) < self.limit

    def ready_for_batch(self) -> bool:
        """False while a stage that waits for its gradients before the next batch holds one:
        its process then leaves further batches queued instead of reading them."""
        return not (self.waits and len(self.held) >= self.limit)

    def admits_gradient(self, step: int, rows: int) -> bool:
        if Op.RELEASE in self.gradient_ops:
            entry = self.held.get(step)
            return entry is not None and entry[0].h.shape[0] == rows
        return bool(self.gradient_ops) and rows == self.cfg.batch_size // self.pieces

    # -- running ---------------------------------------------------------------------------

    def on_forward(self, step: int, x, y, meta=None) -> None:
        self._run(self.forward_ops, Work(step, x=x, y=y, meta=meta or {}))

    def on_gradient(self, step: int, g, meta=None) -> None:
        """Raises ValueError if the gradient does not fit the step it names."""
        self._run(self.gradient_ops, Work(step, g=g, meta=meta or {}))

    def _run(self, ops, w: Work) -> None:
        self.last = w
        for op in ops:
            category = SPAN.get(op)
            if category is None:
                self.handlers[op](w)
            else:
                with self.span(category, w.step):
                    self.handlers[op](w)

    @property
    def _needs_upstream(self) -> bool:
        return self.rank > 0

    def _forward(self, w):
        w.cache = self.model.forward_train(w.x)
        w.h = w.cache.h

    def _send_forward(self, w):
        self.send("fwd", w.step, [w.h, w.y], w.meta)

    def _hold(self, w):
        self.held[w.step] = (w.cache, w.meta)

    def _synthetic_delta(self, w):
        w.delta, w.upstream, w.guess = self.model.synthetic_delta(
            w.cache, w.y, need_grad_input=self._needs_upstream)

    def _synthetic_update(self, w):
        self.model.synthetic_update(w.step, w.cache, w.delta, w.guess)

    def _loss_delta(self, w):
        w.delta, w.upstream = self.model.loss_delta(w.cache, w.y,
                                                    need_grad_input=self._needs_upstream)

    def _release(self, w):
        cache, meta = self.held[w.step]
        if cache.h.shape != w.g.shape:
            raise ValueError(f"gradient for step {w.step} is {w.g.shape}, expected {cache.h.shape}")
        del self.held[w.step]
        w.cache, w.x, w.h, w.meta = cache, cache.x, cache.h, meta

    def _true_delta(self, w):
        w.delta, w.upstream = self.model.true_delta(w.cache, w.g,
                                                    need_grad_input=self._needs_upstream)

    def _send_grad(self, w):
        self.send("grad", w.step, [w.upstream], w.meta)

    def _update(self, w):
        self.model.apply(w.cache, w.delta)

    def _accumulate(self, w):
        self.model.micro_apply(w.step // self.pieces, w.cache, w.delta, self.pieces)

    def _report_loss(self, w):
        sums = metrics.batch_sums(self.cfg.task, self.cfg.loss, w.h, w.y, w.delta)
        self.send("loss", w.step, [], {**w.meta, "sums": sums})

    def _report_done(self, w):
        self.send("done", w.step, [], w.meta)

    def _train_generator(self, w):
        self.model.apply_target(w.step, w.g)
