"""What a stage tells the coordinator about itself: its heartbeat and its final report.

A heartbeat carries the recent steps on each link (where a lost step was last seen), what the
monitor shows (`monitor.beat_extras`), the flight record (`flight.beat`) and the floating-point
warnings counted so far; the final report (`stats`), sent when told to stop, carries the
run's totals and the same flight record, so a failed run's last words end at the failure.
"""

from __future__ import annotations

import os

from dni_async.runtime import flight
from dni_async.runtime.monitor import beat_extras


def heartbeat(stage) -> dict:
    links, held, pending = stage.links, stage.program.held, stage.model.pending
    return {"batches": stage.batches,
            **links.recent_steps(),
            **beat_extras(stage.clock, len(held), len(pending), stage.model.counters),
            **flight.beat(links.recorder, held, pending),
            "fp_warnings": stage.fp.as_dict()}


def final(stage) -> dict:
    model, clock = stage.model, stage.clock
    return {
        "rank": stage.rank, "pid": os.getpid(), "batches": stage.batches,
        "weights_sha256": model.weights_sha256(),
        "times": clock.totals, "cpu_times": clock.cpu,
        "wall": clock.elapsed(), "busy": clock.busy(),
        "bad_messages": stage.bad_messages, "counters": model.counters,
        "refused": {"wrong_key": stage.links.refused_keys, "replayed": stage.replays.refused},
        "generator_sq_error": model.generator_sq_error,
        **({"sg_trust": model.trust} if model.trust_rate else {}),
        "lag_histogram": {str(k): v for k, v in sorted(stage.lags.items())},
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "fp_warnings": stage.fp.as_dict(),
        "preflight": stage.work_s,
        **flight.beat(stage.links.recorder, stage.program.held, model.pending),
    }
