"""The pipeline run's record: summary.json and metrics.csv, with the same history keys as the
one-process reference's so the two compare number for number."""

from __future__ import annotations

import os

from dni_async import report
from dni_async.runtime import failure

FLIGHT_KEYS = ("flight",)     # a stage's final report has its events for failure.json


def build(coord, final: dict, wall: float) -> dict:
    cfg, st, spec = coord.cfg, coord.state, coord.spec
    stages = [{k: v for k, v in coord.control.stats[rank].items() if k not in FLIGHT_KEYS}
              for rank in range(coord.n)]
    total_samples = coord.progress.batches * cfg.batch_size
    return {
        "kind": "pipeline",
        "run_id": spec.run_id,
        "run_dir": spec.run_dir,
        "config": cfg.to_dict(),
        "endpoints": spec.endpoints,
        "history": st.history,
        "curve": st.curve,
        "batches": coord.progress.batches,
        "stopped": coord.progress.stopped,
        "final": final,
        "wall_seconds": wall,               # of this process: since the resume, if resumed
        "resumed": bool(spec.resume_from),
        "train_seconds": st.train_seconds,  # of the whole run, every leg
        "samples_per_s": total_samples / st.train_seconds if st.train_seconds else 0.0,
        "weights_sha256": [s["weights_sha256"] for s in stages],
        "stage_busy": [s["busy"] / s["wall"] if s["wall"] else 0.0 for s in stages],
        "stages": stages,
        "bad_messages": {"coordinator": coord.bad_messages + coord.control.bad_messages,
                         **{f"stage-{s['rank']}": s["bad_messages"] for s in stages}},
        "refused": {"coordinator": {"wrong_key": coord.curve.refused if coord.curve else 0},
                    **{f"stage-{s['rank']}": s.get("refused", {}) for s in stages}},
        "coordinator_times": coord.clock.totals,
        "checkpoint_seconds": coord.checkpoints,
        "fp_warnings": failure.fp_warnings(coord),   # numpy's, counted per process
        "machine": report.machine(),
    }


def write(spec, summary: dict, clock) -> None:
    """summary.json last: once it is there the run is complete (`supervisor.completed`)."""
    report.write_history_csv(os.path.join(spec.run_dir, "metrics.csv"), summary["history"])
    if spec.trace:
        from dni_async.measure import trace
        trace.write_spans(spec.run_dir, "coordinator", os.getpid(), clock.spans)
    report.write_json(os.path.join(spec.run_dir, "summary.json"), summary)
