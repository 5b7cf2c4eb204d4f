"""One stage's learning rules, per mode; the reference trainer and the stage processes both run these.

A stage owns one dense layer (optionally batch-normalised) with its optimizer and, when it is
not the last stage of a decoupled run, one synthetic-gradient generator with its own. Nothing
here knows about sockets: the same calls, in the same order, give the same numbers in one
process or in N.

Training starts with `cache = forward_train(x)`: the layer's output `cache.h` (batch statistics
when normalised) and what the backward pass needs. Every rule below takes that cache.
`forward(x)` is the evaluation pass (running statistics) and returns h alone.

backprop:  forward_train -> (wait for dL/dh) -> true_delta -> send dL/dx upstream -> apply.
dni/cdni:  forward_train -> synthetic_delta from g_hat = M(context) -> send the bootstrapped
           target delta_hat @ W.T upstream -> synthetic_update: update the layer from the
           guess -> later, apply_target(step, target)
           trains M (on its prediction recomputed with its current weights when it has moved).
           With `trust`, the synthetic update's step is scaled by how well M's guesses have
           lately matched their targets.
last stage (any mode): loss_delta (the true gradient) -> send dL/dx upstream -> apply;
           `backward_from_loss` is the two together.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from dni_async import nn
from dni_async.nn import optim


class Cache:
    """What one training forward pass leaves for its backward pass: the input x, the output h,
    the norm's intermediates and, once the backward pass has run, the norm's gradients."""

    __slots__ = ("x", "h", "norm", "norm_grads")

    def __init__(self, x, h, norm=None):
        self.x, self.h, self.norm, self.norm_grads = x, h, norm, None


# why a checkpoint's generator arrays may not fit: it was saved under other settings
OTHER_GENERATOR = " (saved with other generator settings, e.g. generator_per_label?)"


class StageModel:
    def __init__(self, layer: nn.Dense, *, lr: float, loss: str | None = None,
                 generator: nn.Generator | None = None, context: str = "h",
                 max_pending: int = 64, optimizer=None, frozen: bool = False,
                 sg_scale: float = 1.0, recompute: bool = True, trust: float = 0.0):
        self.layer = layer
        self.lr = lr
        self.optimizer = optimizer if optimizer is not None else optim.SGD(
            layer.named_params(), lr)
        self.frozen = frozen              # a layer that never updates (the control)
        self.sg_scale = sg_scale          # synthetic gradients are multiplied by this for W
        self.recompute = recompute        # late target: recompute g_hat with today's generator
        # trust > 0: a synthetic step's learning rate is scaled by how well the generator has
        # lately predicted its targets (a running mean of their cosine, this factor per target)
        self.trust_rate = trust
        self.trust = 0.0 if trust else 1.0
        self.loss = loss                  # set on the last stage only
        self.generator = generator
        self.context = context
        self.max_pending = max_pending
        self.pending: OrderedDict[int, tuple] = OrderedDict()
        # target_lag: how many of this stage's own updates happened between predicting a
        # synthetic gradient and learning its target (0 in the reference; the staleness)
        # targets_missing: pending when a checkpoint was taken (a run resumed from it never
        # gets them; runtime/stage_snapshot.py)
        self.counters = {"targets_applied": 0, "targets_dropped": 0, "targets_unknown": 0,
                         "targets_missing": 0, "target_lag_sum": 0, "target_lag_max": 0}
        self.updates = 0
        self.accum = None                 # gpipe: [batch, summed grads, rows, micro-batches]
        self.evicted: OrderedDict[int, None] = OrderedDict()   # steps dropped from `pending`
        self.generator_sq_error = 0.0     # sum of ||g_hat - target||^2 over the run so far

    @property
    def is_last(self) -> bool:
        return self.loss is not None

    def forward(self, x):
        """Evaluation: h from x, with the norm's running statistics. Changes nothing."""
        return self.layer.forward(x)

    def forward_train(self, x) -> Cache:
        """Training: the cache of this batch (cache.h is the output to send on). With batch
        norm this uses the batch's statistics and moves the running ones."""
        h, norm_cache = self.layer.forward_train(x)
        return Cache(x, h, norm_cache)

    # -- true gradients -------------------------------------------------------------------
    # Each rule is two halves: the delta and dL/dx first, the weight update second. A stage
    # process sends dL/dx upstream between the halves, so the previous stage's backward runs
    # while this one updates; called back to back they are plain backprop.

    def _delta(self, cache: Cache, g):
        """dL/da (before the norm) from dL/dh; keeps the norm's gradients in the cache."""
        delta, cache.norm_grads = self.layer.through_norm(self.layer.delta(cache.h, g),
                                                          cache.norm)
        return delta

    def true_delta(self, cache: Cache, g, *, need_grad_input: bool = True):
        """From dL/dh = g: (delta, dL/dx), dL/dx None when not needed."""
        delta = self._delta(cache, g)
        return delta, self.layer.grad_input(delta) if need_grad_input else None

    def loss_delta(self, cache: Cache, y, *, need_grad_input: bool = True):
        """Last stage: (delta_out, dL/dx) from the loss, the true gradient."""
        delta = nn.output_delta(self.loss, self.layer.activation, cache.h, y)
        if self.layer.norm is not None:
            delta, cache.norm_grads = self.layer.through_norm(delta, cache.norm)
        return delta, self.layer.grad_input(delta) if need_grad_input else None

    def _gradients(self, cache: Cache, delta) -> dict:
        gW, gb = self.layer.gradients(cache.x, delta)
        grads = {"W": gW, "b": gb}
        if cache.norm_grads is not None:
            grads.update(cache.norm_grads)
        return grads

    def apply(self, cache: Cache, delta) -> None:
        """The weight update for one batch's delta (nothing when the layer is frozen)."""
        if not self.frozen:
            self.optimizer.step(self._gradients(cache, delta), cache.x.shape[0])

    def backward(self, cache: Cache, g, *, need_grad_input: bool = True):
        """Backprop step from dL/dh = g; returns dL/dx (None when not needed)."""
        delta, g_prev = self.true_delta(cache, g, need_grad_input=need_grad_input)
        self.apply(cache, delta)
        return g_prev

    def backward_from_loss(self, cache: Cache, y, *, need_grad_input: bool = True):
        """Last stage: the true gradient from the loss. Returns (dL/dx, delta_out)."""
        delta, g_prev = self.loss_delta(cache, y, need_grad_input=need_grad_input)
        self.apply(cache, delta)
        return g_prev, delta

    # -- gpipe: micro-batches, gradients summed, one update per batch ----------------------

    def micro_backward(self, batch: int, cache: Cache, g, of: int, *,
                       need_grad_input: bool = True):
        """Like `backward`, but only sums the gradient; the update comes with the batch's
        last micro-batch. Micro-batches arrive in order, so the sum's order is fixed."""
        delta, g_prev = self.true_delta(cache, g, need_grad_input=need_grad_input)
        self.micro_apply(batch, cache, delta, of)
        return g_prev

    def micro_backward_from_loss(self, batch: int, cache: Cache, y, of: int, *,
                                 need_grad_input=True):
        delta, g_prev = self.loss_delta(cache, y, need_grad_input=need_grad_input)
        self.micro_apply(batch, cache, delta, of)
        return g_prev, delta

    def micro_apply(self, batch: int, cache: Cache, delta, of: int) -> None:
        """Add one micro-batch's gradient to its batch's sum; update with the last one."""
        grads = self._gradients(cache, delta)
        rows = cache.x.shape[0]
        if self.accum is None or self.accum[0] != batch:
            self.accum = [batch, grads, rows, 1]   # a new batch: whatever was summed is gone
        else:
            total = self.accum[1]
            for k, g in grads.items():
                if g is not None:
                    total[k] += g
            self.accum[2] += rows
            self.accum[3] += 1
        if self.accum[3] == of:
            if not self.frozen:
                self.optimizer.step(self.accum[1], self.accum[2])
            self.accum = None

    # -- synthetic gradients --------------------------------------------------------------

    def synthetic_delta(self, cache: Cache, y, *, need_grad_input: bool = True):
        """The generator's guess of dL/dh, without waiting for anyone: (delta, dL/dx, guess).

        dL/dx (delta_hat @ W.T, with the weights of the forward pass and without `sg_scale`)
        is the target for the previous stage's generator; it can leave before the update."""
        c = nn.context(self.context, cache.h, y)
        g_hat, gen_cache = self.generator.predict(c, y)
        delta = self._delta(cache, g_hat)
        g_prev = self.layer.grad_input(delta) if need_grad_input else None
        return delta, g_prev, (gen_cache, g_hat)

    def synthetic_update(self, step: int, cache: Cache, delta, guess) -> None:
        """Update the layer from the guess's delta, and remember the guess for its target."""
        if not self.frozen:
            grads = self._gradients(cache, delta)
            if self.sg_scale != 1.0:
                for g in grads.values():
                    if g is not None:
                        g *= self.sg_scale
            self.optimizer.step(grads, cache.x.shape[0], self.trust)
        self.updates += 1
        gen_cache, g_hat = guess
        self._remember(step, (gen_cache, g_hat, self.updates, self.generator.steps))

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
        """Train the generator on the gradient that arrived for `step`; False if it came too late.

        If the generator has taken steps since it made this prediction, the prediction is
        recomputed from the remembered context with its current weights (`recompute`), so the
        step follows the gradient of today's error rather than of a stale one."""
        entry = self.pending.get(step)
        if entry is None:
            if self.evicted.pop(step, "never") == "never":   # a dropped one is counted already
                self.counters["targets_unknown"] += 1
            return False
        gen_cache, g_hat, at, gen_steps = entry
        if target.shape != g_hat.shape or target.dtype != g_hat.dtype:
            raise ValueError(f"target for step {step} is {target.dtype}{target.shape}, "
                             f"expected {g_hat.dtype}{g_hat.shape}")
        del self.pending[step]
        if self.recompute and self.generator.steps != gen_steps:
            g_hat, gen_cache = self.generator.refresh(gen_cache)
        if self.trust_rate:
            self._earn_trust(g_hat, target)
        self.generator_sq_error += self.generator.update(gen_cache, g_hat, target)
        self.counters["targets_applied"] += 1
        lag = self.updates - at
        self.counters["target_lag_sum"] += lag
        self.counters["target_lag_max"] = max(self.counters["target_lag_max"], lag)
        return True

    def _earn_trust(self, g_hat, target) -> None:
        """Move trust towards this guess's cosine with its target (0 when it points away).

        Adam gives a step of the learning rate's size whatever the gradient's size, so a
        guess that is still mostly noise (a generator that starts at zero, or one whose
        targets have faded as the loss nears zero) moves the layer as far as a good one would.
        Scaling the step by how well the guesses have lately matched their targets keeps a
        synthetic layer still until its generator has earned it. `g_hat` is the guess as the
        generator makes it now (recomputed when it has moved): trust is for the steps to come."""
        norms = float(np.linalg.norm(g_hat)) * float(np.linalg.norm(target))
        cos = float(np.vdot(g_hat, target)) / norms if norms > 0 else 0.0
        cos = cos if cos > 0.0 else 0.0          # pointing away, or not a number: no trust
        self.trust += self.trust_rate * (cos - self.trust)

    # -- state ----------------------------------------------------------------------------

    def arrays(self) -> dict:
        """Every parameter by name (and the norm's running statistics), for saving and
        checkpoints."""
        out = {"W": self.layer.W}
        if self.layer.b is not None:
            out["b"] = self.layer.b
        if self.layer.norm is not None:
            norm = self.layer.norm
            out.update({f"bn_{k}": v for k, v in {**norm.params(), **norm.buffers()}.items()})
        if self.generator is not None:
            for i, p in enumerate(self.generator.params()):
                out[f"gen{i}"] = p
        return out

    def _optimizer_state(self) -> dict:
        out = {f"opt_{k}": v for k, v in self.optimizer.state().items()}
        if self.generator is not None:
            out.update({f"gen_opt_{k}": v
                        for k, v in self.generator.optimizer.state().items()})
        return out

    def load(self, arrays: dict) -> None:
        """Restore what `snapshot()` saved, in place, refusing any shape or dtype change and
        a missing parameter or optimizer state."""
        expected = {**self.arrays(), **self._optimizer_state()}
        foreign = [k for k in arrays if k.startswith("gen") and k != "gen_steps"
                   and k not in expected]
        if foreign:
            raise ValueError(f"checkpoint has {foreign[0]}, which this stage's generator lacks"
                             f"{OTHER_GENERATOR}")
        for name, current in self.arrays().items():
            if name not in arrays:
                hint = OTHER_GENERATOR if name.startswith("gen") else ""
                raise ValueError(f"checkpoint lacks {name}{hint}")
            new = arrays[name]
            if new.shape != current.shape or new.dtype != current.dtype:
                raise ValueError(f"checkpoint {name} is {new.dtype}{new.shape}, "
                                 f"expected {current.dtype}{current.shape}")
            current[...] = new
        for prefix, opt in (("opt_", self.optimizer),
                            ("gen_opt_", getattr(self.generator, "optimizer", None))):
            if opt is None:
                continue
            want = {k: arrays[prefix + k] for k in opt.state() if prefix + k in arrays}
            missing = [prefix + k for k in opt.state() if prefix + k not in arrays]
            if missing:
                hint = OTHER_GENERATOR if prefix == "gen_opt_" else ""
                raise ValueError(f"checkpoint lacks {missing[0]}{hint}")
            opt.load_state(want)
        if self.generator is not None and "gen_steps" in arrays:
            self.generator.steps = int(arrays["gen_steps"])
        if self.trust_rate:
            if "sg_trust" not in arrays:
                raise ValueError("checkpoint lacks sg_trust")
            self.trust = float(arrays["sg_trust"])
        for key in self.counters:
            if f"counter_{key}" in arrays:
                self.counters[key] = int(arrays[f"counter_{key}"])

    def snapshot(self, copy: bool = True) -> dict:
        """Everything a checkpoint keeps: parameters, norm statistics, optimizer state,
        counters. `copy=False`: the arrays themselves, to be written before anything moves."""
        take = np.array if copy else np.asarray
        out = {k: take(v) for k, v in {**self.arrays(), **self._optimizer_state()}.items()}
        if self.generator is not None:
            out["gen_steps"] = np.array(self.generator.steps)
        if self.trust_rate:
            out["sg_trust"] = np.array(self.trust)
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
    """sha256 of the layer's weights (raw bytes, C order), then its bias if it has one, then
    (batch norm) gamma, beta and the running mean and variance."""
    digest = hashlib.sha256(np.ascontiguousarray(layer.W).tobytes())
    if layer.b is not None:
        digest.update(np.ascontiguousarray(layer.b).tobytes())
    if layer.norm is not None:
        for a in (*layer.norm.params().values(), *layer.norm.buffers().values()):
            digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()
