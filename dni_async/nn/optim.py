"""Optimizers: one object per parameter group (a layer, a generator), state kept per parameter.

Gradients handed to `step` are sums over the batch (the convention of `layers`) and belong to
the optimizer from then on (SGD scales them in place), so the update makes no temporaries
beyond the small scratch it keeps. Parameters are updated in place.

    SGD   p -= lr * g                          on batch sums, exactly as the seed did
    Adam  m = b1 m + (1 - b1) g / n,  v = b2 v + (1 - b2) (g / n)^2,  t += 1,
          p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
          on per-example means: g / n with n the batch's rows, so its lr is the usual Adam lr

A parameter may take its own learning rate (`rates`, by name): a per-label generator's maps
learn slower than its shared one. State (Adam's moments and step count) is exposed by name for
checkpoints and restored exactly.
"""

from __future__ import annotations

import math

import numpy as np

OPTIMIZERS = ("sgd", "adam")


class SGD:
    """p -= lr * g on batch sums. Bit for bit the update the seed made (`W -= gW * lr`)."""

    def __init__(self, params: dict, lr: float, rates: dict | None = None):
        self.params = dict(params)
        self.lr = lr
        self.rates = _rates(rates, self.params)

    def step(self, grads: dict, n: int, scale: float = 1.0) -> None:
        """One update from batch-sum gradients (names as in `params`; a missing or None
        gradient leaves its parameter alone). `n`, the batch's rows, is not used by SGD;
        `scale` multiplies the learning rate for this step."""
        for name, p in self.params.items():
            g = grads.get(name)
            if g is not None:
                lr = self.rates.get(name, self.lr)
                g *= lr if scale == 1.0 else lr * scale   # then p -= g: as the seed's p -= g * lr
                p -= g

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class Adam:
    """Adam on per-example-mean gradients, bias-corrected, with per-parameter moments.

    The update runs over blocks of BLOCK elements, so the dozen elementwise passes it takes
    stay in cache instead of streaming every array through memory a dozen times."""

    BLOCK = 32768

    def __init__(self, params: dict, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, decay_updates: int = 0, rates: dict | None = None):
        self.params = dict(params)
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.rates = _rates(rates, self.params)
        self.decay_updates = decay_updates
        self.t = 0
        self.m = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: np.zeros_like(p) for k, p in self.params.items()}
        dtypes = {p.dtype for p in self.params.values()}
        self._scratch = {dt: np.empty(self.BLOCK, dt) for dt in dtypes}

    def step(self, grads: dict, n: int, scale: float = 1.0) -> None:
        """One update from batch-sum gradients over `n` rows; `scale` multiplies the
        learning rate for this step."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        c1 = 1.0 - b1 ** self.t
        root_c2 = math.sqrt(1.0 - b2 ** self.t)
        # m_hat / (sqrt(v_hat) + eps) = (m / c1) * root_c2 / (sqrt(v) + eps * root_c2)
        m_in = (1.0 - b1) / n                        # the mean gradient, folded in
        v_in = (1.0 - b2) / (n * n)
        eps = self.eps * root_c2
        decay = None
        if self.decay_updates:       # linear decay to nothing over the planned updates
            decay = max(0.0, 1.0 - (self.t - 1) / self.decay_updates)
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            lr = self.rates.get(name, self.lr) * scale
            if decay is not None:
                lr *= decay
            step_size = lr * root_c2 / c1
            fp, fg = p.reshape(-1), np.ascontiguousarray(g).reshape(-1)
            fm, fv = self.m[name].reshape(-1), self.v[name].reshape(-1)
            scratch = self._scratch[p.dtype]
            for i in range(0, fp.size, self.BLOCK):
                j = min(i + self.BLOCK, fp.size)
                pb, gb, m, v, s = fp[i:j], fg[i:j], fm[i:j], fv[i:j], scratch[:j - i]
                m *= b1
                np.multiply(gb, m_in, out=s)
                m += s
                np.multiply(gb, gb, out=s)
                s *= v_in
                v *= b2
                v += s
                np.sqrt(v, out=s)
                s += eps
                np.divide(m, s, out=s)
                s *= step_size
                pb -= s

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


def _rates(rates, params) -> dict:
    unknown = sorted(set(rates or {}) - set(params))
    if unknown:
        raise ValueError(f"learning rates for unknown parameters {unknown}")
    return dict(rates or {})


def make(kind: str, params: dict, lr: float, *, beta1: float = 0.9, beta2: float = 0.999,
         eps: float = 1e-8, decay_updates: int = 0, rates: dict | None = None):
    """An optimizer by name ("sgd" or "adam") over the named parameters; `rates` gives some
    of them their own learning rate."""
    if kind == "sgd":
        return SGD(params, lr, rates)
    if kind == "adam":
        return Adam(params, lr, beta1, beta2, eps, decay_updates, rates)
    raise ValueError(f"unknown optimizer {kind!r} (choose from {', '.join(OPTIMIZERS)})")
