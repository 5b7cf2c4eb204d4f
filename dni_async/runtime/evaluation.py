"""Evaluation through the pipeline: a forward-only pass of a data set in chunks, with the last
stage's metric sums collected by step id.

Evaluation steps are numbered apart from training steps (`tag * EVAL_STEPS + chunk`), and an
answer that arrives after the coordinator stopped waiting is recognised and dropped, not
mistaken for a later evaluation's.
"""

from __future__ import annotations

import time

from dni_async.nn import metrics
from dni_async.runtime.control import StageLost
from dni_async.runtime.runspec import EVAL_CHUNK

EVAL_STEPS = 1000    # step ids per evaluation


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while waiting for an evaluation."""


class Evaluations:
    def __init__(self, send, pump, interrupted, deadline_s):
        self.send, self.pump, self.interrupted = send, pump, interrupted
        self.deadline_s = deadline_s      # how long one evaluation may take, measured
        self.awaited: set[int] = set()
        self.abandoned: set[int] = set()
        self.results: dict[int, dict] = {}

    def on_result(self, step: int, sums) -> bool:
        """An `evalres` came in; False if it was not one we wait for (count it as bad)."""
        if step in self.abandoned:              # answered after we stopped waiting
            self.abandoned.discard(step)
            return True
        if step in self.awaited and step not in self.results and metrics.valid(sums):
            self.results[step] = sums
            return True
        return False

    def run(self, x, y, tag: int) -> dict:
        """Metric sums of the whole set; raises Interrupted if asked to stop meanwhile."""
        steps = []
        t0 = time.monotonic()
        limit = self.deadline_s() * max(1, -(-len(x) // EVAL_CHUNK))
        for j, i in enumerate(range(0, len(x), EVAL_CHUNK)):
            step = tag * EVAL_STEPS + j
            steps.append(step)
            self.awaited.add(step)
            self.send("eval", step, [x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]])
        while not all(s in self.results for s in steps):
            if self.interrupted():
                self.awaited.difference_update(steps)
                self.abandoned.update(s for s in steps if s not in self.results)
                for s in steps:
                    self.results.pop(s, None)
                raise Interrupted
            if time.monotonic() - t0 > limit:
                lost = [s for s in steps if s not in self.results]
                raise StageLost(f"evaluation {tag} was lost: step(s) {lost} not back after "
                                f"{limit:.1f} s")
            self.pump()
        total = metrics.empty()
        for s in steps:
            self.awaited.discard(s)
            metrics.add(total, self.results.pop(s))
        return total
