"""Where a process's time goes: compute, send, wait; optionally every span, for a trace.

Spans are timed with `time.perf_counter_ns` and recorded against `time.time_ns` at start, so
spans from different processes on one machine share a clock in the trace.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

CATEGORIES = ("forward", "backward", "update", "generator", "send", "wait", "eval")


class Clock:
    def __init__(self, record_spans: bool = False, max_spans: int = 200_000):
        self.totals = {c: 0.0 for c in CATEGORIES}
        self.cpu = {c: 0.0 for c in CATEGORIES}   # thread CPU seconds: what ran, not what waited for a core
        self.record = record_spans
        self.max_spans = max_spans
        self.spans: list = []          # (name, start_us_epoch, duration_us, step)
        self.started = time.perf_counter()
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    @contextmanager
    def span(self, name: str, step: int = -1):
        t0 = time.perf_counter_ns()
        c0 = time.thread_time_ns()
        try:
            yield
        finally:
            dt = time.perf_counter_ns() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + (time.thread_time_ns() - c0) / 1e9
            self.totals[name] = self.totals.get(name, 0.0) + dt / 1e9
            if self.record and len(self.spans) < self.max_spans:
                self.spans.append((name, (t0 + self._offset_ns) / 1e3, dt / 1e3, step))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def busy(self) -> float:
        """Seconds spent computing (everything but sending and waiting)."""
        return sum(v for k, v in self.totals.items() if k not in ("send", "wait"))
