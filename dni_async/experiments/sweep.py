"""A sweep: one setting varied, every mode, a table of held-out accuracy and speed."""

from __future__ import annotations

import os

import numpy as np

from dni_async.experiments.runs import _held_out, run_one
from dni_async.experiments.spec import plan
from dni_async.experiments.table import _pm, mean_sd
from dni_async.measure.plots import MODE_COLORS, pyplot, save


def run_sweep(spec: dict, runs_dir: str, log=print) -> list:
    rows = []
    for values, labels in plan(spec):
        key = spec["vary"]
        name = f"{key}-{labels[key]}-{labels['mode']}-{labels['seed']}"
        s = run_one(values, spec["runner"], os.path.join(runs_dir, name))
        counters = [st.get("counters", {}) for st in s.get("stages", [])] or s.get("generators", [])
        row = {**labels, "held_out": _held_out(s), "train_acc": s["final"]["train_bit_acc"],
               "samples_per_s": s["samples_per_s"], "wall_seconds": s["wall_seconds"],
               "targets_dropped": sum(c.get("targets_dropped", 0) for c in counters),
               "targets_applied": sum(c.get("targets_applied", 0) for c in counters),
               "target_lag": (sum(c.get("target_lag_sum", 0) for c in counters)
                              / max(1, sum(c.get("targets_applied", 0) for c in counters))),
               "target_lag_max": max([c.get("target_lag_max", 0) for c in counters] or [0]),
               "finite": bool(np.isfinite(s["final"]["train_loss"]))}
        rows.append(row)
        if log:
            log(f"{key} = {labels[key]} {labels['mode']} seed {labels['seed']}: held-out "
                f"{row['held_out']:.4f}  train {row['train_acc']:.4f}  "
                f"target lag {row['target_lag']:.2f}  "
                f"{row['samples_per_s']:,.0f} samples/s  {row['wall_seconds']:.1f} s", flush=True)
    return rows


def sweep_markdown(spec: dict, rows: list) -> str:
    key = spec["vary"]
    lines = [f"| {key} | mode | held-out acc | train acc | mean target lag (max) | samples/s "
             "| wall s |", "|---|---|---|---|---|---|---|"]
    for value in spec["values"]:
        for mode in spec["modes"]:
            rs = [r for r in rows if r[key] == value and r["mode"] == mode]
            lines.append(f"| {value} | {mode} | {_pm(mean_sd([r['held_out'] for r in rs]))} | "
                         f"{_pm(mean_sd([r['train_acc'] for r in rs]))} | "
                         f"{mean_sd([r.get('target_lag', 0) for r in rs])[0]:.2f} "
                         f"({max(r.get('target_lag_max', 0) for r in rs)}) | "
                         f"{mean_sd([r['samples_per_s'] for r in rs])[0]:,.0f} | "
                         f"{mean_sd([r['wall_seconds'] for r in rs])[0]:.1f} |")
    return "\n".join(lines)


def plot_lag(spec: dict, rows: list, path: str) -> str | None:
    """Held-out accuracy against the measured mean target lag, one point per run."""
    plt = pyplot("experiment")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in spec["modes"]:
        rs = [r for r in rows if r["mode"] == mode]
        ax.scatter([r["target_lag"] for r in rs], [r["held_out"] for r in rs], s=22,
                   color=MODE_COLORS.get(mode), label=mode)
        for r in rs:
            ax.annotate(str(r[spec["vary"]]), (r["target_lag"], r["held_out"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color="0.35")
    ax.set_xlabel("mean target lag (the stage's own updates before its target arrived)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{spec['title']} (labels: {spec['vary']})", loc="left", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)
