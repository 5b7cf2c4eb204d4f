"""One run of an experiment, in the pipeline or the one-process reference, and its record."""

from __future__ import annotations

import json
import os

from dni_async.config import make_config
from dni_async.experiments.spec import ExperimentFailed


def run_one(values: dict, runner: str, run_dir: str) -> dict:
    """Train once; returns the run's summary (the keys `dni-async train` writes)."""
    cfg = make_config(values)
    if runner == "reference":
        from dni_async.oneprocess import reference
        summary = reference.train(cfg, log=None)
        os.makedirs(run_dir, exist_ok=True)
        _write_json(os.path.join(run_dir, "summary.json"), summary)
        return summary
    from dni_async.runtime import supervisor as launch
    rc = launch.train(cfg, run_dir=run_dir, quiet=True)
    if rc == 4:     # diverged: a result (marked), not a failure of the experiment
        nan = float("nan")
        return {"diverged": True, "samples_per_s": nan, "wall_seconds": nan, "stages": [],
                "train_seconds": nan, "history": [],
                "final": {k: nan for k in ("train_bit_acc", "train_exact_acc", "train_loss",
                                           "test_bit_acc", "test_exact_acc", "test_loss")}}
    path = os.path.join(run_dir, "summary.json")
    if rc != 0 or not os.path.exists(path):
        raise ExperimentFailed(f"run in {run_dir} failed (exit status {rc})")
    with open(path) as fh:
        return json.load(fh)


def frozen_control(values: dict) -> dict:
    """The same network with its hidden layers never trained (`freeze_hidden`): only the last
    layer learns, from the true gradient. Its last layer sees the same inputs in the same order
    wherever it runs, so the single-process reference gives the pipeline's numbers exactly. A
    synthetic gradient is worth something only if it beats this."""
    from dni_async.oneprocess import reference
    cfg = make_config({**values, "mode": "backprop", "freeze_hidden": True})
    return reference.train(cfg, log=None)


def _write_json(path: str, obj) -> None:
    from dni_async import report
    report.write_json(path, obj)


def _held_out(summary: dict) -> float:
    return summary["final"]["test_bit_acc"]
