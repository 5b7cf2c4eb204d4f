"""Where a process's time goes: compute, send, wait; optionally every span, for a trace.

Spans are timed with `time.perf_counter_ns` and recorded against `time.time_ns` at start, so
spans from different processes on one machine share a clock in the trace. Beside its totals a
clock gives the time per category since it was last asked (`deltas`, for heartbeats) and can
keep the spans of one short window of wall-clock time (`arm` / `take_glimpse`): processes that
arm the same window show the same moment side by side, which is what the live view draws.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

CATEGORIES = ("forward", "backward", "update", "generator", "send", "wait", "eval")
GLIMPSE_MAX_SPANS = 1000


class Clock:
    def __init__(self, record_spans: bool = False, max_spans: int = 200_000):
        self.totals = {c: 0.0 for c in CATEGORIES}
        self.cpu = {c: 0.0 for c in CATEGORIES}   # thread CPU seconds: what ran, not what waited for a core
        self.record = record_spans
        self.max_spans = max_spans
        self.spans: list = []          # (name, start_us_epoch, duration_us, step, cpu_us)
        self.started = time.perf_counter()
        self._offset_ns = time.time_ns() - time.perf_counter_ns()
        self._given = dict(self.totals)     # totals when `deltas` was last asked
        self._given_at = self.started
        self._window = None                 # (start, end) in perf_counter ns, when armed
        self.glimpse: list = []

    @contextmanager
    def span(self, name: str, step: int = -1):
        t0 = time.perf_counter_ns()
        c0 = time.thread_time_ns()
        try:
            yield
        finally:
            t1 = time.perf_counter_ns()
            dt = t1 - t0
            cpu = time.thread_time_ns() - c0
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu / 1e9
            self.totals[name] = self.totals.get(name, 0.0) + dt / 1e9
            if self.record and len(self.spans) < self.max_spans:
                self.spans.append((name, (t0 + self._offset_ns) / 1e3, dt / 1e3, step, cpu / 1e3))
            w = self._window
            if w is not None and t0 < w[1] and t1 > w[0] and len(self.glimpse) < GLIMPSE_MAX_SPANS:
                self.glimpse.append((name, (t0 + self._offset_ns) / 1e3, dt / 1e3, step))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def busy(self) -> float:
        """Seconds spent computing (everything but sending and waiting)."""
        return sum(v for k, v in self.totals.items() if k not in ("send", "wait"))

    def deltas(self) -> tuple[float, dict]:
        """(wall seconds, {category: seconds}) since the last call (or since the start)."""
        now = time.perf_counter()
        out = {k: v - self._given.get(k, 0.0) for k, v in self.totals.items()
               if v - self._given.get(k, 0.0) > 0}
        wall, self._given, self._given_at = now - self._given_at, dict(self.totals), now
        return wall, out

    # -- a glimpse: the spans of one short window of wall-clock time -------------------------

    def arm(self, start_s: float, length_s: float) -> None:
        """Keep the spans that overlap [start_s, start_s + length_s) (Unix seconds)."""
        start = int(start_s * 1e9) - self._offset_ns
        self._window = (start, start + int(length_s * 1e9))
        self.glimpse = []

    def armed(self) -> bool:
        return self._window is not None

    def glimpse_done(self) -> bool:
        return self._window is not None and time.perf_counter_ns() > self._window[1]

    def take_glimpse(self) -> dict:
        """The finished window: its bounds (Unix microseconds) and its spans, then disarmed."""
        start, end = self._window
        out = {"t0_us": (start + self._offset_ns) / 1e3, "t1_us": (end + self._offset_ns) / 1e3,
               "spans": [[c, round(ts, 1), round(d, 1), s] for c, ts, d, s in self.glimpse]}
        self._window, self.glimpse = None, []
        return out
