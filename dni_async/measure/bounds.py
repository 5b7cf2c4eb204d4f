"""What the stages' own work allows: the ideal pipeline bound, lockstep backprop's period, and
the per-batch busy times (t_k) they are computed from. `dni-async bench` compares what it
measures with these; docs/benchmarks.md explains them.
"""

from __future__ import annotations

from dni_async.config import Config
from dni_async.nn.modes import MODES, mode_of

COMPUTE = ("forward", "backward", "update", "generator")   # busy categories of a training batch


def busy_clock(summary: dict) -> str:
    """'cpu' when every stage reports thread CPU seconds per category, else 'wall'."""
    return "cpu" if all(s.get("cpu_times") for s in summary["stages"]) else "wall"


def _times_key(summary: dict, clock: str | None) -> str:
    """Which of a stage's span totals to read: thread CPU seconds, or wall seconds."""
    return "cpu_times" if (clock or busy_clock(summary)) == "cpu" else "times"


def per_batch_busy(summary: dict, cfg: Config, clock: str | None = None) -> list:
    """t_k: seconds of forward + backward + generator + update per training batch, per stage.

    CPU seconds when the stages report them (a stage preempted by other work on the machine
    then does not count the time it did not run), else wall seconds inside the spans."""
    key = _times_key(summary, clock)
    per = mode_of(cfg).pieces(cfg)
    out = []
    for s in summary["stages"]:
        batches = s["batches"] / per
        out.append(sum(s[key].get(c, 0.0) for c in COMPUTE) / batches if batches else 0.0)
    return out


def bounds(t: list, batch_size: int, cores: int, parts: tuple | None = None) -> dict:
    """The ideal bound: 1 / max(max t_k, sum t_k / P) batches/s.

    Lockstep backprop's own, given `parts` = per-stage seconds (forward, backward, update):
    one batch in flight, so it cannot beat the period `lockstep_period` finds either."""
    if not t or sum(t) <= 0:
        return {"bound_samples_per_s": 0.0, "lockstep_bound_samples_per_s": 0.0,
                "lockstep_chain_ms": 0.0}
    limit = max(max(t), sum(t) / cores)
    chain = lockstep_period(*parts) if parts else sum(t)
    return {"bound_samples_per_s": batch_size / limit,
            "bound_limited_by": "slowest stage" if max(t) >= sum(t) / cores else "cores",
            "lockstep_chain_ms": 1000 * chain,
            "lockstep_bound_samples_per_s": batch_size / max(chain, limit)}


def lockstep_period(f: list, b: list, u: list, batches: int = 4) -> float:
    """Seconds per batch of lockstep backprop were messages free: stage k's forward f_k,
    backward b_k (its delta and dL/dx, sent upstream at once) and update u_k. A stage updates
    while the stages upstream carry on backward; the next batch leaves once the coordinator has
    both stage 0's `done` and the last stage's `loss` (each sent after that stage's update),
    and its forward at stage k waits until stage k's update is done."""
    n = len(f)
    done = [0.0] * n                   # when each stage finished its last update
    start, starts = 0.0, []
    for _ in range(batches):
        starts.append(start)
        clock = start
        for k in range(n):
            clock = max(clock, done[k]) + f[k]
        for k in reversed(range(n)):
            clock += b[k]
            done[k] = clock + u[k]
        start = max(done[0], done[-1])
    return starts[-1] - starts[-2]


def per_batch_parts(summary: dict, cfg: Config, clock: str | None = None) -> tuple:
    """Per stage, seconds per batch of (forward, backward, update): lockstep backprop's parts."""
    key = _times_key(summary, clock)
    return tuple([s[key].get(c, 0.0) / s["batches"] if s["batches"] else 0.0
                  for s in summary["stages"]] for c in ("forward", "backward", "update"))


def own_bound(mode: str, row: dict) -> float:
    """A mode's own bound, from t_k timed alone when measured: lockstep backprop's (one batch in
    flight), the ideal pipeline bound for every other mode."""
    src = row.get("alone") or row
    lockstep = MODES[mode].bound == "lockstep"
    return src["lockstep_bound_samples_per_s" if lockstep else "bound_samples_per_s"]
