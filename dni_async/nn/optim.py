"""Optimizers: one object per parameter group (a layer, a generator), state kept per parameter.

Gradients handed to `step` are sums over the batch (the convention of `layers`) and belong to
the optimizer from then on: it uses them as scratch space, so the update makes no temporaries
beyond the ones it keeps. Parameters are updated in place.

    SGD   p -= lr * g                          on batch sums, exactly as the seed did
    Adam  m = b1 m + (1 - b1) g / n,  v = b2 v + (1 - b2) (g / n)^2,  t += 1,
          p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
          on per-example means: g / n with n the batch's rows, so its lr is the usual Adam lr

State (Adam's moments and step count) is exposed by name for checkpoints and restored exactly.
"""

from __future__ import annotations

import math

import numpy as np

OPTIMIZERS = ("sgd", "adam")


class SGD:
    """p -= lr * g on batch sums. Bit for bit the update the seed made (`W -= gW * lr`)."""

    def __init__(self, params: dict, lr: float):
        self.params = dict(params)
        self.lr = lr

    def step(self, grads: dict, n: int) -> None:
        """One update from batch-sum gradients (names as in `params`; a missing or None
        gradient leaves its parameter alone). `n`, the batch's rows, is not used by SGD."""
        lr = self.lr
        for name, p in self.params.items():
            g = grads.get(name)
            if g is not None:
                g *= lr          # the same product, then the same difference, as p -= g * lr
                p -= g

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class Adam:
    """Adam on per-example-mean gradients, bias-corrected, with per-parameter moments."""

    def __init__(self, params: dict, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        self.params = dict(params)
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.t = 0
        self.m = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: np.zeros_like(p) for k, p in self.params.items()}
        self._scratch = {k: np.empty_like(p) for k, p in self.params.items()}

    def step(self, grads: dict, n: int) -> None:
        """One update from batch-sum gradients over `n` rows (consumed as scratch)."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        c1 = 1.0 - b1 ** self.t
        root_c2 = math.sqrt(1.0 - b2 ** self.t)
        step_size = self.lr / c1
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            m, v, s = self.m[name], self.v[name], self._scratch[name]
            g /= n                                   # the per-example mean
            m *= b1
            np.multiply(g, 1.0 - b1, out=s)
            m += s
            g *= g
            g *= 1.0 - b2
            v *= b2
            v += g
            np.sqrt(v, out=s)                        # sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t)
            s /= root_c2
            s += self.eps
            np.divide(m, s, out=s)
            s *= step_size
            p -= s

    def state(self) -> dict:
        out = {"t": np.array(self.t, np.int64)}
        for k in self.params:
            out[f"{k}.m"] = self.m[k]
            out[f"{k}.v"] = self.v[k]
        return out

    def load_state(self, state: dict) -> None:
        """Restore what `state()` gave, in place; refuses a missing array or a changed shape."""
        for key, current in self.state().items():
            if key not in state:
                raise ValueError(f"optimizer state lacks {key}")
            new = np.asarray(state[key])
            if new.shape != current.shape or (key != "t" and new.dtype != current.dtype):
                raise ValueError(f"optimizer state {key} is {new.dtype}{new.shape}, "
                                 f"expected {current.dtype}{current.shape}")
        self.t = int(state["t"])
        for k in self.params:
            self.m[k][...] = state[f"{k}.m"]
            self.v[k][...] = state[f"{k}.v"]


def make(kind: str, params: dict, lr: float, *, beta1: float = 0.9, beta2: float = 0.999,
         eps: float = 1e-8):
    """An optimizer by name ("sgd" or "adam") over the named parameters."""
    if kind == "sgd":
        return SGD(params, lr)
    if kind == "adam":
        return Adam(params, lr, beta1, beta2, eps)
    raise ValueError(f"unknown optimizer {kind!r} (choose from {', '.join(OPTIMIZERS)})")
