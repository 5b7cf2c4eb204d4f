"""The math, written once: activations, losses, a dense layer and a synthetic-gradient generator.

Everything here is plain numpy on arrays of one dtype (float64 or float32). Gradients are
sums over the batch (the seed's convention: its learning rate multiplies batch sums), so a
learning rate here means "per example summed", not "per batch averaged".

Derivatives of activations are taken from the layer's *output* h, as in the seed
(``sigmoid: h * (1 - h)``): a stage only has to keep what it sent downstream.
"""

from __future__ import annotations

import numpy as np


# --- activations: forward from the pre-activation, derivative from the output -------------

def sigmoid(a):
    with np.errstate(over="ignore"):   # exp(-a) -> inf gives the right limit, 0
        return 1 / (1 + np.exp(-a))


def sigmoid_deriv(h):
    return h * (1 - h)


def tanh(a):
    return np.tanh(a)


def tanh_deriv(h):
    return 1 - h * h


def relu(a):
    return np.maximum(a, 0)


def relu_deriv(h):
    return (h > 0).astype(h.dtype)


def identity(a):
    return a


def identity_deriv(h):
    return np.ones_like(h)


def softmax(a):
    z = a - a.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


ACTIVATIONS = {
    "sigmoid": (sigmoid, sigmoid_deriv),
    "tanh": (tanh, tanh_deriv),
    "relu": (relu, relu_deriv),
    "identity": (identity, identity_deriv),
    # softmax only pairs with the cross-entropy loss, which hands back dL/da directly
    "softmax": (softmax, None),
}


# --- losses: value and delta = dL/da at the output layer, both from (out, y) -----------------

LOSSES = ("squared", "softmax_xent")


def output_delta(loss: str, activation: str, out, y):
    """dL/da for the last layer, computed the way the seed does: (out - y) * f'(out)."""
    if loss == "squared":
        return (out - y) * ACTIVATIONS[activation][1](out)
    if loss == "softmax_xent":
        if activation != "softmax":
            raise ValueError("softmax_xent needs the softmax output activation")
        return out - y
    raise ValueError(f"unknown loss {loss!r}")


def loss_sum(loss: str, out, y) -> float:
    """Loss summed over the batch: 0.5 * sum (out - y)^2, or -sum y log p."""
    if loss == "squared":
        return float(0.5 * np.sum((out - y) ** 2))
    if loss == "softmax_xent":
        tiny = np.finfo(out.dtype).tiny
        return float(-np.sum(y * np.log(np.maximum(out, tiny))))
    raise ValueError(f"unknown loss {loss!r}")


# --- dense layer ------------------------------------------------------------------------------

class Dense:
    """h = f(x @ W (+ b)); the update is applied to batch sums, as in the seed."""

    def __init__(self, weights, bias, activation: str):
        self.W = weights
        self.b = bias
        self.activation = activation
        self.f, self.f_deriv = ACTIVATIONS[activation]

    def forward(self, x):
        a = x.dot(self.W)
        if self.b is not None:
            a = a + self.b
        return self.f(a)

    def delta(self, h, g):
        """dL/da from dL/dh and the output h."""
        return g * self.f_deriv(h)

    def grad_input(self, delta):
        """dL/dx, with the weights the forward pass used (call before `update`)."""
        return delta.dot(self.W.T)

    def gradients(self, x, delta):
        gb = delta.sum(axis=0) if self.b is not None else None
        return x.T.dot(delta), gb

    def apply(self, gW, gb, lr: float):
        self.W -= gW * lr
        if self.b is not None:
            self.b -= gb * lr

    def update(self, x, delta, lr: float):
        gW, gb = self.gradients(x, delta)
        self.apply(gW, gb, lr)

    def params(self) -> list:
        return [self.W] if self.b is None else [self.W, self.b]


# --- synthetic-gradient generator ------------------------------------------------------------

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
