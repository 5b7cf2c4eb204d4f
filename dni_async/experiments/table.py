"""The results table: every mode at every depth and seed, its Markdown and its picture."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import time

import numpy as np

from dni_async.experiments.runs import _held_out, frozen_control, run_one
from dni_async.experiments.spec import plan
from dni_async.measure.plots import MODE_COLORS, pyplot, save


def mean_sd(xs) -> tuple:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_table(spec: dict, runs_dir: str, log=print, on_run=None) -> dict:
    """Every run of a table; returns {"runs": [...], "cells": ...} with what the table shows."""
    todo = plan(spec)
    results = []
    t_all = time.perf_counter()
    for i, (values, labels) in enumerate(todo):
        name = "-".join(str(labels[k]) for k in ("dataset", "layers", "mode", "seed"))
        t0 = time.perf_counter()
        s = run_one(values, spec["runner"], os.path.join(runs_dir, name))
        outer = time.perf_counter() - t0
        row = {**labels, "held_out": _held_out(s), "train_acc": s["final"]["train_bit_acc"],
               "wall_seconds": s["wall_seconds"], "train_seconds": s["train_seconds"],
               "outer_seconds": outer, "samples_per_s": s["samples_per_s"],
               "diverged": bool(s.get("diverged")),
               "history": [(h["epoch"], h["seconds"], h["test_bit_acc"]) for h in s["history"]
                           if h["test_bit_acc"] is not None]}
        results.append(row)
        if log:
            log(f"[{i + 1}/{len(todo)}] {labels['dataset']} {labels['layers']} layers "
                f"{labels['mode']:<8} seed {labels['seed']}: held-out {row['held_out']:.4f}  "
                f"train {row['train_acc']:.4f}  {row['wall_seconds']:.1f} s "
                f"({outer:.1f} s with start-up)", flush=True)
        if on_run:
            on_run(i + 1)
    frozen = []
    if spec.get("frozen_control"):
        seen = set()
        for values, labels in todo:
            key = (labels["dataset"], labels["layers"], labels["seed"])
            if key in seen:
                continue
            seen.add(key)
            s = frozen_control(values)
            frozen.append({"dataset": key[0], "layers": key[1], "seed": key[2],
                           "held_out": _held_out(s)})
        if log:
            log(f"frozen-hidden-layer control: {len(frozen)} reference runs", flush=True)
    return {"runs": results, "frozen": frozen, "date": time.strftime("%Y-%m-%d"),
            "total_seconds": time.perf_counter() - t_all}


def table_cells(spec: dict, res: dict) -> list:
    """One row per (dataset, layers): per mode mean/sd of held-out accuracy and of wall time."""
    rows = []
    for ds_name in spec["dataset"]:
        for layers in spec["layers"]:
            row = {"dataset": ds_name, "layers": layers, "modes": {}}
            for mode in spec["modes"]:
                rs = [r for r in res["runs"] if r["dataset"] == ds_name
                      and r["layers"] == layers and r["mode"] == mode]
                row["modes"][mode] = {"acc": mean_sd([r["held_out"] for r in rs]),
                                      "wall": mean_sd([r["wall_seconds"] for r in rs]),
                                      "n": len(rs),
                                      "diverged": sum(r.get("diverged", False) for r in rs)}
            fz = [r["held_out"] for r in res["frozen"] if r["dataset"] == ds_name
                  and r["layers"] == layers]
            row["frozen"] = mean_sd(fz) if fz else None
            rows.append(row)
    return rows


def _pm(m: tuple, digits: int = 3) -> str:
    mean, sd = m
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table_markdown(spec: dict, rows: list) -> str:
    modes = spec["modes"]
    frozen = any(r["frozen"] for r in rows)
    head = ["dataset", "layers", *[f"{m} held-out acc" for m in modes]]
    if frozen:
        head.append("hidden frozen")
    head += [f"{m} wall s" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], str(r["layers"])]
        best = max(r["modes"][m]["acc"][0] for m in modes)
        for m in modes:
            cell = r["modes"][m]
            text = _pm(cell["acc"])
            text = f"**{text}**" if cell["acc"][0] == best else text
            if cell.get("diverged"):    # the mean is over the runs that did not
                text += f" ({cell['diverged']} of {cell['n']} diverged)"
            cells.append(text)
        if frozen:
            cells.append(_pm(r["frozen"]) if r["frozen"] else "-")
        cells += [f"{r['modes'][m]['wall'][0]:.1f}" for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_markdown(spec: dict) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for k, v in spec["settings"].items():
        lines.append(f"| `{k}` | `{_toml(v)}` |")
    for ds_name, d in spec["dataset"].items():
        lines.append(f"| dataset `{ds_name}` | " + ", ".join(f"`{k} = {_toml(v)}`"
                                                         for k, v in d.items()) + " |")
    for mode, d in spec["mode"].items():
        if mode in spec["modes"] and d:
            lines.append(f"| mode `{mode}` | " + ", ".join(f"`{k} = {_toml(v)}`"
                                                         for k, v in d.items()) + " |")
    return "\n".join(lines)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def command_line(spec: dict, argv_extra=()) -> str:
    return " ".join(["dni-async experiment", shlex.quote(spec["path"]), *argv_extra])


def results_markdown(spec: dict, res: dict, command: str, images: dict) -> str:
    rows = table_cells(spec, res)
    n_runs = len(res["runs"])
    minutes = res["total_seconds"] / 60
    mach = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
           f"numpy {np.__version__}"
    runner = ("the real pipeline: a coordinator and one OS process per layer over ZeroMQ "
              "(`launch.train`, as `dni-async train` does)" if spec["runner"] == "pipeline"
              else "the single-process reference trainer")
    again = ("lockstep modes give the same accuracies again, decoupled ones vary with the order "
             "of events"
             if spec["runner"] == "pipeline" else "every accuracy comes out the same again")
    out = [f"# {spec['title']}", "",
           f"Made by `{command}` on {res.get('date') or time.strftime('%Y-%m-%d')} ({mach}): "
           f"{n_runs} runs of "
           f"{runner}, {minutes:.1f} minutes in all. Run it again to reproduce this file; "
           f"{again}, and timings depend on the machine and on what else it runs.", ""]
    out += ["Held-out accuracy after the same number of epochs for every mode (mean ± sample "
            f"standard deviation over seeds {', '.join(map(str, spec['seeds']))}; the best mean "
            "of a row in bold), and the pipeline's wall-clock seconds per run (the coordinator's, "
            "from handshake to final evaluation; process start-up excluded). `layers` counts "
            "weight layers, so a 3-layer network has 2 hidden layers and runs as 3 stage "
            "processes.", "", table_markdown(spec, rows), ""]
    if any(r["frozen"] for r in rows):
        out += ["*hidden frozen*: the control in which no hidden layer ever learns and only the "
                "last layer trains (`freeze_hidden`, backprop otherwise, run in the "
                "reference trainer, which gives the pipeline's numbers exactly in this case). "
                "A synthetic gradient helps only where its column beats this one.", ""]
    for kind, path in images.items():
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(spec.get("output") or ".")))
        out += [f"![{kind}]({rel})", ""]
    if spec.get("notes"):
        out += [spec["notes"].strip(), ""]
    out += ["## Settings", "", settings_markdown(spec), "",
            f"Layer widths: {spec['width']} units per hidden layer; modes "
            f"{', '.join(spec['modes'])}; layers {', '.join(map(str, spec['layers']))}; "
            f"seeds {', '.join(map(str, spec['seeds']))}.", "",
            "## Every run", "",
            "| dataset | layers | mode | seed | held-out acc | train acc | wall s | samples/s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        out.append(f"| {r['dataset']} | {r['layers']} | {r['mode']} | {r['seed']} | "
                   f"{r['held_out']:.4f} | {r['train_acc']:.4f} | {r['wall_seconds']:.1f} | "
                   f"{r['samples_per_s']:,.0f} |")
    out.append("")
    return "\n".join(out)


def plot_table(spec: dict, res: dict, stem: str) -> dict:
    """Held-out accuracy against depth, one panel per dataset, one line per mode."""
    plt = pyplot("experiment")
    if plt is None:
        return {}
    rows = table_cells(spec, res)
    datasets = list(spec["dataset"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, ds_name in zip(axes[0], datasets):
        rs = [r for r in rows if r["dataset"] == ds_name]
        xs = [r["layers"] for r in rs]
        for mode in spec["modes"]:
            m = [r["modes"][mode]["acc"] for r in rs]
            ax.errorbar(xs, [a for a, _ in m], yerr=[s for _, s in m], marker="o", capsize=3,
                        label=mode, color=MODE_COLORS.get(mode))
        if any(r["frozen"] for r in rs):
            m = [r["frozen"] for r in rs]
            ax.errorbar(xs, [a for a, _ in m], yerr=[s for _, s in m], marker="x", capsize=3,
                        linestyle=":", color="#7f7f7f", label="hidden frozen")
        ax.set_title(ds_name)
        ax.set_xlabel("layers (= stage processes)")
        ax.set_xticks(xs)
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(spec["title"], fontsize=10)
    fig.tight_layout()
    path = f"{stem}.png"
    save(fig, path)
    return {"held-out accuracy against depth": path}
