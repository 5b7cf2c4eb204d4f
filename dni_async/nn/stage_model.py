"""One stage's learning rules, per mode; the reference trainer and the stage processes both run these.

A stage owns one dense layer and, when it is not the last stage of a decoupled run, one
synthetic-gradient generator. Nothing here knows about sockets: the same calls, in the same
order, give the same numbers in one process or in N.

backprop:  forward -> (wait for dL/dh) -> true_delta -> send dL/dx upstream -> apply (update W).
dni/cdni:  forward -> synthetic_update: update W from g_hat = M(context), send the bootstrapped
           target delta_hat @ W.T upstream -> later, apply_target(step, target) trains M.
last stage (any mode): loss_delta (the true gradient) -> send dL/dx upstream -> apply;
           `backward_from_loss` is the two together.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from dni_async import nn


class StageModel:
    def __init__(self, layer: nn.Dense, *, lr: float, loss: str | None = None,
                 generator: nn.Generator | None = None, context: str = "h",
                 max_pending: int = 64):
        self.layer = layer
        self.lr = lr
        self.loss = loss                  # set on the last stage only
        self.generator = generator
        self.context = context
        self.max_pending = max_pending
        self.pending: OrderedDict[int, tuple] = OrderedDict()
        # target_lag: how many of this stage's own updates happened between predicting a
        # synthetic gradient and learning its target (0 in the reference; the staleness)
        self.counters = {"targets_applied": 0, "targets_dropped": 0, "targets_unknown": 0,
                         "target_lag_sum": 0, "target_lag_max": 0}
        self.updates = 0
        self.accum = None                 # gpipe: [batch, summed dW, summed db, micro-batches]
        self.evicted: OrderedDict[int, None] = OrderedDict()   # steps dropped from `pending`
        self.generator_sq_error = 0.0     # sum of ||g_hat - target||^2 over the run so far

    @property
    def is_last(self) -> bool:
        return self.loss is not None

    def forward(self, x):
        return self.layer.forward(x)

    # -- true gradients -------------------------------------------------------------------
    # Each rule is two halves: the delta and dL/dx first, the weight update second. A stage
    # process sends dL/dx upstream between the halves, so the previous stage's backward runs
    # while this one updates; called back to back they are plain backprop.

    def true_delta(self, h, g, *, need_grad_input: bool = True):
        """From dL/dh = g: (delta, dL/dx), dL/dx None when not needed."""
        delta = self.layer.delta(h, g)
        return delta, self.layer.grad_input(delta) if need_grad_input else None

    def loss_delta(self, h, y, *, need_grad_input: bool = True):
        """Last stage: (delta_out, dL/dx) from the loss, the true gradient."""
        delta = nn.output_delta(self.loss, self.layer.activation, h, y)
        return delta, self.layer.grad_input(delta) if need_grad_input else None

    def apply(self, x, delta) -> None:
        """The weight update for one batch's delta."""
        self.layer.update(x, delta, self.lr)

    def backward(self, x, h, g, *, need_grad_input: bool = True):
        """Backprop step from dL/dh = g; returns dL/dx (None when not needed)."""
        delta, g_prev = self.true_delta(h, g, need_grad_input=need_grad_input)
        self.apply(x, delta)
        return g_prev

    def backward_from_loss(self, x, h, y, *, need_grad_input: bool = True):
        """Last stage: the true gradient from the loss. Returns (dL/dx, delta_out)."""
        delta, g_prev = self.loss_delta(h, y, need_grad_input=need_grad_input)
        self.apply(x, delta)
        return g_prev, delta

    # -- gpipe: micro-batches, gradients summed, one update per batch ----------------------

    def micro_backward(self, batch: int, x, h, g, of: int, *, need_grad_input: bool = True):
        """Like `backward`, but only sums the gradient; the update comes with the batch's
        last micro-batch. Micro-batches arrive in order, so the sum's order is fixed."""
        delta, g_prev = self.true_delta(h, g, need_grad_input=need_grad_input)
        self.micro_apply(batch, x, delta, of)
        return g_prev

    def micro_backward_from_loss(self, batch: int, x, h, y, of: int, *, need_grad_input=True):
        delta, g_prev = self.loss_delta(h, y, need_grad_input=need_grad_input)
        self.micro_apply(batch, x, delta, of)
        return g_prev, delta

    def micro_apply(self, batch: int, x, delta, of: int) -> None:
        """Add one micro-batch's gradient to its batch's sum; update with the last one."""
        gW, gb = self.layer.gradients(x, delta)
        if self.accum is None or self.accum[0] != batch:
            self.accum = [batch, gW, gb, 1]      # a new batch: whatever was summed is gone
        else:
            _, sW, sb, count = self.accum
            self.accum = [batch, sW + gW, None if gb is None else sb + gb, count + 1]
        if self.accum[3] == of:
            self.layer.apply(self.accum[1], self.accum[2], self.lr)
            self.accum = None

    # -- synthetic gradients --------------------------------------------------------------

    def synthetic_update(self, step: int, x, h, y, *, need_grad_input: bool = True):
        """Update W from the generator's guess of dL/dh, without waiting for anyone.

        Returns the target for the previous stage's generator, delta_hat @ W.T, computed
        with the weights of the forward pass (before this update).
        """
        c = nn.context(self.context, h, y)
        g_hat, cache = self.generator.predict(c)
        delta = self.layer.delta(h, g_hat)
        g_prev = self.layer.grad_input(delta) if need_grad_input else None
        self.layer.update(x, delta, self.lr)
        self.updates += 1
        self._remember(step, (cache, g_hat, self.updates))
        return g_prev

    def _remember(self, step: int, entry) -> None:
        self.pending[step] = entry
        while len(self.pending) > self.max_pending:
            old, _ = self.pending.popitem(last=False)
            self.counters["targets_dropped"] += 1
            self.evicted[old] = None
            if len(self.evicted) > self.max_pending:
                self.evicted.popitem(last=False)

    def synthetic_gradient(self, step: int):
        """The generator's guess of dL/dh for a step still waiting for its target, or None."""
        entry = self.pending.get(step)
        return None if entry is None else entry[1]

    def apply_target(self, step: int, target) -> bool:
        """Train the generator on the gradient that arrived for `step`; False if it came too late."""
        entry = self.pending.get(step)
        if entry is None:
            if self.evicted.pop(step, "never") == "never":   # a dropped one is counted already
                self.counters["targets_unknown"] += 1
            return False
        cache, g_hat, at = entry
        if target.shape != g_hat.shape or target.dtype != g_hat.dtype:
            raise ValueError(f"target for step {step} is {target.dtype}{target.shape}, "
                             f"expected {g_hat.dtype}{g_hat.shape}")
        del self.pending[step]
        self.generator_sq_error += self.generator.update(cache, g_hat, target)
        self.counters["targets_applied"] += 1
        lag = self.updates - at
        self.counters["target_lag_sum"] += lag
        self.counters["target_lag_max"] = max(self.counters["target_lag_max"], lag)
        return True

    # -- state ----------------------------------------------------------------------------

    def arrays(self) -> dict:
        """Every parameter by name, for saving and checkpoints."""
        out = {"W": self.layer.W}
        if self.layer.b is not None:
            out["b"] = self.layer.b
        if self.generator is not None:
            for i, p in enumerate(self.generator.params()):
                out[f"gen{i}"] = p
        return out

    def load(self, arrays: dict) -> None:
        """Restore parameters saved by `arrays()`, in place, refusing any shape or dtype change."""
        for name, current in self.arrays().items():
            if name not in arrays:
                raise ValueError(f"checkpoint lacks {name}")
            new = arrays[name]
            if new.shape != current.shape or new.dtype != current.dtype:
                raise ValueError(f"checkpoint {name} is {new.dtype}{new.shape}, "
                                 f"expected {current.dtype}{current.shape}")
            current[...] = new
        for key in self.counters:
            if f"counter_{key}" in arrays:
                self.counters[key] = int(arrays[f"counter_{key}"])

    def snapshot(self) -> dict:
        """Everything a checkpoint keeps: parameters and counters."""
        out = {k: np.array(v) for k, v in self.arrays().items()}
        out.update({f"counter_{k}": np.array(v) for k, v in self.counters.items()})
        return out

    def weights_sha256(self) -> str:
        return weights_sha256(self.layer)


def fidelity(g_hat, g_true) -> tuple:
    """(cosine similarity, relative error ||g_hat - g_true|| / ||g_true||), arrays taken whole."""
    n_hat, n_true = float(np.linalg.norm(g_hat)), float(np.linalg.norm(g_true))
    cos = float(np.sum(g_hat * g_true)) / (n_hat * n_true) if n_hat and n_true else 0.0
    rel = float(np.linalg.norm(g_hat - g_true)) / n_true if n_true else float("nan")
    return cos, rel


def weights_sha256(layer: nn.Dense) -> str:
    """sha256 of the layer's weights (raw bytes, C order), then its bias if it has one."""
    digest = hashlib.sha256(np.ascontiguousarray(layer.W).tobytes())
    if layer.b is not None:
        digest.update(np.ascontiguousarray(layer.b).tobytes())
    return digest.hexdigest()
