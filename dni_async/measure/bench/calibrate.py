"""Each stage's work timed alone: one stage at a time, in a fresh process with one BLAS thread,
running the mode's own program. What the pipeline could do with nothing in its way."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from dni_async.config import Config
from dni_async.measure.bench.children import run_child
from dni_async.measure.bounds import bounds


def calibrate_worker(cfg: Config, reps: int = 7) -> dict:
    """Time each stage's work for one batch in this process, one stage at a time.

    The stage code is the pipeline's own (the mode's programs on a StageModel); inputs are a
    real batch carried forward through the stages, gradients are random arrays of the right
    shape. Run it in a process with one BLAS thread (see `calibrate`)."""
    import contextlib

    import numpy as np
    from dni_async.nn import network
    from dni_async.nn.modes import mode_of
    from dni_async.nn.program import StageProgram
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    mode, n, bs = mode_of(cfg), cfg.n_stages, cfg.batch_size
    m = mode.pieces(cfg)
    x, y = ds.x_train[:bs], ds.y_train[:bs]
    hs = [x]
    for model in models:
        hs.append(model.forward(hs[-1]))
    grads = [(np.random.RandomState(k).randn(*hs[k + 1].shape) * 1e-3).astype(hs[k + 1].dtype)
             for k in range(n)]
    wall, cpu, parts = [], [], []
    for k, model in enumerate(models):
        split = {}     # wall seconds per category of this repetition, as a stage times them

        @contextlib.contextmanager
        def span(category, step):
            t0 = time.perf_counter()
            yield
            split[category] = split.get(category, 0.0) + time.perf_counter() - t0

        program = StageProgram(model, mode, cfg, k, send=lambda *a: None, span=span)
        pieces = list(zip(np.array_split(hs[k], m), np.array_split(y, m),
                          np.array_split(grads[k], m)))
        ws, cs, ps = [], [], []
        for i in range(reps + 2):          # two warm-up repetitions
            split.clear()
            t0, c0 = time.perf_counter(), time.thread_time()
            for j, (xm, ym, gm) in enumerate(pieces):
                step = i * m + j
                program.on_forward(step, xm, ym)
                if program.gradient_ops:
                    program.on_gradient(step, gm)
            if i >= 2:
                ws.append(time.perf_counter() - t0)
                cs.append(time.thread_time() - c0)
                ps.append([split.get(c, 0.0) for c in ("forward", "backward", "update")])
        wall.append(statistics.median(ws))
        cpu.append(statistics.median(cs))
        parts.append([1000 * statistics.median(p[i] for p in ps) for i in range(3)])
    out = {"stage_batch_ms": [1000 * t for t in wall], "stage_batch_cpu_ms": [1000 * t for t in cpu]}
    if mode.bound == "lockstep":
        out["stage_parts_ms"] = parts     # per stage: forward, backward, update
    return out


def calibrate(cfg: Config, folder: str, timeout_s: float = 600) -> dict:
    """`calibrate_worker` in a fresh interpreter with one BLAS thread, as a stage has."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"calibrate-{cfg.mode}.json")
    with open(path, "w") as fh:
        fh.write(cfg.to_json())
    proc = run_child([sys.executable, "-m", "dni_async.measure.bench.calibrate", path], 1,
                      timeout_s, "timing the stages alone")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_alone(row: dict, alone: dict, batch_size: int, cores: int) -> None:
    """Bounds from the stages' work timed alone: what the pipeline could do with nothing in
    its way (no other process sharing a core, no transport)."""
    t = [x / 1000 for x in alone["stage_batch_ms"]]
    parts = alone.get("stage_parts_ms")
    b = bounds(t, batch_size, cores,
               tuple([p[i] / 1000 for p in parts] for i in range(3)) if parts else None)
    rate = row["samples_per_s"]
    row["alone"] = {**alone, **b,
                    "efficiency": rate / b["bound_samples_per_s"] if b["bound_samples_per_s"]
                    else None,
                    "lockstep_efficiency": rate / b["lockstep_bound_samples_per_s"]
                    if b["lockstep_bound_samples_per_s"] else None}


def _calibrate_main(path: str) -> int:
    from dni_async.config import config_from_dict
    with open(path) as fh:
        cfg = config_from_dict(json.load(fh))
    print(json.dumps(calibrate_worker(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_calibrate_main(sys.argv[1]))
