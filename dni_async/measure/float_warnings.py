"""numpy's floating-point warnings, counted per process instead of printed.

A run that overflows (a generator learning rate far too large, say) would print a
RuntimeWarning from every process, and a long one from every place that overflows; the
counts say more. Within `counting()`, overflow, invalid values and divisions by zero are
counted by kind; a run reports them once, at its end (`summary.json`'s `fp_warnings`, one
console line). Code that expects an overflow and handles it (the sigmoid's exp) keeps its own
`np.errstate(over="ignore")`, so it is not counted.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np

# numpy's names for what went wrong, as they appear in summary.json
KINDS = {"overflow": "overflow", "invalid value": "invalid", "divide by zero": "divide",
         "underflow": "underflow"}


class FloatWarnings:
    def __init__(self):
        self.counts: Counter = Counter()

    def _note(self, what: str, flag: int) -> None:
        self.counts[KINDS.get(what, what)] += 1

    @contextlib.contextmanager
    def counting(self):
        """numpy's warnings inside are counted here, not printed (this thread only)."""
        with np.errstate(over="call", invalid="call", divide="call", call=self._note):
            yield self

    def as_dict(self) -> dict:
        return dict(sorted(self.counts.items()))


def valid(counts) -> dict:
    """A report's counts as {kind: n}, from a message (input like any other)."""
    if not isinstance(counts, dict):
        return {}
    return {k: v for k, v in counts.items() if isinstance(k, str) and type(v) is int and v > 0}


def line(by_process: dict) -> str | None:
    """One line for a run: every process that counted any, or None when none did."""
    parts = [f"{who}: " + ", ".join(f"{kind} {n:,}" for kind, n in sorted(c.items()))
             for who, c in by_process.items() if c]
    if not parts:
        return None
    return "numpy floating-point warnings (counted, not printed): " + "; ".join(parts)
