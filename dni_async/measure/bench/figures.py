"""From runs to figures: steady-state samples/s, time to a target, each mode's row of the
table, the generator's size, the machine."""

from __future__ import annotations

import statistics

from dni_async import nn, progress, report
from dni_async.config import Config, ConfigError
from dni_async.nn.modes import BASELINE
from dni_async.progress import Target
from dni_async.measure.bounds import bounds, busy_clock, per_batch_busy, per_batch_parts
from dni_async.nn.modes import mode_of


def steady_rate(history: list, warmup: int, samples_per_epoch: int | None = None) -> float:
    """Samples/s over the epochs after the warm-up (all epochs if there are no others). Each
    row's samples come from its own rate and seconds, so a last epoch cut short counts right."""
    if not history:
        return 0.0
    w = warmup if len(history) > warmup else 0
    t_prev = history[w - 1]["seconds"] if w else 0.0
    samples, seconds = 0.0, history[-1]["seconds"] - t_prev
    for row in history[w:]:
        samples += (row["samples_per_s"] or 0.0) * (row["seconds"] - t_prev)   # None: resumed
        t_prev = row["seconds"]
    return samples / seconds if seconds > 0 else 0.0


def curve_of(summary: dict) -> list:
    """The run's held-out points: its curve, or (older runs) its epoch rows."""
    if summary.get("curve"):
        return summary["curve"]
    return [h for h in summary.get("history", []) if h.get("test_bit_acc") is not None]


def time_to(summary_or_curve, target: Target | None) -> float | None:
    """Training seconds until the held-out curve first reaches the target (None: never)."""
    curve = summary_or_curve if isinstance(summary_or_curve, list) else curve_of(summary_or_curve)
    return progress.time_to(curve, target)


def final_metric(summary: dict, name: str):
    """The metric of the final weights: the curve's last point (the final evaluation)."""
    curve = curve_of(summary)
    if curve and curve[-1].get(name) is not None:
        return curve[-1][name]
    f = summary.get("final", {})
    return f.get("train_loss") if name == "loss" else f.get(name)


def start_metric(cfg: Config, metric: str) -> float:
    """The held-out metric of the untrained network: where every mode starts."""
    from dni_async.nn import metrics, network
    from dni_async.oneprocess import reference
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    return metrics.summarize(reference.evaluate(models, cfg, ds.x_test, ds.y_test), "test")[metric]


MARGIN = 0.02   # a target must clear chance and the start by this much


def check_target(target: Target, chance: float | None, start: float) -> None:
    """A target below chance or below where training starts is reached at once and says
    nothing: refuse it with the numbers."""
    if target.metric.endswith("loss"):
        if target.value >= start - MARGIN * abs(start):
            raise ConfigError(f"target {target}: the untrained network's {target.metric} is "
                              f"already {start:.4f}; choose a lower one")
        return
    floor = max(chance or 0.0, start)
    if target.value < floor + MARGIN:
        raise ConfigError(f"target {target} is not above chance ({chance:.4f}) and where "
                          f"training starts ({start:.4f}) by {MARGIN}: choose at least "
                          f"{floor + MARGIN:.3f}")


def default_target(results: dict, metric: str, chance: float | None, start: float):
    """Without a target: 90% of the way from the start to lockstep backprop's final value,
    if that clears chance and the start; else None."""
    bp = results.get(BASELINE) or next(iter(results.values()), None)
    if not bp or bp.get("final_metric") is None:
        return None
    t = Target(metric, round(start + 0.9 * (bp["final_metric"] - start), 4))
    try:
        check_target(t, chance, start)
    except ConfigError:
        return None
    return t


def verdict(results: dict, refs: dict, target: Target | None) -> str:
    """One line: does decoupling pay, by time to the target?"""
    if target is None:
        return "no target above chance and the start was reached by lockstep backprop: no verdict"
    bp = results.get(BASELINE, {}).get("time_to_target_s")
    parts = []
    for m in ("cdni", "dni", "gpipe"):
        if m not in results:
            continue
        t = results[m].get("time_to_target_s")
        if t is None:
            parts.append(f"{m} does not reach {target}, lockstep backprop "
                         + ("does not either" if bp is None else f"does in {bp:.1f} s"))
        elif bp is None:
            parts.append(f"{m} reaches {target} in {t:.1f} s, lockstep backprop never does")
        else:
            word = "pays" if bp > t else "does not pay"
            parts.append(f"{m} reaches {target} in {t:.1f} s, lockstep backprop in {bp:.1f} s: "
                         f"decoupling {word} {bp / t:.2f}x" if m != "gpipe" else
                         f"gpipe in {t:.1f} s ({bp / t:.2f}x)")
        break
    if not parts:
        parts.append(f"lockstep backprop reaches {target} in "
                     + ("never" if bp is None else f"{bp:.1f} s"))
    ref = refs.get("reference_all_cores", {}).get("time_to_target_s")
    if "reference_all_cores" in refs:
        parts.append("one process with all cores: "
                     + ("does not reach it" if ref is None else f"{ref:.1f} s"))
    return "; ".join(parts)


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
        "time_to_target_s": _median([time_to(r, target) for r in runs]),
        "reached_target": sum(time_to(r, target) is not None for r in runs),
        "curve": curve_of(runs[_median_index(rates)]),
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
    if any(mode_of(cfg).has_generator(k, cfg.n_stages, cfg.true_boundaries)
           for k in range(cfg.n_stages - 1)):
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
            "time_to_target_s": time_to(s, target), "curve": curve_of(s),
            "final_metric": final_metric(s, metric), "final": s["final"],
            "history": s["history"], "weights_sha256": s["weights_sha256"]}


def generator_info(cfg: Config) -> dict:
    """Which synthetic-gradient generator the decoupled stages use, and its size against the
    layer: multiply-adds per row of one generator pass / those of the layer's forward matmul."""
    ctx, hid, widths = cfg.generator_context(), cfg.generator_hidden, cfg.widths
    per_label = cfg.generator_maps_per_label()
    shapes, shares = [], []
    for k in range(cfg.n_stages - 1):
        out = widths[k + 1]
        c = nn.context_dim(ctx, out, cfg.output_dim)
        shapes.append([c, hid, out] if hid else [c, out])
        adds = (c * hid + hid * out if hid else c * out) + (out * out if per_label else 0)
        shares.append(adds / (widths[k] * out))
    seen = {"h": "the layer's output h", "y": "the labels y only", "hy": "[h, y]"}[ctx]
    kind = f"generator with a {hid}-unit relu bottleneck" if hid else "linear generator"
    if per_label:
        kind += " and one map of h per label (its pass counted for one label a row)"
    text = (f"{kind} on {seen} (context '{ctx}'; "
            + ", ".join("->".join(map(str, sh)) for sh in shapes)
            + "; one generator pass costs " + ", ".join(f"{x:.0%}" for x in shares)
            + " of its stage's forward matmul, stage by stage)")
    return {"context": ctx, "hidden": hid, "per_label": per_label, "kind": kind, "shapes": shapes,
            "pass_share_of_layer_matmul": shares, "text": text}


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
