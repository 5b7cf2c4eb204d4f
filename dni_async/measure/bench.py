"""`dni-async bench`: every mode on the same layout, data and initial weights, side by side.

    dni-async bench --config launch/wide.toml --json out.json          # the compute-bound table
    dni-async bench --config launch/wide.toml --modes none --sweep width=64,256,1024,2048 \
        --json sweep.json                                              # both regimes
    dni-async bench --wire --json wire.json                            # the transport alone
    dni-async bench --config launch/bench-tiny.toml --repeats 1        # a smoke check

Method (docs/benchmarks.md):
- one run per mode and repeat, modes interleaved within a repeat so drifts in machine load hit
  every mode alike; every run builds the same weights from the same seed and data;
- samples/s in the steady state: training samples of the epochs after `--warmup` divided by
  their training seconds (evaluation is excluded), median over repeats;
- per stage, busy seconds per batch t_k = (forward + backward + generator + update) / batches;
  with P = os.cpu_count() cores a pipeline cannot beat 1 / max(max_k t_k, sum_k t_k / P)
  batches per second; efficiency = measured / that bound. Lockstep backprop has one batch in
  flight, and a stage's update runs beside the backward of the stages upstream of it; its own
  bound also counts its period were messages free (`bounds.lockstep_period`), reported too.
  The same bounds again with t_k timed alone: each stage's per-batch work, one stage at a time, in a fresh
  process with one BLAS thread (`alone` in the JSON);
- two rows without processes: the single-process reference (backprop) with one BLAS thread
  and with all cores, each in a fresh interpreter so the thread count is set before numpy loads;
- timelines (`--trace`, and the Gantt picture): per mode, a warm-up + 1 epoch run untraced and
  then the same run with every span recorded; the pair gives the tracing overhead.

A `[bench]` table in the config file can set repeats, warmup, target and modes; flags win.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

from dni_async.runtime import supervisor as launch
from dni_async import report
from dni_async.measure.bench_report import (describe_layout, fmt, modes_text, sweep_text, targets,
                                    targets_text)
from dni_async.measure.bounds import bounds, busy_clock, per_batch_busy, per_batch_parts
from dni_async.config import MODES, ArgumentParser, Config, ConfigError, load_toml, make_config

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EXIT_BAD_INPUT = 2
REFERENCE_TIMEOUT_S = 3600


class BenchFailed(RuntimeError):
    pass


# -- arguments ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="dni-async bench",
        description="Measure every mode side by side: throughput, bound, efficiency, "
                    "time to a target; optional trace, width sweep, transport benchmark, plots.")
    p.add_argument("--config", metavar="FILE", help="TOML run settings (default: the tiny preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run setting, e.g. --set epochs=3")
    p.add_argument("--modes", help="comma list of modes, or 'none' (default: "
                   f"{','.join(MODES)})")
    p.add_argument("--repeats", type=int, help="runs per mode; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, help="epochs left out of the steady state (default 1)")
    p.add_argument("--target", metavar="METRIC=VALUE",
                   help="time to reach this metric, e.g. test_bit_acc=0.9 "
                        "(default: 90%% of backprop's final value)")
    p.add_argument("--json", metavar="PATH", help="write every figure here; plots go beside it")
    p.add_argument("--trace", metavar="PATH",
                   help="per mode, one more short run (warm-up + 1 epoch) untraced and then "
                        "traced; the traced ones merged into a Chrome trace-event file "
                        "(Perfetto, chrome://tracing)")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="throughput across values of a setting, e.g. width=64,256,1024,2048 "
                        "(every hidden layer; narrower ones get up to 8x the training samples "
                        "so that each run lasts about as long)")
    p.add_argument("--sweep-modes", default="backprop,cdni", help="modes of the sweep "
                   "(default backprop,cdni)")
    p.add_argument("--sweep-epochs", type=int, default=2,
                   help="epochs per sweep run, warm-up included (default 2)")
    p.add_argument("--wire", action="store_true",
                   help="also measure the wire layer against raw pyzmq (alone if no run "
                        "settings or modes are given)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="the two single-process rows (default on)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write the pictures (needs matplotlib; default on)")
    p.add_argument("--run-dir", help="folder for the runs (default runs/bench-<time>)")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's stage-K.npz")
    p.add_argument("--quiet", action="store_true", help="print the tables only")
    return p


def _bench_table(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh).get("bench", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}   # load_toml reports those
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [bench] must be a table")
    unknown = set(table) - {"repeats", "warmup", "target", "modes", "wire"}
    if not isinstance(table.get("wire", False), bool):
        raise ConfigError(f"{path}: [bench] wire must be true or false")
    if unknown:
        raise ConfigError(f"{path}: unknown [bench] setting(s) {', '.join(sorted(unknown))}")
    return table


def _table_int(table: dict, key: str, default: int) -> int:
    v = table.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"[bench] {key} must be an integer, got {v!r}")
    return v


def parse_modes(text, allow_none=True) -> list:
    if isinstance(text, list):
        text = ",".join(map(str, text))
    text = str(text).strip()
    if allow_none and text.lower() in ("none", ""):
        return []
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(bad)} (choose from "
                          f"{', '.join(MODES)})")
    if len(set(modes)) != len(modes):
        raise ConfigError("--modes: a mode is listed twice")
    return modes


def parse_target(text: str | None):
    if text is None:
        return None
    if "=" not in str(text):
        raise ConfigError(f"--target wants METRIC=VALUE, got {text!r}")
    name, value = str(text).split("=", 1)
    name = name.strip()
    allowed = ("test_bit_acc", "test_exact_acc", "train_bit_acc", "train_exact_acc", "loss")
    if name not in allowed:
        raise ConfigError(f"--target: metric must be one of {', '.join(allowed)}, got {name!r}")
    try:
        return name, float(value)
    except ValueError:
        raise ConfigError(f"--target: cannot read {value!r} as a number") from None


def parse_sweep(text: str | None):
    if text is None:
        return None
    if "=" not in text:
        raise ConfigError(f"--sweep wants KEY=V1,V2,..., got {text!r}")
    key, values = text.split("=", 1)
    key = key.strip().replace("-", "_")
    allowed = ("width", "batch_size", "micro_batches", "max_in_flight", "generator_hidden")
    if key not in allowed:
        raise ConfigError(f"--sweep: key must be one of {', '.join(allowed)}, got {key!r}")
    try:
        vals = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sweep: values must be integers, got {values!r}") from None
    if not vals or any(v < (0 if key == "generator_hidden" else 1) for v in vals):
        raise ConfigError(f"--sweep: need positive integer values, got {values!r}")
    return key, vals


def base_values(args) -> dict:
    """The run settings: the config file (or the tiny preset), then --set."""
    values = load_toml(args.config) if args.config else {"preset": "tiny", "batch_size": 20}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        values[k.strip().replace("-", "_")] = v.strip()
    values.pop("mode", None)    # the bench sets the mode of every run
    return values


def mode_config(values: dict, mode: str, **extra) -> Config:
    try:
        return make_config({**values, **extra, "mode": mode})
    except ConfigError as exc:
        raise ConfigError(f"mode {mode}: {exc}") from None


def _run_child(cmd: list, blas_threads: int, timeout_s: float, what: str):
    """A child interpreter with its own BLAS threads, bounded in time; BenchFailed if it fails."""
    try:
        proc = subprocess.run(cmd, env=launch.child_env(blas_threads), capture_output=True,
                              text=True, timeout=timeout_s, preexec_fn=launch._die_with_parent)
    except subprocess.TimeoutExpired:
        raise BenchFailed(f"{what} took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchFailed(f"{what} failed: {tail}")
    return proc


# -- one run -----------------------------------------------------------------------------------

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


def _strip_weights(run_dir: str) -> None:
    for path in glob.glob(os.path.join(run_dir, "stage-*.npz")):
        os.unlink(path)


def run_pipeline(cfg: Config, run_dir: str, trace: bool = False, keep_weights: bool = False) -> dict:
    status = launch.train(cfg, run_dir=run_dir, quiet=True, trace=trace)
    if status != 0:
        raise BenchFailed(f"{cfg.mode} run in {run_dir} failed with status {status}")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    if not keep_weights:
        _strip_weights(run_dir)
    return summary


def _toml_value(v) -> str:
    return json.dumps(v)    # str, int, float, bool and lists of them read the same in TOML


def write_toml(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        for k, v in cfg.to_dict().items():
            fh.write(f"{k} = {_toml_value(v)}\n")


def run_reference(cfg: Config, folder: str, threads: int) -> dict:
    """The single-process reference in a fresh interpreter with `threads` BLAS threads."""
    os.makedirs(folder, exist_ok=True)
    toml_path = os.path.join(folder, "config.toml")
    out = os.path.join(folder, "summary.json")
    write_toml(cfg, toml_path)
    cmd = [sys.executable, "-m", "dni_async", "reference", "--config", toml_path,
           "--json", out, "--quiet"]
    _run_child(cmd, threads, REFERENCE_TIMEOUT_S, "the reference run")
    with open(out) as fh:
        summary = json.load(fh)
    summary["blas_threads"] = threads
    return summary


# -- the same work, timed alone ---------------------------------------------------------------

def calibrate_worker(cfg: Config, reps: int = 7) -> dict:
    """Time each stage's work for one batch in this process, one stage at a time.

    The stage code is the pipeline's own (StageModel, nn); inputs are a real batch carried
    forward through the stages, gradients are random arrays of the right shape. Run it in a
    process with one BLAS thread (see `calibrate`)."""
    import numpy as np
    from dni_async.nn import network
    from dni_async import nn
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    n, bs = cfg.n_stages, cfg.batch_size
    x, y = ds.x_train[:bs], ds.y_train[:bs]
    hs = [x]
    for m in models:
        hs.append(m.forward(hs[-1]))
    grads = [(np.random.RandomState(k).randn(*hs[k + 1].shape) * 1e-3).astype(hs[k + 1].dtype)
             for k in range(n)]
    wall, cpu, parts = [], [], []
    for k, m in enumerate(models):
        xk, gk, last, need = hs[k], grads[k], k == n - 1, k > 0
        step = [0]
        split = []     # backprop: wall seconds of forward, backward, update, as a stage times them

        def work():
            step[0] += 1
            if cfg.mode == "gpipe":
                acc = None
                parts = cfg.micro_batches
                for xm, ym, gm in zip(np.array_split(xk, parts), np.array_split(y, parts),
                                      np.array_split(gk, parts)):
                    h = m.forward(xm)
                    d = (nn.output_delta(cfg.loss, m.layer.activation, h, ym) if last
                         else m.layer.delta(h, gm))
                    if need:
                        m.layer.grad_input(d)
                    gW, gb = m.layer.gradients(xm, d)
                    acc = [gW, gb] if acc is None else [acc[0] + gW,
                                                        None if gb is None else acc[1] + gb]
                m.layer.apply(acc[0], acc[1], m.lr)
            elif cfg.decoupled and not last:
                c = m.forward_train(xk)
                m.synthetic_update(step[0], c, y, need_grad_input=need)
                m.apply_target(step[0], gk)
            else:                              # backprop in the three parts a stage times
                t1 = time.perf_counter()
                c = m.forward_train(xk)
                t2 = time.perf_counter()
                delta, _ = (m.loss_delta(c, y, need_grad_input=need) if last
                            else m.true_delta(c, gk, need_grad_input=need))
                t3 = time.perf_counter()
                m.apply(c, delta)
                split.append((t2 - t1, t3 - t2, time.perf_counter() - t3))

        ws, cs = [], []
        for i in range(reps + 2):          # two warm-up repetitions
            t0, c0 = time.perf_counter(), time.thread_time()
            work()
            if i >= 2:
                ws.append(time.perf_counter() - t0)
                cs.append(time.thread_time() - c0)
        wall.append(statistics.median(ws))
        cpu.append(statistics.median(cs))
        parts.append([1000 * statistics.median(p[i] for p in split[2:]) if split[2:] else 0.0
                      for i in range(3)])
    out = {"stage_batch_ms": [1000 * t for t in wall], "stage_batch_cpu_ms": [1000 * t for t in cpu]}
    if not cfg.decoupled and cfg.mode != "gpipe":
        out["stage_parts_ms"] = parts     # per stage: forward, backward, update
    return out


def calibrate(cfg: Config, folder: str, timeout_s: float = 600) -> dict:
    """`calibrate_worker` in a fresh interpreter with one BLAS thread, as a stage has."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"calibrate-{cfg.mode}.json")
    with open(path, "w") as fh:
        fh.write(cfg.to_json())
    proc = _run_child([sys.executable, "-m", "dni_async.measure.bench", "_calibrate", path], 1,
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


# -- aggregation -------------------------------------------------------------------------------

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
    if cfg.mode == "backprop":
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
    if cfg.mode == "backprop":
        out["stage_parts_ms"] = [[1000 * p[k] for p in parts] for k in range(len(t))]
        lb = b["lockstep_bound_samples_per_s"]
        out["lockstep_efficiency"] = rate / lb if lb else None
    if cfg.decoupled:
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


# -- the whole bench ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args, values: dict, modes: list, repeats: int, warmup: int, target,
                 run_root: str, log):
        self.args, self.values, self.modes = args, values, modes
        self.repeats, self.warmup, self.target = repeats, warmup, target
        self.root, self.log = run_root, log
        self.cores = os.cpu_count() or 1
        self.cfgs = {m: mode_config(values, m) for m in modes}

    def _resolved(self, cfg: Config) -> Config:
        from dni_async.nn import network
        ds, _ = network.load_data_and_rng(cfg)
        network.resolve_dims(cfg, ds)
        return cfg

    def modes_table(self) -> dict:
        cfgs = {m: self._resolved(c) for m, c in self.cfgs.items()}
        any_cfg = next(iter(cfgs.values()))
        metric = "test_bit_acc" if any_cfg.dataset == "binary-addition" else "test_exact_acc"
        if self.target:
            metric = self.target[0]
        alone = {}
        for m in self.modes:
            t0 = time.perf_counter()
            alone[m] = calibrate(cfgs[m], self.root)
            self.log(f"  {m:<8} stages timed alone: "
                     + " ".join(f"{x:.2f}" for x in alone[m]["stage_batch_ms"])
                     + f" ms per batch ({time.perf_counter() - t0:.1f} s)")
        runs = {m: [] for m in self.modes}
        n_runs = self.repeats * len(self.modes)
        i = 0
        for r in range(self.repeats):
            for m in self.modes:        # interleaved: every repeat runs every mode once
                i += 1
                t0 = time.perf_counter()
                s = run_pipeline(cfgs[m], os.path.join(self.root, f"{m}-r{r}"),
                                 keep_weights=self.args.keep_weights)
                runs[m].append(s)
                rate = steady_rate(s["history"], self.warmup,
                                   cfgs[m].batches_per_epoch() * cfgs[m].batch_size)
                self.log(f"  [{i}/{n_runs}] {m:<8} repeat {r + 1}: {rate:>10,.0f} samples/s "
                         f"({time.perf_counter() - t0:.1f} s)")
        results = {m: summarize_mode(cfgs[m], runs[m], self.warmup, self.cores, None, metric)
                   for m in self.modes}
        for m in self.modes:
            add_alone(results[m], alone[m], cfgs[m].batch_size, self.cores)
        target = self.target or default_target(results, metric)
        for m in self.modes:
            results[m]["time_to_target_s"] = _median([time_to(r["history"], target)
                                                     for r in runs[m]])
            results[m]["reached_target"] = sum(time_to(r["history"], target) is not None
                                               for r in runs[m])
        refs = {}
        if self.args.reference:
            ref_cfg = self._resolved(mode_config(self.values, "backprop"))
            for key, threads in (("reference", 1), ("reference_all_cores", self.cores)):
                t0 = time.perf_counter()
                s = run_reference(ref_cfg, os.path.join(self.root, key), threads)
                refs[key] = summarize_reference(ref_cfg, s, self.warmup, target, metric)
                self.log(f"  {key:<20} {refs[key]['samples_per_s']:>10,.0f} samples/s "
                         f"({threads} BLAS thread{'s' if threads > 1 else ''}, "
                         f"{time.perf_counter() - t0:.1f} s)")
        base = results.get("backprop", {}).get("samples_per_s")
        for row in [*results.values(), *refs.values()]:
            row["speedup"] = row["samples_per_s"] / base if base else None
        return {"results": results, "refs": refs, "target": target, "metric": metric,
                "cfgs": cfgs}

    def traced(self, modes: list, untraced: dict) -> dict:
        """Per mode, a short untraced run and then the same run traced: the pair gives the
        tracing overhead measured side by side; the traced one gives the timeline."""
        out = {}
        for m in modes:
            cfg = mode_config(self.values, m, epochs=min(self.cfgs[m].epochs, self.warmup + 1))
            spe = cfg.batches_per_epoch() * cfg.batch_size
            t0 = time.perf_counter()
            plain = steady_rate(run_pipeline(cfg, os.path.join(self.root, f"{m}-untraced"))
                                ["history"], self.warmup, spe)
            d = os.path.join(self.root, f"{m}-traced")
            s = run_pipeline(cfg, d, trace=True, keep_weights=self.args.keep_weights)
            rate = steady_rate(s["history"], self.warmup, spe)
            n_spans = sum(len(p["spans"]) for p in _read_span_files(d))
            per_batch = n_spans / (cfg.epochs * cfg.batches_per_epoch())
            base = untraced.get(m, {}).get("samples_per_s") or plain
            batch_us = 1e6 * cfg.batch_size / base if base else None
            out[m] = {"run_dir": d, "samples_per_s": rate, "untraced_samples_per_s": plain,
                      "spans": n_spans, "spans_per_batch": per_batch,
                      "overhead": (plain / rate - 1) if plain and rate else None,
                      "estimated_overhead": per_batch * self.span_cost_us / batch_us
                      if batch_us else None}
            self.log(f"  traced {m:<8} {rate:>10,.0f} samples/s, untraced {plain:,.0f}, "
                     f"{n_spans} spans ({time.perf_counter() - t0:.1f} s)")
        return out

    @property
    def span_cost_us(self) -> float:
        if not hasattr(self, "_span_cost"):
            self._span_cost = span_cost_us()
        return self._span_cost

    def sweep(self, key: str, values: list, modes: list, epochs: int) -> dict:
        points = []
        base_cfg = make_config(self.values)
        for v in values:
            over = {"epochs": epochs}
            if key == "width":
                # narrow layers run more batches, so each measurement lasts about as long
                over["hidden"] = [v] * len(base_cfg.hidden)
                over["n_train"] = base_cfg.n_train * max(1, min(8, round(max(base_cfg.hidden) / v)))
            else:
                over[key] = v
            point = {"value": v, "n_train": over.get("n_train", base_cfg.n_train), "modes": {}}
            for m in modes:
                cfg = self._resolved(mode_config(self.values, m, **over))
                t0 = time.perf_counter()
                s = run_pipeline(cfg, os.path.join(self.root, f"sweep-{key}{v}-{m}"))
                row = summarize_mode(cfg, [s], min(self.warmup, epochs - 1), self.cores, None,
                                     "test_bit_acc")
                add_alone(row, calibrate(cfg, self.root), cfg.batch_size, self.cores)
                for drop in ("history", "final", "stage_times_s", "run_dirs"):
                    row.pop(drop, None)
                point["modes"][m] = row
                self.log(f"  sweep {key}={v} {m:<8} {row['samples_per_s']:>10,.0f} samples/s "
                         f"({time.perf_counter() - t0:.1f} s)")
            if "backprop" in point["modes"]:
                base = point["modes"]["backprop"]["samples_per_s"]
                for row in point["modes"].values():
                    row["speedup"] = row["samples_per_s"] / base if base else None
            points.append(point)
        return {"key": key, "values": values, "modes": modes, "epochs": epochs, "points": points}


