"""What `failure.json` says when a run fails: the error, the steps still open and where each
stage last saw its steps, every process's flight record (`flight.py`), and the floating-point
warnings counted so far. The coordinator writes it; `train` adds what it saw itself."""

from __future__ import annotations

import os
import sys

from dni_async import report
from dni_async.measure import float_warnings
from dni_async.runtime import flight

LAST_WORDS_S = 1.0     # after a failure, how long live stages have for their final report


def conclude(coord, error: str, **extra) -> None:
    """Every stage told to stop; failure.json, with the last words of the stages that can
    still answer (none when `train` is already stopping everyone); the warnings in one line."""
    write(coord, error, **extra)     # at once: `train` may not wait for the rest
    coord.control.last_words(0.0 if coord.interrupted else LAST_WORDS_S)
    written = write(coord, error, **extra)
    said = float_warnings.line(written.get("fp_warnings", {}))
    if said:
        print(f"dni-async: {said}", file=sys.stderr)


def write(coord, error: str, **extra) -> dict:
    open_steps = {str(s): sorted(w) for s, w in coord.credits.open.items()}
    body = {"error": error, **extra,
            "last_completed_step": coord.credits.completed_batches - 1,
            "open_steps": open_steps,
            "stages_last_seen": {f"stage-{k}": v for k, v in sorted(coord.control.seen.items())},
            "flight": flight.record(coord.recorder, coord.control.reports, coord.n, open_steps)}
    fp = fp_warnings(coord)
    if fp:
        body["fp_warnings"] = fp
    report.write_json(os.path.join(coord.spec.run_dir, "failure.json"), body)
    return body


def fp_warnings(coord) -> dict:
    """Each process's floating-point warning counts, where any: a stage's from its final
    report, or (a run that failed) from its latest heartbeat."""
    out = {"coordinator": coord.fp.as_dict()}
    for k in range(coord.n):
        final = coord.control.stats.get(k)
        latest = coord.control.reports.by_rank.get(k, {})
        out[f"stage-{k}"] = float_warnings.valid((final or latest).get("fp_warnings"))
    return {who: c for who, c in out.items() if c}
