"""From runs to figures: steady-state samples/s, time to a target, each mode's row of the
table, the generator's size, the machine."""

from __future__ import annotations

import statistics

from dni_async import report
from dni_async.config import Config
from dni_async.measure.bounds import bounds, busy_clock, per_batch_busy, per_batch_parts
from dni_async.nn.modes import mode_of


def steady_rate(history: list, warmup: int, samples_per_epoch: int) -> float:
    """Samples/s over the epochs after the warm-up (all epochs if there are no others)."""
    if not history:
        return 0.0
    w = warmup if len(history) > warmup else 0
    seconds = history[-1]["seconds"] - (history[w - 1]["seconds"] if w else 0.0)
    return (len(history) - w) * samples_per_epoch / seconds if seconds > 0 else 0.0


def time_to(history: list, target) -> float | None:
    """Training seconds until the target metric is first reached (None: never)."""
    if not target:
        return None
    name, value = target
    for row in history:
        v = row.get(name)
        if v is None:
            continue
        if (v <= value) if name == "loss" else (v >= value):
            return row["seconds"]
    return None


def final_metric(summary: dict, name: str):
    f = summary.get("final", {})
    if name == "loss":
        return f.get("train_loss")
    return f.get(name)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize_mode(cfg: Config, runs: list, warmup: int, cores: int, target, metric: str) -> dict:
    spe = cfg.batches_per_epoch() * cfg.batch_size
    rates = [steady_rate(r["history"], warmup, spe) for r in runs]
    clock = "cpu" if all(busy_clock(r) == "cpu" for r in runs) else "wall"
    ts = [per_batch_busy(r, cfg, clock) for r in runs]
    t = [statistics.median(col) for col in zip(*ts)]
    t_wall = [statistics.median(col) for col in zip(*(per_batch_busy(r, cfg, "wall")
                                                       for r in runs))]
    busy = [statistics.median(col) for col in zip(*(r["stage_busy"] for r in runs))]
    rate = statistics.median(rates)
    parts = None
    lockstep = mode_of(cfg).bound == "lockstep"
    if lockstep:
        each = [per_batch_parts(r, cfg, clock) for r in runs]
        parts = tuple([statistics.median(col) for col in zip(*(e[i] for e in each))]
                      for i in range(3))
    b = bounds(t, cfg.batch_size, cores, parts)
    out = {
        "samples_per_s": rate,
        "samples_per_s_repeats": rates,
        "batch_ms": 1000 * cfg.batch_size / rate if rate else None,
        "stage_busy": busy,
        "stage_batch_ms": [1000 * x for x in t],
        "busy_clock": clock,
        "stage_batch_ms_wall": [1000 * x for x in t_wall],
        "stage_times_s": [st["times"] for st in runs[_median_index(rates)]["stages"]],
        **b,
        "efficiency": rate / b["bound_samples_per_s"] if b["bound_samples_per_s"] else None,
        "time_to_target_s": _median([time_to(r["history"], target) for r in runs]),
        "reached_target": sum(time_to(r["history"], target) is not None for r in runs),
        "final_metric": _median([final_metric(r, metric) for r in runs]),
        "final": runs[_median_index(rates)]["final"],
        "history": runs[_median_index(rates)]["history"],
        "run_dirs": [r.get("run_dir") for r in runs],
        "weights_sha256": runs[0]["weights_sha256"],
        "bad_messages": sum(sum(r["bad_messages"].values()) for r in runs),
    }
    if lockstep:
        out["stage_parts_ms"] = [[1000 * p[k] for p in parts] for k in range(len(t))]
        lb = b["lockstep_bound_samples_per_s"]
        out["lockstep_efficiency"] = rate / lb if lb else None
    if mode_of(cfg).has_generator(0, cfg.n_stages):
        out["generator"] = generator_info(cfg)
    return out


def _median_index(xs: list) -> int:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    return order[(len(order) - 1) // 2]


def summarize_reference(cfg: Config, s: dict, warmup: int, target, metric: str) -> dict:
    spe = cfg.batches_per_epoch() * cfg.batch_size
    rate = steady_rate(s["history"], warmup, spe)
    return {"samples_per_s": rate, "blas_threads": s["blas_threads"],
            "batch_ms": 1000 * cfg.batch_size / rate if rate else None,
            "time_to_target_s": time_to(s["history"], target),
            "final_metric": final_metric(s, metric), "final": s["final"],
            "history": s["history"], "weights_sha256": s["weights_sha256"]}


def generator_info(cfg: Config) -> dict:
    """Which synthetic-gradient generator the decoupled stages use, and its size against the
    layer: multiply-adds per row of one generator pass / those of the layer's forward matmul."""
    ctx, hid, widths = cfg.generator_context(), cfg.generator_hidden, cfg.widths
    shapes, shares = [], []
    for k in range(cfg.n_stages - 1):
        out = widths[k + 1]
        c = {"h": out, "y": cfg.output_dim, "hy": out + cfg.output_dim}[ctx]
        shapes.append([c, hid, out] if hid else [c, out])
        shares.append((c * hid + hid * out if hid else c * out) / (widths[k] * out))
    seen = {"h": "the layer's output h", "y": "the labels y only", "hy": "[h, y]"}[ctx]
    kind = f"generator with a {hid}-unit relu bottleneck" if hid else "linear generator"
    text = (f"{kind} on {seen} (context '{ctx}'; "
            + ", ".join("->".join(map(str, sh)) for sh in shapes)
            + "; one generator pass costs " + ", ".join(f"{x:.0%}" for x in shares)
            + " of its stage's forward matmul, stage by stage)")
    return {"context": ctx, "hidden": hid, "kind": kind, "shapes": shapes,
            "pass_share_of_layer_matmul": shares, "text": text}


def default_target(results: dict, metric: str):
    bp = results.get("backprop") or next(iter(results.values()), None)
    if not bp or bp.get("final_metric") is None:
        return None
    v = bp["final_metric"]
    return (metric, round(v * 1.1 if metric == "loss" else v * 0.9, 4))


def machine_info(cores: int) -> dict:
    import numpy as np
    info = report.machine()
    import zmq
    info.update({"cores": cores, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()})
    try:
        import msgpack
        info["msgpack"] = ".".join(map(str, msgpack.version))
    except ImportError:  # pragma: no cover
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:   # older numpy: no dict form
        info["blas"] = None
    info["blas_threads"] = {"pipeline_stage": 1, "coordinator": 1, "reference": 1,
                            "reference_all_cores": cores}
    return info