def span_cost_us(n: int = 200_000) -> float:
    """What recording one span adds to timing it (microseconds), measured in this process."""
    from dni_async.measure.clock import Clock
    best = {}
    for _ in range(3):
        for record in (False, True):
            clock = Clock(record_spans=record, max_spans=n)
            t0 = time.perf_counter()
            for i in range(n):
                with clock.span("forward", i):
                    pass
            dt = (time.perf_counter() - t0) / n * 1e6
            best[record] = min(best.get(record, dt), dt)
    return max(0.0, best[True] - best[False])


class MachineShare:
    """How much of the cores other work took while the bench ran: busy CPU time of the whole
    machine (/proc/stat) minus this process's and its children's own, over wall time x cores."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()

    def others(self, cores: int):
        busy = _machine_busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy - self.busy0) - (_own_cpu_s() - self.own0)
        return max(0.0, other / (wall * cores)) if wall > 0 else None


def _machine_busy_s():
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = f[0] + f[1] + f[2] + sum(f[5:8])      # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def _read_span_files(run_dir: str) -> list:
    from dni_async.measure import trace
    return trace.read_spans(run_dir)


# -- main --------------------------------------------------------------------------------------

def main(argv: list) -> int:
    try:
        return _main(build_parser().parse_args(argv), argv)
    except SystemExit as exc:     # --help
        return 0 if not exc.code else EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"dni-async bench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BenchFailed as exc:
        print(f"dni-async bench: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dni-async bench: interrupted", file=sys.stderr)
        return 130


def _main(args, argv: list) -> int:
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, flush=True, **k))
    table = _bench_table(args.config)
    args.wire = args.wire or table.get("wire", False)   # a config may ask for the transport too
    settings_given = bool(args.config or args.set or args.modes or args.sweep)
    wire_only = args.wire and not settings_given
    modes = [] if wire_only else parse_modes(args.modes if args.modes is not None
                                             else table.get("modes", ",".join(MODES)))
    repeats = args.repeats if args.repeats is not None else _table_int(table, "repeats", 3)
    warmup = args.warmup if args.warmup is not None else _table_int(table, "warmup", 1)
    target = parse_target(args.target if args.target is not None else table.get("target"))
    sweep = parse_sweep(args.sweep)
    sweep_modes = parse_modes(args.sweep_modes, allow_none=False) if sweep else []
    if repeats < 1 or warmup < 0 or args.sweep_epochs < 1:
        raise ConfigError("need --repeats >= 1, --warmup >= 0 and --sweep-epochs >= 1")
    for path, what in ((args.json, "cannot write --json"), (args.trace, "cannot write --trace")):
        if path:
            report.ensure_writable(path, what)
    values = base_values(args) if not wire_only else {}
    if not wire_only:   # every config is checked before any process starts
        for m in set(modes) | set(sweep_modes):
            mode_config(values, m)
        if sweep:
            hidden = make_config(values).hidden
            for v in sweep[1]:
                over = {"hidden": [v] * len(hidden)} if sweep[0] == "width" else {sweep[0]: v}
                for m in sweep_modes:
                    mode_config(values, m, **over, epochs=args.sweep_epochs)
    plots = args.plots and _have_matplotlib(log)
    want_trace = bool(args.trace) or (plots and {"backprop", "cdni"} & set(modes))

    cores = os.cpu_count() or 1
    run_root = os.path.abspath(args.run_dir or os.path.join(
        "runs", f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
    try:
        os.makedirs(run_root, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the run folder {run_root}: {exc.strerror}") from None
    out: dict = {"command": " ".join(["dni-async", "bench", *argv]),
                 "run_root": run_root, "machine": machine_info(cores),
                 "loadavg_before": list(os.getloadavg())}
    bench = Bench(args, values, modes, repeats, warmup, target, run_root, log)
    share = MachineShare()
    t_start = time.perf_counter()
    res = None
    if modes:
        cfg0 = bench._resolved(mode_config(values, modes[0]))
        log(f"dni-async bench: {describe_layout(cfg0)}; modes {', '.join(modes)}; "
            f"{repeats} repeat(s); {cores} cores; runs in {run_root}")
        gens = {m: generator_info(bench._resolved(mode_config(values, m)))["text"]
                for m in modes if m in ("dni", "cdni")}
        for m, text in gens.items():
            log(f"  {m}: {text}")
        res = bench.modes_table()
        out.update(config=cfg0.to_dict(), layout=describe_layout(cfg0), repeats=repeats,
                   warmup_epochs=warmup,
                   target={"metric": res["target"][0], "value": res["target"][1]}
                   if res["target"] else None,
                   modes=res["results"], **res["refs"])
        if gens:
            out["generator"] = {m: generator_info(bench.cfgs[m]) for m in gens}
    if want_trace and modes:
        tmodes = modes if args.trace else [m for m in ("backprop", "cdni") if m in modes]
        traced = bench.traced(tmodes, res["results"])
        from dni_async.measure import trace
        trace_path = args.trace or os.path.join(run_root, "trace.json")
        trace.merge([traced[m]["run_dir"] for m in tmodes], trace_path, labels=tmodes)
        out["trace"] = {"path": os.path.abspath(trace_path),
                        "overhead": {m: traced[m]["overhead"] for m in tmodes},
                        "estimated_overhead": {m: traced[m]["estimated_overhead"]
                                               for m in tmodes},
                        "span_cost_us": bench.span_cost_us,
                        "runs": traced}
    if sweep:
        log(f"sweep of {sweep[0]} over {sweep[1]} ({', '.join(sweep_modes)}, "
            f"{args.sweep_epochs} epoch(s) each, 1 run per point)")
        out["sweep"] = bench.sweep(sweep[0], sweep[1], sweep_modes, args.sweep_epochs)
    wire_rows = None
    if args.wire:
        from dni_async.measure import wirebench
        log("wire layer vs raw pyzmq, PUSH/PULL over ipc between two processes")
        try:
            wire_rows = wirebench.run()
        except wirebench.WireBenchError as exc:
            raise BenchFailed(str(exc)) from None
        out["wire"] = wire_rows
    out["targets"] = targets(res, wire_rows)
    out["seconds"] = time.perf_counter() - t_start
    out["loadavg_after"] = list(os.getloadavg())
    out["other_work_share"] = share.others(cores)

    # the report
    print()
    if res:
        print(f"== dni-async bench: {out['layout']} ==")
        for m, g in out.get("generator", {}).items():
            print(f"{m}: {g['text']}")
        print(modes_text(res, warmup, repeats, cores))
    if "trace" in out:
        t = out["trace"]
        ov = ", ".join(f"{m} {fmt(v, '+.1%')}" for m, v in t["overhead"].items())
        est = ", ".join(f"{m} {fmt(v, '.2%')} ({t['runs'][m]['spans_per_batch']:.1f} spans "
                        f"per batch)" for m, v in t["estimated_overhead"].items())
        print(f"\ntrace: {t['path']}")
        print(f"tracing overhead, a traced run against the same run untraced just before "
              f"(noisy): {ov}")
        print(f"tracing overhead, recording cost {t['span_cost_us']:.2f} us per span x spans "
              f"per batch / batch time: {est}")
    if sweep:
        print(f"\nsweep ({out['sweep']['epochs']} epoch(s) per run, steady state of the last):")
        print(sweep_text(out["sweep"]))
    if wire_rows:
        from dni_async.measure import wirebench
        print("\nwire layer vs raw pyzmq (PUSH/PULL, ipc, two processes; latency per hop):")
        print(wirebench.HEADER)
        for r in wire_rows:
            print(wirebench.format_row(r))
    if out["targets"] and (os.path.basename(args.config or "") == "wide.toml" or args.wire):
        print()
        print(targets_text(out["targets"]))
    other = out["other_work_share"]
    print(f"\nbench took {out['seconds']:.0f} s; load average before {out['loadavg_before'][0]:.2f}, "
          f"after {out['loadavg_after'][0]:.2f} (1 min)"
          + ("" if other is None else f"; processes other than this bench's used {other:.0%} "
             f"of the {cores} cores meanwhile"))
    if plots:
        from dni_async.measure import plots as plots_mod
        if args.json:
            stem = os.path.splitext(os.path.abspath(args.json))[0]
        else:
            stem = os.path.join(run_root, "bench")
        out["plots"] = plots_mod.write_all(out, stem)
        for p in out["plots"].values():
            print(f"picture: {p}")
    if args.json:
        report.write_json(args.json, out)
        print(f"json: {os.path.abspath(args.json)}")
    return 0


def _have_matplotlib(log) -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        print("dni-async bench: matplotlib is not installed; no pictures "
              "(pip install 'dni-async[plot]')", file=sys.stderr)
        return False


def _calibrate_main(path: str) -> int:
    from dni_async.config import config_from_dict
    with open(path) as fh:
        cfg = config_from_dict(json.load(fh))
    print(json.dumps(calibrate_worker(cfg)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_calibrate"]:
        raise SystemExit(_calibrate_main(sys.argv[2]))
    raise SystemExit(main(sys.argv[1:]))
