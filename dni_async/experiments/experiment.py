"""Experiments: the results table, sweeps, gradient fidelity, and the seed post's own DNI run.

    dni-async experiment launch/experiments/table1.toml     # the table; writes docs/results.md
    dni-async experiment launch/experiments/in-flight.toml  # one setting swept, a table printed
    dni-async experiment launch/experiments/fidelity.toml   # synthetic vs true gradients, a picture
    dni-async experiment seed-post-dni                      # the 2017 post's DNI script, as it ran

(`python -m dni_async.experiments.experiment ...` is the same command.) An experiment file is TOML:

    kind = "table"                 # table | sweep | fidelity
    title = "..."
    output = "docs/results.md"     # table: the Markdown it writes (--out overrides)
    images = "docs/img/results-x"  # stem of the pictures it draws (optional; needs matplotlib)
    runner = "pipeline"            # pipeline: one OS process per layer (launch.train); or reference
    modes = ["backprop", "dni", "cdni"]
    seeds = [1, 2, 3]
    layers = [3, 4, 5, 6]          # table: weight layers = stages = processes; hidden = layers - 1
    width = 128                    # table: every hidden layer's width
    frozen_control = true          # table: add the hidden-layers-never-trained column
    notes = "..."                  # table: Markdown printed under the table (multi-line is fine)
    every = 2                      # fidelity: measure every 2nd batch
    vary = "max_in_flight"         # sweep: the setting swept ...
    values = [1, 4, 16, 64]        # ... and its values
    [settings]                     # every run's settings (any key of dni_async/config.py)
    [dataset.NAME]                 # table: per-dataset settings, in table order
    [mode.NAME]                    # per-mode settings (e.g. generator_lr for dni, cdni)

The table follows the spirit of Table 1 of Jaderberg et al. 2017, "Decoupled Neural Interfaces
using Synthetic Gradients" (ICML), which compared backprop, DNI and cDNI on fully connected
networks of 3 to 6 layers: here every run is a real pipeline, one process per layer, with a
fixed budget of epochs for every mode, and each cell is the mean and sample standard
deviation over seeds (the seed sets the initial weights; the data split is fixed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np

from dni_async import report
from dni_async.oneprocess import seed_post
from dni_async.config import MODES, ArgumentParser, ConfigError, make_config, read_toml

EXIT_BAD_INPUT = 2
KINDS = ("table", "sweep", "fidelity")
RUNNERS = ("pipeline", "reference")
FROZEN_LR = 1e-30   # a generator this slow never leaves zero: hidden layers never change


class ExperimentFailed(RuntimeError):
    """A run of the experiment did not finish."""


# -- experiment files ------------------------------------------------------------------------

def load_spec(path: str) -> dict:
    """Read and check an experiment file; every problem is one ConfigError line."""
    spec = read_toml(path, "experiment")
    spec.setdefault("kind", "table")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    spec.setdefault("title", spec["name"])
    spec.setdefault("runner", "pipeline")
    spec.setdefault("seeds", [1])
    spec.setdefault("settings", {})
    spec.setdefault("mode", {})
    spec["path"] = path
    known = {"kind", "name", "title", "output", "images", "runner", "modes", "seeds", "layers",
             "width", "vary", "values", "settings", "dataset", "mode", "path", "notes",
             "frozen_control", "every"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"experiment {path}: unknown key(s) {', '.join(unknown)}")
    if spec["kind"] not in KINDS:
        raise ConfigError(f"experiment {path}: kind must be one of {', '.join(KINDS)}")
    if spec["runner"] not in RUNNERS:
        raise ConfigError(f"experiment {path}: runner must be pipeline or reference")
    modes = spec.setdefault("modes", list(MODES) if spec["kind"] != "fidelity" else ["dni", "cdni"])
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"experiment {path}: unknown mode(s) {bad} (choose from {', '.join(MODES)})")
    if not spec["seeds"] or not all(isinstance(s, int) for s in spec["seeds"]):
        raise ConfigError(f"experiment {path}: seeds must be a list of integers")
    if spec["kind"] == "table":
        spec.setdefault("dataset", {})
        if not spec["dataset"]:
            raise ConfigError(f"experiment {path}: a table needs at least one [dataset.NAME]")
        layers = spec.setdefault("layers", [3])
        if not layers or not all(isinstance(n, int) and n >= 2 for n in layers):
            raise ConfigError(f"experiment {path}: layers must be integers >= 2 (stages)")
        if not isinstance(spec.setdefault("width", 128), int) or spec["width"] < 1:
            raise ConfigError(f"experiment {path}: width must be a positive integer")
    if spec["kind"] == "sweep":
        if "vary" not in spec or not spec.get("values"):
            raise ConfigError(f"experiment {path}: a sweep needs vary = \"KEY\" and values = [...]")
    if spec["kind"] == "fidelity":
        bad = [m for m in modes if m not in ("dni", "cdni")]
        if bad:
            raise ConfigError(f"experiment {path}: fidelity compares synthetic gradients: "
                              f"modes dni and cdni only, not {bad}")
    # every run's settings must make a valid config before anything starts
    for cfg_values, _ in plan(spec):
        make_config(cfg_values)
    return spec


def plan(spec: dict) -> list:
    """Every run of the experiment: (settings, labels), in the order they run."""
    runs = []
    base = dict(spec["settings"])
    if spec["kind"] == "table":
        for ds_name, ds_settings in spec["dataset"].items():
            for layers in spec["layers"]:
                for seed in spec["seeds"]:
                    for mode in spec["modes"]:   # modes interleaved: load drifts hit all alike
                        values = {**base, "dataset": ds_name, **ds_settings,
                                  **spec["mode"].get(mode, {}), "mode": mode, "seed": seed,
                                  "hidden": [spec["width"]] * (layers - 1)}
                        runs.append((values, {"dataset": ds_name, "layers": layers,
                                              "mode": mode, "seed": seed}))
    elif spec["kind"] == "sweep":
        for value in spec["values"]:
            for seed in spec["seeds"]:
                for mode in spec["modes"]:
                    values = {**base, **spec["mode"].get(mode, {}), "mode": mode, "seed": seed,
                              spec["vary"]: value}
                    runs.append((values, {spec["vary"]: value, "mode": mode, "seed": seed}))
    else:
        for seed in spec["seeds"]:
            for mode in spec["modes"]:
                values = {**base, **spec["mode"].get(mode, {}), "mode": mode, "seed": seed}
                runs.append((values, {"mode": mode, "seed": seed}))
    return runs


# -- one run ---------------------------------------------------------------------------------

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
    path = os.path.join(run_dir, "summary.json")
    if rc != 0 or not os.path.exists(path):
        raise ExperimentFailed(f"run in {run_dir} failed (exit status {rc})")
    with open(path) as fh:
        return json.load(fh)


def frozen_control(values: dict) -> dict:
    """The same network with its hidden layers never trained: only the last layer learns.

    A dni run whose generators have a learning rate of 1e-30 predicts a synthetic gradient of
    exactly zero forever, so no hidden layer ever moves. Its last layer sees the same inputs in
    the same order wherever it runs, so the single-process reference gives the pipeline's
    numbers exactly. A synthetic gradient is worth something only if it beats this.
    """
    from dni_async.oneprocess import reference
    cfg = make_config({**values, "mode": "dni", "generator_lr": FROZEN_LR})
    return reference.train(cfg, log=None)


def _write_json(path: str, obj) -> None:
    from dni_async import report
    report.write_json(path, obj)


def _held_out(summary: dict) -> float:
    return summary["final"]["test_bit_acc"]


# -- table -----------------------------------------------------------------------------------

def mean_sd(xs) -> tuple:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_table(spec: dict, runs_dir: str, log=print) -> dict:
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
               "history": [(h["epoch"], h["seconds"], h["test_bit_acc"]) for h in s["history"]
                           if h["test_bit_acc"] is not None]}
        results.append(row)
        if log:
            log(f"[{i + 1}/{len(todo)}] {labels['dataset']} {labels['layers']} layers "
                f"{labels['mode']:<8} seed {labels['seed']}: held-out {row['held_out']:.4f}  "
                f"train {row['train_acc']:.4f}  {row['wall_seconds']:.1f} s "
                f"({outer:.1f} s with start-up)", flush=True)
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
                                      "n": len(rs)}
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
            text = _pm(r["modes"][m]["acc"])
            cells.append(f"**{text}**" if r["modes"][m]["acc"][0] == best else text)
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
    out = [f"# {spec['title']}", "",
           f"Made by `{command}` on {res.get('date') or time.strftime('%Y-%m-%d')} ({mach}): "
           f"{n_runs} runs of "
           f"{runner}, {minutes:.1f} minutes in all. Run it again to reproduce this file; "
           "accuracies agree within the spread shown, timings depend on the machine and on "
           "what else it runs.", ""]
    out += ["Held-out accuracy after the same number of epochs for every mode (mean ± sample "
            f"standard deviation over seeds {', '.join(map(str, spec['seeds']))}; the best mean "
            "of a row in bold), and the pipeline's wall-clock seconds per run (the coordinator's, "
            "from handshake to final evaluation; process start-up excluded). `layers` counts "
            "weight layers, so a 3-layer network has 2 hidden layers and runs as 3 stage "
            "processes.", "", table_markdown(spec, rows), ""]
    if any(r["frozen"] for r in rows):
        out += ["*hidden frozen*: the control in which no hidden layer ever learns and only the "
                "last layer trains (a dni run whose generators stay at zero, run in the "
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
    plt = _plt()
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
    _save(fig, path)
    return {"held-out accuracy against depth": path}


MODE_COLORS = {"backprop": "#1f77b4", "gpipe": "#9467bd", "dni": "#2ca02c", "cdni": "#d62728"}


def _plt():
    try:
        import matplotlib
    except ImportError:
        print("experiment: matplotlib is not installed, so no pictures "
              "(pip install 'dni-async[plot]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)


# -- sweep -----------------------------------------------------------------------------------

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
               "finite": bool(np.isfinite(s["final"]["train_loss"]))}
        rows.append(row)
        if log:
            log(f"{key} = {labels[key]} {labels['mode']} seed {labels['seed']}: held-out "
                f"{row['held_out']:.4f}  train {row['train_acc']:.4f}  "
                f"{row['samples_per_s']:,.0f} samples/s  {row['wall_seconds']:.1f} s", flush=True)
    return rows


def sweep_markdown(spec: dict, rows: list) -> str:
    key = spec["vary"]
    lines = [f"| {key} | mode | held-out acc | train acc | samples/s | wall s |",
             "|---|---|---|---|---|---|"]
    for value in spec["values"]:
        for mode in spec["modes"]:
            rs = [r for r in rows if r[key] == value and r["mode"] == mode]
            lines.append(f"| {value} | {mode} | {_pm(mean_sd([r['held_out'] for r in rs]))} | "
                         f"{_pm(mean_sd([r['train_acc'] for r in rs]))} | "
                         f"{mean_sd([r['samples_per_s'] for r in rs])[0]:,.0f} | "
                         f"{mean_sd([r['wall_seconds'] for r in rs])[0]:.1f} |")
    return "\n".join(lines)


# -- gradient fidelity -----------------------------------------------------------------------

def train_with_fidelity(cfg, every: int = 1, log=None) -> dict:
    """The reference trainer with its gradient-fidelity measurement on (`fidelity_every`).

    Training is exactly `reference.train`'s (the same weights, bit for bit); beside it, every
    `every` steps each stage's synthetic gradient, and the bootstrapped target its generator
    learns from, are compared with the true dL/dh carried back from the loss.
    """
    from dni_async.oneprocess import reference
    if not cfg.decoupled:
        raise ConfigError("gradient fidelity compares synthetic gradients: mode dni or cdni")
    cfg.fidelity_every = every
    s = reference.train(cfg, log=None)
    bpe = cfg.batches_per_epoch()
    epochs = [{"epoch": h["epoch"], "train_acc": h["train_bit_acc"], "test_acc": h["test_bit_acc"],
               "loss": h["loss"]} for h in s["history"]]
    if log:
        for h in s["history"]:
            log(f"{cfg.mode} epoch {h['epoch'] + 1}/{cfg.epochs}: train acc "
                f"{h['train_bit_acc']:.4f} held-out {h['test_bit_acc']:.4f}  cos(synthetic, true) "
                "per stage " + " ".join(f"{c:+.3f}" for c in h.get("fidelity_cos", [])), flush=True)
    return {"config": s["config"], "rows": [{**r, "epoch": r["step"] / bpe} for r in s["fidelity"]],
            "epochs": epochs, "weights_sha256": s["weights_sha256"]}


def fidelity_by_epoch(result: dict) -> dict:
    """Per epoch and stage: mean cos, rel and target cos of the measured steps."""
    out = {}
    for key in ("cos", "rel", "target_cos"):
        by = {}
        for r in result["rows"]:
            by.setdefault(int(r["epoch"]), []).append(r[key])
        out[key] = {e: np.mean(v, axis=0).tolist() for e, v in sorted(by.items())}
    return out


def plot_fidelity(results: list, path: str, title: str) -> str | None:
    """Cosine and relative error of the synthetic gradient per stage over training."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 6.2), squeeze=False,
                             sharex=True)
    for j, res in enumerate(results):
        mode = res["config"]["mode"]
        rows = res["rows"]
        n = len(rows[0]["cos"])
        xs = np.array([r["epoch"] for r in rows])
        span = max(1, len(rows) // 60)   # smooth over about 1/60 of the run
        cmap = plt.get_cmap("viridis")
        for k in range(n):
            color = cmap(k / max(1, n - 1))
            cos = _smooth([r["cos"][k] for r in rows], span)
            rel = _smooth([r["rel"][k] for r in rows], span)
            axes[0][j].plot(xs, cos, color=color, label=f"stage {k}")
            axes[1][j].plot(xs, rel, color=color, label=f"stage {k}")
        axes[0][j].set_title(f"{mode}: synthetic vs true dL/dh", fontsize=10)
        axes[0][j].set_ylabel("cosine similarity")
        axes[0][j].set_ylim(-0.2, 1.0)
        axes[0][j].axhline(0, color="#999999", lw=0.8)
        axes[1][j].set_ylabel("relative error ||g_hat - g|| / ||g||")
        axes[1][j].set_ylim(0, 2.0)
        axes[1][j].axhline(1, color="#999999", lw=0.8)
        axes[1][j].set_xlabel("epoch")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return path


def _smooth(values, span: int):
    v = np.asarray(values, dtype=float)
    if span <= 1:
        return v
    kernel = np.ones(span) / span
    padded = np.concatenate([np.full(span - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


def fidelity_markdown(results: list) -> str:
    n = len(results[0]["rows"][0]["cos"])
    head = ["mode", "epoch"] + [f"stage {k} cos" for k in range(n)] + \
           [f"stage {k} rel err" for k in range(n)] + ["held-out acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        fe = fidelity_by_epoch(res)
        last = max(fe["cos"])
        marks = sorted({0, last // 2, last})
        for e in marks:
            cells = [res["config"]["mode"], str(e + 1)]
            cells += [f"{c:+.3f}" for c in fe["cos"][e]] + [f"{r:.3f}" for r in fe["rel"][e]]
            cells.append(f"{res['epochs'][e]['test_acc']:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="dni-async experiment",
        description="Run an experiment file (table, sweep, fidelity) or the seed post's DNI run.")
    p.add_argument("what", help="an experiment TOML file, or seed-post-dni")
    p.add_argument("--out", help="table: Markdown to write (default: the file's output)")
    p.add_argument("--images", help="stem of the pictures (default: the file's images)")
    p.add_argument("--runs-dir", help="folder for the run folders "
                                      "(default runs/experiment-NAME-TIME)")
    p.add_argument("--json", metavar="PATH", help="also write every number here")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--render", metavar="EXPERIMENT_JSON",
                   help="table: write the Markdown and pictures again from a finished run's "
                        "experiment.json (after editing the file's title or notes), no training")
    p.add_argument("--epochs", type=int, help="seed-post-dni: epochs (default 1000)")
    p.add_argument("--every", type=int, default=100,
                   help="seed-post-dni: epochs between printed lines (default 100)")
    p.add_argument("--no-stop", action="store_true",
                   help="seed-post-dni: keep going after the post's loop would have stopped")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(build_parser().parse_args(argv))
    except ConfigError as exc:
        print(f"dni-async experiment: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ExperimentFailed as exc:
        print(f"dni-async experiment: failed: {exc}", file=sys.stderr)
        return 1


def _main(args) -> int:
    log = None if args.quiet else print
    if args.what == "seed-post-dni":
        if args.epochs is not None and args.epochs < 1 or args.every < 1:
            raise ConfigError("--epochs and --every must be positive")
        seed_post.seed_post_dni(args.epochs or 1000, every=args.every, log=print,
                      stop_early=not args.no_stop)
        return 0
    spec = load_spec(args.what)
    runs = plan(spec)
    if args.dry_run:
        for values, labels in runs:
            print(" ".join(f"{k}={v}" for k, v in labels.items()))
        print(f"{len(runs)} runs ({spec['runner']})")
        return 0
    if args.render and spec["kind"] != "table":
        raise ConfigError("--render redraws a table experiment only")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = os.path.abspath(args.runs_dir or (os.path.dirname(os.path.abspath(args.render))
                                                 if args.render else os.path.join(
        "runs", f"experiment-{spec['name']}-{stamp}")))
    os.makedirs(runs_dir, exist_ok=True)
    images = args.images or spec.get("images")
    extra = [f"--out {shlex.quote(args.out)}"] if args.out else []
    command = command_line(spec, extra)
    if spec["kind"] == "table":
        out = args.out or spec.get("output")
        if out:
            report.ensure_writable(out)
        if args.render:
            res = _load_results(args.render)
        else:
            res = run_table(spec, runs_dir, log=log)
        pics = plot_table(spec, res, images) if images else {}
        text = results_markdown({**spec, "output": out}, res, command, pics)
        if out:
            with open(out, "w") as fh:
                fh.write(text)
        print(table_markdown(spec, table_cells(spec, res)))
        print(f"\n{len(res['runs'])} runs in {res['total_seconds'] / 60:.1f} minutes; "
              f"run folders in {runs_dir}" + (f"; wrote {out}" if out else ""))
        dump = {"spec": _plain(spec), "results": res, "rows": table_cells(spec, res)}
    elif spec["kind"] == "sweep":
        rows = run_sweep(spec, runs_dir, log=log)
        print(sweep_markdown(spec, rows))
        dump = {"spec": _plain(spec), "rows": rows}
    else:
        results = []
        for values, labels in runs:
            cfg = make_config(values)
            results.append(train_with_fidelity(cfg, every=int(spec.get("every", 1)), log=log))
        print(fidelity_markdown(results))
        if images:
            path = plot_fidelity(results, f"{images}.png", spec["title"])
            if path:
                print(f"picture: {path}")
        dump = {"spec": _plain(spec), "results": results}
    _write_json(os.path.join(runs_dir, "experiment.json"), dump)
    if args.json:
        _write_json(args.json, dump)
    return 0


def _load_results(path: str) -> dict:
    try:
        with open(path) as fh:
            res = json.load(fh)["results"]
        res["runs"], res["frozen"], res["total_seconds"]   # the keys a table needs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the results of a table run from {path}: {exc}") from None
    return res


def _plain(spec: dict) -> dict:
    return json.loads(json.dumps(spec, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
