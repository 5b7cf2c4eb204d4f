"""The synthetic-gradient generator: a small model that guesses dL/dh from a context.

Like the layers, it works on batch sums (see `layers`), so its learning rate is per example.
"""

from __future__ import annotations

import numpy as np

CONTEXTS = ("h", "y", "hy")


def context(kind: str, h, y):
    """What the generator sees: the layer's output, the labels, or both side by side."""
    if kind == "h":
        return h
    if kind == "y":
        return y.astype(h.dtype, copy=False)
    if kind == "hy":
        return np.concatenate([h, y.astype(h.dtype, copy=False)], axis=1)
    raise ValueError(f"unknown generator context {kind!r}")


class Generator:
    """Predicts dL/dh from a context; linear or with one relu hidden layer.

    The output layer starts at zero (as in the DNI paper), so the first synthetic gradients
    are zero and early layer updates are harmless. Trained on 0.5 * ||g_hat - target||^2.
    """

    def __init__(self, ctx_dim: int, out_dim: int, lr: float, dtype, hidden: int = 0,
                 rng: np.random.RandomState | None = None, normalize: bool = False):
        self.lr = lr
        self.hidden = hidden
        self.normalize = normalize
        if hidden:
            rng = rng if rng is not None else np.random.RandomState(0)
            self.W1 = (rng.randn(ctx_dim, hidden) * np.sqrt(2.0 / ctx_dim)).astype(dtype)
            self.b1 = np.zeros(hidden, dtype)
            self.W2 = np.zeros((hidden, out_dim), dtype)
        else:
            self.W2 = np.zeros((ctx_dim, out_dim), dtype)
        self.b2 = np.zeros(out_dim, dtype)

    def _input(self, c):
        if not self.normalize:
            return c
        mu = c.mean(axis=0, keepdims=True)
        sd = c.std(axis=0, keepdims=True)
        return (c - mu) / (sd + 1e-5)

    def predict(self, c):
        """Returns (g_hat, cache); the cache is what `update` needs later."""
        c = self._input(c)
        if self.hidden:
            z = np.maximum(c.dot(self.W1) + self.b1, 0)
            return z.dot(self.W2) + self.b2, (c, z)
        return c.dot(self.W2) + self.b2, (c, None)

    def update(self, cache, g_hat, target) -> float:
        """One step towards target; returns the squared error before the step."""
        c, z = cache
        d = g_hat - target
        if self.hidden:
            dz = d.dot(self.W2.T) * (z > 0)
            self.W2 -= z.T.dot(d) * self.lr
            self.W1 -= c.T.dot(dz) * self.lr
            self.b1 -= dz.sum(axis=0) * self.lr
        else:
            self.W2 -= c.T.dot(d) * self.lr
        self.b2 -= d.sum(axis=0) * self.lr
        return float(np.sum(d * d))

    def params(self) -> list:
        if self.hidden:
            return [self.W1, self.b1, self.W2, self.b2]
        return [self.W2, self.b2]
