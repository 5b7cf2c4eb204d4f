"""The synthetic-gradient generator: a small model that guesses dL/dh from a context.

Like the layers it computes gradients on batch sums (see `layers`); its own optimizer (SGD:
learning rate per example summed; Adam: per-example means) takes the step.

Linear by default, over [h, one-hot y] for cdni, as the DNI paper has it; optionally one relu
hidden layer, with batch norm on it (batch statistics always: a generator only runs in
training). The output layer starts at zero (as in the paper), so the first synthetic
gradients are zero and early layer updates are harmless. Trained on 0.5 * ||g_hat - target||^2.

The context can be normalised before the generator sees it: over the batch (each column to
zero mean, unit spread) or per example (each row to zero mean, unit spread).

`per_label` adds one more linear map of the context's h part for each label, weighted by y:
for one-hot y, each class has its own map of h, on top of the shared one. Without a hidden
layer it is the linear generator over [h, y, h (x) y] (h as normalised), computed without the
outer product. Why: the true dL/dh of a
classifier is W^T (p - y) seen through the layers above, so which way h should move depends on
the label and on h together; a map shared by all labels can only add the two. On 6-layer
MNIST-1D it closes most of cdni's gap to backprop (docs/math-study.md, "Per-label maps").
The per-label maps may learn at their own rate (`per_label_lr`): they hold ten times the
shared map's weights, each learns from a tenth of the batch, and in a deep network their
targets are themselves guesses, which at the shared map's rate they follow too closely
(docs/math-study.md, "The per-label maps' own rate").
"""

from __future__ import annotations

import numpy as np

from dni_async.nn import optim
from dni_async.nn.norm import BatchNorm

CONTEXTS = ("h", "y", "hy")
NORMALIZE = ("none", "batch", "example")
NORM_EPS = 1e-5


def context(kind: str, h, y):
    """What the generator sees: the layer's output, the labels, or both side by side."""
    if kind == "h":
        return h
    if kind == "y":
        return y.astype(h.dtype, copy=False)
    if kind == "hy":
        return np.concatenate([h, y.astype(h.dtype, copy=False)], axis=1)
    raise ValueError(f"unknown generator context {kind!r}")


def context_dim(kind: str, h_dim: int, y_dim: int) -> int:
    """Columns of `context(kind, h, y)`."""
    return {"h": h_dim, "y": y_dim, "hy": h_dim + y_dim}[kind]


def normalize_context(kind: str, c):
    """The context normalised over the batch (per column) or per example (per row)."""
    if kind == "none":
        return c
    axis = {"batch": 0, "example": 1}[kind]
    mu = c.mean(axis=axis, keepdims=True)
    sd = c.std(axis=axis, keepdims=True)
    return (c - mu) / (sd + NORM_EPS)


