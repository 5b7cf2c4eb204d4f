"""A stage's side of liveness: its heartbeats out, and its judgement of the coordinator's.

Heartbeats come from the stage's own loop, never from a background thread: a loop that hangs
stops them, and that is how the coordinator finds a hung stage. Long work runs in pieces and
calls `beat()` between them (the row blocks of an evaluation chunk, the arrays of a checkpoint,
the gradients read in one go), so a wide layer's work keeps them coming without giving that up.

The coordinator is judged fairly: after long work the stage has not read its control socket
for a while, so a message waiting there counts as word from the coordinator.
"""

from __future__ import annotations

import time


class Heartbeat:
    def __init__(self, send, report, interval_s: float, timeout_s: float):
        self.send, self.report = send, report    # send(meta); report() -> the beat's meta
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.next_at = time.monotonic() + interval_s
        self.heard_at = time.monotonic()

    def beat(self) -> None:
        """Send a heartbeat if one is due."""
        now = time.monotonic()
        if now >= self.next_at:
            self.send(self.report())
            self.next_at = now + self.interval_s

    def heard(self) -> None:
        """A message from the coordinator was read."""
        self.heard_at = time.monotonic()

    def coordinator_silent(self, waiting) -> bool:
        """Nothing read from the coordinator for `timeout_s`, and `waiting()` (is a message
        queued, unread?) says nothing is on its way either."""
        return time.monotonic() - self.heard_at > self.timeout_s and not waiting()
