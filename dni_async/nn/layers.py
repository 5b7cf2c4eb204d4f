"""The math, written once: activations, losses and a dense layer.

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
    """h = f(x @ W (+ b)), or with batch norm h = f(BN(x @ W)); gradients on batch sums.

    `forward` is the evaluation pass (running statistics); `forward_train` also returns what
    the backward pass needs from the norm (None without one)."""

    def __init__(self, weights, bias, activation: str, norm=None):
        self.W = weights
        self.b = bias
        self.activation = activation
        self.f, self.f_deriv = ACTIVATIONS[activation]
        self.norm = norm

    def _pre(self, x):
        a = x.dot(self.W)
        if self.b is not None:
            a = a + self.b
        return a

    def forward(self, x):
        a = self._pre(x)
        if self.norm is not None:
            a = self.norm.forward_eval(a)
        return self.f(a)

    def forward_train(self, x):
        """(h, norm cache): batch statistics when normalised (the running ones move)."""
        a = self._pre(x)
        if self.norm is None:
            return self.f(a), None
        z, cache = self.norm.forward_train(a)
        return self.f(z), cache

    def delta(self, h, g):
        """dL/dz (the activation's input) from dL/dh and the output h."""
        return g * self.f_deriv(h)

    def through_norm(self, dz, norm_cache):
        """(dL/da, norm gradients or None): dL/dz carried back through the norm, if any."""
        if self.norm is None:
            return dz, None
        da, dgamma, dbeta = self.norm.backward(dz, norm_cache)
        return da, {"gamma": dgamma, "beta": dbeta}

    def grad_input(self, delta):
        """dL/dx, with the weights the forward pass used (call before `update`)."""
        return delta.dot(self.W.T)

    def gradients(self, x, delta):
        gb = delta.sum(axis=0) if self.b is not None else None
        return x.T.dot(delta), gb

    def apply(self, gW, gb, lr: float):
        """Plain SGD on batch sums (the seed's step); `StageModel` steps through its optimizer."""
        self.W -= gW * lr
        if self.b is not None:
            self.b -= gb * lr

    def update(self, x, delta, lr: float):
        gW, gb = self.gradients(x, delta)
        self.apply(gW, gb, lr)

    def params(self) -> list:
        return [self.W] if self.b is None else [self.W, self.b]

    def named_params(self) -> dict:
        """Every trained array by name: W, b (if any), the norm's gamma and beta (if any)."""
        out = {"W": self.W}
        if self.b is not None:
            out["b"] = self.b
        if self.norm is not None:
            out.update(self.norm.params())
        return out