class Generator:
    """Predicts dL/dh from a context; linear, or one relu hidden layer (optionally normalised).

    `predict` returns (g_hat, cache); `update(cache, g_hat, target)` takes one optimizer step on
    that prediction's error; `refresh(cache)` recomputes the prediction for the same context
    with the current weights (for a target that arrives after the generator has moved on).
    """

    def __init__(self, ctx_dim: int, out_dim: int, lr: float, dtype, hidden: int = 0,
                 rng: np.random.RandomState | None = None, normalize="none",
                 batch_norm: bool = False, optimizer: str = "sgd", beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, per_label: int = 0,
                 per_label_lr: float = 0.0):
        if normalize is True or normalize is False:      # the old boolean: over the batch
            normalize = "batch" if normalize else "none"
        if normalize not in NORMALIZE:
            raise ValueError(f"unknown context normalisation {normalize!r}")
        self.lr = lr
        self.hidden = hidden
        self.normalize = normalize
        self.steps = 0                    # optimizer steps taken so far
        self.norm = None
        self.b1 = None
        if hidden:
            rng = rng if rng is not None else np.random.RandomState(0)
            self.W1 = (rng.randn(ctx_dim, hidden) * np.sqrt(2.0 / ctx_dim)).astype(dtype)
            if batch_norm:
                self.norm = BatchNorm(hidden, dtype, track_running=False)
            else:
                self.b1 = np.zeros(hidden, dtype)
            self.W2 = np.zeros((hidden, out_dim), dtype)
        else:
            self.W2 = np.zeros((ctx_dim, out_dim), dtype)
        self.b2 = np.zeros(out_dim, dtype)
        # per_label = the number of labels L: the context ends with y, and h is what comes first
        self.Wy = None
        if per_label:
            if not 0 < per_label < ctx_dim:
                raise ValueError(f"per_label={per_label} needs a context [h, y] wider than y")
            self.Wy = np.zeros((per_label, ctx_dim - per_label, out_dim), dtype)
        rates = {"Wy": per_label_lr} if per_label and per_label_lr else None
        self.optimizer = optim.make(optimizer, self.named_params(), lr, beta1=beta1,
                                    beta2=beta2, eps=eps, rates=rates)

    def _forward(self, c, groups):
        if not self.hidden:
            g, z, nc = c.dot(self.W2) + self.b2, None, None
        else:
            a = c.dot(self.W1)
            nc = None
            if self.norm is not None:
                a, nc = self.norm.forward_train(a)
            else:
                a = a + self.b1
            z = np.maximum(a, 0)
            g = z.dot(self.W2) + self.b2
        if self.Wy is not None:
            h = c[:, :self.Wy.shape[1]]
            for k, rows, w in groups:
                g[rows] += w * h[rows].dot(self.Wy[k])
        return g, (c, z, nc, groups)

    def predict(self, c, y=None):
        """Returns (g_hat, cache); the cache is what `update` and `refresh` need later.

        `y` (the labels, as they are in the context) weights the per-label maps."""
        if self.Wy is None:
            return self._forward(normalize_context(self.normalize, c), None)
        if y is None:
            raise ValueError("a per-label generator needs the labels")
        c = normalize_context(self.normalize, c)
        # which rows carry which label, found once: the guess, a refresh and the step reuse it
        groups = list(_label_rows(y, np.result_type(c.dtype, self.W2.dtype)))
        return self._forward(c, groups)

    def refresh(self, cache):
        """(g_hat, cache) for the same (already normalised) context, with today's weights."""
        return self._forward(cache[0], cache[3])

    def gradients(self, cache, g_hat, target) -> tuple:
        """(batch-sum gradients by parameter name, squared error) of 0.5 ||g_hat - target||^2."""
        c, z, nc, groups = cache
        d = g_hat - target
        sq = float(np.sum(d * d))
        grads = {"b2": d.sum(axis=0)}
        if self.Wy is not None:
            h = c[:, :self.Wy.shape[1]]
            grads["Wy"] = gy = np.zeros_like(self.Wy)
            for k, rows, w in groups:
                gy[k] = (w * h[rows]).T.dot(d[rows])
        if self.hidden:
            dz = d.dot(self.W2.T)
            dz *= z > 0
            grads["W2"] = z.T.dot(d)
            if self.norm is not None:
                dz, grads["gamma"], grads["beta"] = self.norm.backward(dz, nc)
            else:
                grads["b1"] = dz.sum(axis=0)
            grads["W1"] = c.T.dot(dz)
        else:
            grads["W2"] = c.T.dot(d)
        return grads, sq

    def update(self, cache, g_hat, target) -> float:
        """One step towards target; returns the squared error before the step."""
        grads, sq = self.gradients(cache, g_hat, target)
        self.optimizer.step(grads, g_hat.shape[0])
        self.steps += 1
        return sq

    def named_params(self) -> dict:
        out = {}
        if self.hidden:
            out["W1"] = self.W1
            if self.b1 is not None:
                out["b1"] = self.b1
            if self.norm is not None:
                out.update(self.norm.params())
        out["W2"] = self.W2
        out["b2"] = self.b2
        if self.Wy is not None:
            out["Wy"] = self.Wy
        return out

    def params(self) -> list:
        return list(self.named_params().values())


def _label_rows(y, dtype):
    """(label, its rows, their weights as a column) for every label some row carries.

    One-hot rows fall into one group each, so the per-label maps cost one map of h in all."""
    for k in np.flatnonzero(np.any(y != 0, axis=0)):
        rows = np.flatnonzero(y[:, k])
        yield k, rows, y[rows, k, None].astype(dtype, copy=False)
