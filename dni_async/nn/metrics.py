"""Metrics beside every loss: bit accuracy and whole-answer accuracy, summed then averaged.

A loss alone can mislead (the seed's own DNI run printed a loss near zero while guessing at
chance), so every place that reports a loss reports these too. For classification the two
accuracies are the same number: the argmax is right.
"""

from __future__ import annotations

import numpy as np

from dni_async import nn

SUM_KEYS = ("n", "loss", "delta_l1", "units_right", "units", "rows_right")


def batch_sums(task: str, loss: str, out, y, delta=None) -> dict:
    """Sums over one batch; `delta` (dL/da at the output) gives the seed's figure."""
    if task == "bits":
        right = (out > 0.5) == (y > 0.5)
        units_right, units = int(right.sum()), int(right.size)
        rows_right = int(right.all(axis=1).sum())
    else:
        hit = out.argmax(axis=1) == y.argmax(axis=1)
        units_right = rows_right = int(hit.sum())
        units = int(hit.size)
    return {
        "n": int(out.shape[0]),
        "loss": nn.loss_sum(loss, out, y),
        "delta_l1": float(np.sum(np.abs(delta))) if delta is not None else 0.0,
        "units_right": units_right,
        "units": units,
        "rows_right": rows_right,
    }


def valid(sums) -> bool:
    """Sums that came off the wire: the right keys, counts as non-negative ints, the loss
    figures as numbers (NaN allowed: a diverged run must still be reported)."""
    if not isinstance(sums, dict) or set(sums) != set(SUM_KEYS):
        return False
    counts = ("n", "units_right", "units", "rows_right")
    if not all(type(sums[k]) is int and sums[k] >= 0 for k in counts):
        return False
    return all(type(sums[k]) in (int, float) for k in ("loss", "delta_l1"))


def empty() -> dict:
    return {k: 0 for k in SUM_KEYS}


def add(total: dict, part: dict) -> dict:
    for k in SUM_KEYS:
        total[k] += part[k]
    return total


def summarize(sums: dict, prefix: str) -> dict:
    n, units = max(sums["n"], 1), max(sums["units"], 1)
    return {
        f"{prefix}_loss": sums["loss"] / n,
        f"{prefix}_bit_acc": sums["units_right"] / units,
        f"{prefix}_exact_acc": sums["rows_right"] / n,
    }
