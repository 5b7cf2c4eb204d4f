"""The training modes, each described once, as data.

A mode says how many batches may be in flight, what finishes a batch at the coordinator, how
a batch is split, and what a stage does with each message it receives: a short program of
`Op`s, run by `program.StageProgram` in the stage processes and in the one-process reference
alike. Everything else asks the mode; nothing else branches on a mode's name. Adding a mode is
adding one `Mode` here (and its tests in tests/test_modes.py).

    backprop  lockstep: one batch in flight; a stage holds its batch until dL/dh comes back
    gpipe     lockstep, micro-batched: one batch's pieces in flight, one update per batch
    dni       decoupled: update at once from a generator's guess of dL/dh (context h)
    cdni      decoupled, and the generator also sees the labels (context [h, y])
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Op(str, enum.Enum):
    """One thing a stage does with a message; `program.StageProgram` gives each its meaning."""
    FORWARD = "forward"                  # h = layer(x)
    SEND_FORWARD = "send_forward"        # (h, y) on to the next stage
    HOLD = "hold"                        # keep (x, h) until this step's gradient comes back
    SYNTHETIC_DELTA = "synthetic_delta"  # delta and dL/dx from the generator's guess; that dL/dx
                                         # is the target for the previous stage's generator
    SYNTHETIC_UPDATE = "synthetic_update"  # update from the guess; remember it for its target
                                           # target for the previous stage's generator
    LOSS_DELTA = "loss_delta"            # last stage: delta and dL/dx from the loss
    RELEASE = "release"                  # take back the held (x, h) for this step
    TRUE_DELTA = "true_delta"            # delta and dL/dx from the gradient that came back
    SEND_GRAD = "send_grad"              # dL/dx (or the target) to the previous stage
    UPDATE = "update"                    # apply delta to the weights now
    ACCUMULATE = "accumulate"            # add to the batch's gradient; update with its last piece
    REPORT_LOSS = "report_loss"          # the batch's metric sums to the coordinator
    REPORT_DONE = "report_done"          # the backward pass has reached stage 0
    TRAIN_GENERATOR = "train_generator"  # one generator step towards the target that came back


@dataclass(frozen=True)
class Mode:
    name: str
    decoupled: bool          # stages update from a generator's guess, never waiting for dL/dh
    context: str = ""        # the generator's context when the config says "auto"
    micro_batched: bool = False
    bound: str = "pipeline"  # which of the bench's bounds applies: "pipeline" or "lockstep"
    about: str = ""

    # -- the coordinator's side ----------------------------------------------------------------

    def pieces(self, cfg) -> int:
        """Steps one batch is split into (its micro-batches)."""
        return cfg.micro_batches if self.micro_batched else 1

    def batches_in_flight(self, cfg) -> int:
        """Batches the coordinator may have sent and not yet finished."""
        return cfg.max_in_flight if self.decoupled else 1

    def finishes(self) -> frozenset:
        """The results that finish one step: its loss, and in lockstep also stage 0's `done`."""
        return frozenset({"loss"} if self.decoupled else {"loss", "done"})

    # -- a stage's side ------------------------------------------------------------------------
    # `coupled` is the set of boundaries k (between stage k and k+1) that carry the true
    # gradient in a decoupled mode (`true_boundaries`): there stage k waits for stage k+1 as
    # in lockstep. In lockstep modes every boundary is coupled.

    def synthetic(self, rank: int, n: int, coupled=()) -> bool:
        """Does stage `rank` update from its generator's guess rather than the true dL/dh?"""
        return self.decoupled and rank < n - 1 and rank not in coupled

    def has_generator(self, rank: int, n: int, coupled=()) -> bool:
        return self.synthetic(rank, n, coupled)

    def learns_from_guess(self, rank: int, n: int, coupled=()) -> bool:
        """Is stage `rank`'s gradient built on a generator's guess: its own, or one a coupled
        stage above it passed down? (Such layers take `synthetic_lr`.)"""
        return any(self.synthetic(j, n, coupled) for j in range(rank, n - 1))

    def holds(self, cfg, rank: int = 0) -> int:
        """Steps a stage keeps while it waits for their gradients (0: it never waits)."""
        if self.synthetic(rank, cfg.n_stages, cfg.true_boundaries):
            return 0
        return self.pieces(cfg)

    def waits_before_next(self, rank: int, n: int, coupled=()) -> bool:
        """A coupled stage of a decoupled mode takes no batch while it holds one: nothing
        else bounds it, since the coordinator keeps several batches in flight."""
        return self.decoupled and rank < n - 1 and not self.synthetic(rank, n, coupled)

    def on_forward(self, rank: int, n: int, coupled=()) -> tuple:
        """What stage `rank` of `n` does with a training batch."""
        up = (Op.SEND_GRAD,) if rank > 0 else ()
        if rank == n - 1:       # the loss is here: the true gradient, whatever the mode
            return (Op.FORWARD, Op.LOSS_DELTA, *up, self._update(), Op.REPORT_LOSS)
        if self.synthetic(rank, n, coupled):   # the next stage first, so it can start at once;
            # then dL/dx before the update, so a coupled stage upstream runs beside it
            return (Op.FORWARD, Op.SEND_FORWARD, Op.SYNTHETIC_DELTA, *up, Op.SYNTHETIC_UPDATE)
        return (Op.FORWARD, Op.SEND_FORWARD, Op.HOLD)

    def on_gradient(self, rank: int, n: int, coupled=()) -> tuple:
        """What stage `rank` of `n` does when a gradient for one of its steps comes back."""
        if rank == n - 1:
            return ()           # nothing is downstream of the last stage
        if self.synthetic(rank, n, coupled):
            return (Op.TRAIN_GENERATOR,)
        if rank == 0:           # the coordinator waits for `done` only in lockstep
            return (Op.RELEASE, Op.TRUE_DELTA, self._update(),
                    *(() if self.decoupled else (Op.REPORT_DONE,)))
        # dL/dx upstream before the update: the previous stage's backward runs beside it
        return (Op.RELEASE, Op.TRUE_DELTA, Op.SEND_GRAD, self._update())

    def _update(self) -> Op:
        return Op.ACCUMULATE if self.micro_batched else Op.UPDATE


BACKPROP = Mode("backprop", decoupled=False, bound="lockstep",
                about="lockstep backprop: one batch in flight, true gradients")
GPIPE = Mode("gpipe", decoupled=False, micro_batched=True,
             about="lockstep, micro-batched: one batch's micro-batches in flight")
DNI = Mode("dni", decoupled=True, context="h",
           about="decoupled: synthetic gradients from the layer's output")
CDNI = Mode("cdni", decoupled=True, context="hy",
            about="decoupled: synthetic gradients from the output and the labels")

MODES: dict[str, Mode] = {m.name: m for m in (BACKPROP, GPIPE, DNI, CDNI)}
BASELINE = BACKPROP.name     # what every speed-up is measured against


def mode_of(cfg) -> Mode:
    return MODES[cfg.mode]
