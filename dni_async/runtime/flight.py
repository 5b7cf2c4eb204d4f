"""The flight recorder: each process's last message events and what it was holding, so that a
failed run's `failure.json` shows which edge of the pipeline stopped.

Every process keeps its last `EVENTS` message events in a ring of tuples
`(unix time, direction, peer, kind, step)`: direction "in", "out", or "dropped" (the fault
that discards a message); peer the process at the other end ("coordinator", "stage-K"); kind
the message kind; step its batch id (-1 for control messages). Heartbeats are left out: they
would push everything else out of the ring. Noting one event is one deque append.

A stage sends its ring with every heartbeat, beside what it holds: `held`, the steps it keeps
until their gradient comes back (the lockstep waiting table, also a coupled boundary's), and
`pending_targets`, the steps whose generator target has not arrived (dni, cdni), each with its
count. The coordinator keeps the latest report of each stage (`Reports`): a stage that died,
hung or was cut off cannot report any more, so what it said last is what there is. At a
failure the coordinator writes them all, with its own ring and open steps, into failure.json
(`record`); event times there are seconds before the record was written, each process's by its
own clock (on several hosts, clocks may disagree by their skew).
"""

from __future__ import annotations

import time
from collections import deque

EVENTS = 48             # events kept per process
LISTED = 32             # steps listed per holding table in a heartbeat (counts are exact)
DIRECTIONS = ("in", "out", "dropped")


class FlightRecorder:
    def __init__(self, size: int = EVENTS):
        self.events = deque(maxlen=size)

    def note(self, direction: str, peer: str, kind: str, step: int) -> None:
        self.events.append((time.time(), direction, peer, kind, step))


def beat(recorder: FlightRecorder, held, pending) -> dict:
    """What a stage adds to its heartbeat: its events, and its tables (the newest LISTED
    steps of each, and how many)."""
    held, pending = sorted(held), list(pending)
    return {"flight": list(recorder.events),
            "holding": {"held": held[-LISTED:], "n_held": len(held),
                        "pending_targets": pending[-LISTED:], "n_pending_targets": len(pending)}}


class Reports:
    """The coordinator's copy of each stage's latest flight report."""

    def __init__(self):
        self.by_rank: dict[int, dict] = {}

    def absorb(self, rank: int, meta: dict) -> None:
        """File a heartbeat's report (checked: a heartbeat is input like any other)."""
        events, held = meta.get("flight"), meta.get("holding")
        if not isinstance(events, list) or not isinstance(held, dict):
            return
        self.by_rank[rank] = {"at": time.time(), "events": [e for e in events[-EVENTS:]
                                                            if _event_ok(e)],
                              "holding": {k: v for k, v in held.items()
                                          if isinstance(k, str) and _steps_ok(v)},
                              "fp_warnings": meta.get("fp_warnings")}


def record(recorder: FlightRecorder, reports: Reports, n: int, open_steps: dict) -> dict:
    """failure.json's `flight`: the coordinator's events and open steps, and every stage's
    latest report, events as lines with times relative to now."""
    now = time.time()
    out = {"coordinator": {"holding": {"open_steps": open_steps},
                           "events": [_line(e, now) for e in recorder.events]}}
    for k in range(n):
        r = reports.by_rank.get(k)
        out[f"stage-{k}"] = ({"reported_s_ago": round(now - r["at"], 3), "holding": r["holding"],
                              "events": [_line(e, now) for e in r["events"]]}
                             if r else {"reported_s_ago": None, "note": "never reported"})
    return out


def _line(event, now: float) -> str:
    """An event 6.412 s ago as '-6.412s in  fwd 29 from stage-0' (no step: a control message)."""
    t, direction, peer, kind, step = event
    what = f"{kind} {step}" if step >= 0 else kind
    return f"{t - now:+.3f}s {direction:<3} {what} {'from' if direction == 'in' else 'to'} {peer}"


def _event_ok(e) -> bool:
    return (isinstance(e, (list, tuple)) and len(e) == 5 and type(e[0]) is float
            and e[1] in DIRECTIONS and isinstance(e[2], str) and len(e[2]) <= 40
            and isinstance(e[3], str) and len(e[3]) <= 20 and type(e[4]) is int)


def _steps_ok(v) -> bool:
    return type(v) is int or (isinstance(v, list) and len(v) <= LISTED
                              and all(type(s) is int for s in v))
