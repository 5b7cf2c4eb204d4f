"""Batch normalisation over the pre-activations of a layer.

    z = gamma * (a - mean_batch(a)) / sqrt(var_batch(a) + eps) + beta

Training uses the batch's own statistics and moves the running ones towards them
(running <- momentum * running + (1 - momentum) * batch, biased variance); evaluation uses the
running statistics. gamma and beta are parameters (trained by the owner's optimizer); the
running statistics are state, saved with checkpoints. Gradients are for the batch-summed loss,
like everything in `nn`.
"""

from __future__ import annotations

import numpy as np

MOMENTUM = 0.9
EPS = 1e-5


class BatchNorm:
    def __init__(self, dim: int, dtype, *, momentum: float = MOMENTUM, eps: float = EPS,
                 track_running: bool = True):
        self.gamma = np.ones(dim, dtype)
        self.beta = np.zeros(dim, dtype)
        self.momentum, self.eps = momentum, eps
        self.track_running = track_running
        self.running_mean = np.zeros(dim, dtype) if track_running else None
        self.running_var = np.ones(dim, dtype) if track_running else None

    def forward_train(self, a):
        """(z, cache) from the batch's statistics; moves the running statistics."""
        mu = a.mean(axis=0)
        xc = a - mu
        var = np.mean(xc * xc, axis=0)
        inv_std = 1.0 / np.sqrt(var + self.eps)
        xhat = xc
        xhat *= inv_std                           # xc is ours: normalise it in place
        if self.track_running:
            m = self.momentum
            self.running_mean *= m
            self.running_mean += (1 - m) * mu
            self.running_var *= m
            self.running_var += (1 - m) * var
        z = xhat * self.gamma
        z += self.beta
        return z, (xhat, inv_std)

    def forward_eval(self, a):
        """z from the running statistics (batch statistics when they are not tracked)."""
        if not self.track_running:
            return self.forward_train(a)[0]
        scale = self.gamma / np.sqrt(self.running_var + self.eps)
        z = a - self.running_mean
        z *= scale
        z += self.beta
        return z

    def backward(self, dz, cache, gamma=None):
        """(dL/da, dL/dgamma, dL/dbeta) from dL/dz, with the gamma of the forward pass's
        time: call before the update, or pass that gamma."""
        xhat, inv_std = cache
        n = dz.shape[0]
        dbeta = dz.sum(axis=0)
        dgamma = np.sum(dz * xhat, axis=0)
        # da = gamma * inv_std / n * (n dz - sum(dz) - xhat * sum(dz * xhat))
        da = dz * n
        da -= dbeta
        da -= xhat * dgamma
        da *= (self.gamma if gamma is None else gamma) * inv_std / n
        return da, dgamma, dbeta

    def params(self) -> dict:
        return {"gamma": self.gamma, "beta": self.beta}

    def buffers(self) -> dict:
        if not self.track_running:
            return {}
        return {"mean": self.running_mean, "var": self.running_var}
