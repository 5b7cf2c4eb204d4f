"""`dni-async bench`: its flags, the order of its work, and the report it prints and writes."""

from __future__ import annotations

import argparse
import os
import sys
import time

from dni_async import report
from dni_async.config import (MODES, ArgumentParser, ConfigError, apply_sets, load_toml,
                              make_config, read_toml)
from dni_async.measure.bench.children import BenchFailed, mode_config
from dni_async import progress
from dni_async.measure.bench.figures import (check_target, generator_info, machine_info,
                                             start_metric)
from dni_async.measure.bench.report import (describe_layout, fmt, modes_text, sweep_text,
                                            targets, targets_text)
from dni_async.measure.bench.runner import Bench, MachineShare
from dni_async.measure.plots import pyplot
from dni_async.progress import parse_target

EXIT_BAD_INPUT = 2


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
                   help="time to reach this held-out metric, e.g. test_bit_acc=0.9; it must be "
                        "above chance and above the untrained network (default: 90%% of the "
                        "way from there to lockstep backprop's final value)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="training seconds per run at most; with a target a run also stops "
                        "when it reaches it (default: the config's epochs only)")
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
        table = read_toml(path).get("bench", {})
    except ConfigError:
        return {}   # load_toml reports those
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [bench] must be a table")
    unknown = set(table) - {"repeats", "warmup", "target", "modes", "wire", "budget",
                            "eval_batches"}
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
    apply_sets(values, args.set)
    values.pop("mode", None)    # the bench sets the mode of every run
    return values


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
    target = parse_target(args.target if args.target is not None else table.get("target"),
                          "--target")
    budget = args.budget if args.budget is not None else table.get("budget", 0)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 <= budget < 1e9:
        raise ConfigError(f"budget must be a number of seconds >= 0, got {budget!r}")
    cadence = _table_int(table, "eval_batches", 0)
    sweep = parse_sweep(args.sweep)
    sweep_modes = parse_modes(args.sweep_modes, allow_none=False) if sweep else []
    if repeats < 1 or warmup < 0 or args.sweep_epochs < 1:
        raise ConfigError("need --repeats >= 1, --warmup >= 0 and --sweep-epochs >= 1")
    for path, what in ((args.json, "cannot write --json"), (args.trace, "cannot write --trace")):
        if path:
            report.ensure_writable(path, what)
    values = base_values(args) if not wire_only else {}
    if not wire_only:
        # every mode trains until it reaches the target or spends its budget, and is evaluated
        # on the held-out set at one fixed cadence of batches
        bpe = make_config(values).batches_per_epoch()
        values.setdefault("eval_batches", cadence or max(1, bpe // 4))
        if target:
            values.setdefault("stop_at", str(target))
        if budget:
            values.setdefault("time_budget_s", budget)
    if not wire_only:   # every config is checked before any process starts
        for m in set(modes) | set(sweep_modes):
            mode_config(values, m)
        if sweep:
            hidden = make_config(values).hidden
            for v in sweep[1]:
                over = {"hidden": [v] * len(hidden)} if sweep[0] == "width" else {sweep[0]: v}
                for m in sweep_modes:
                    mode_config(values, m, **over, epochs=args.sweep_epochs)
        if target and modes:   # a target below chance or the start is refused up front
            cfg0 = mode_config(values, modes[0])
            start = start_metric(cfg0, target.metric)
            check_target(target, progress.chance(cfg0.task, cfg0.output_dim).get(target.metric),
                         start)
    plots = args.plots and pyplot("dni-async bench") is not None
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
        from dni_async.measure import live
        with live.epoch_bar("bench", repeats * len(modes), enabled=not args.quiet,
                            unit="runs") as bar:
            if not args.quiet:
                bench.log = bar.say
            bench.on_run = bar.advance
            res = bench.modes_table()
        bench.log = log
        out.update(config=cfg0.to_dict(), layout=describe_layout(cfg0), repeats=repeats,
                   warmup_epochs=warmup,
                   target={"metric": res["metric"], "chance": res["chance"],
                           "start": res["start"],
                           "value": res["target"].value if res["target"] else None},
                   verdict=res["verdict"], modes=res["results"], **res["refs"])
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
        print(f"verdict: {res['verdict']}")
        t = out["target"]
        print(f"target: held-out {t['metric']} {'-' if t['value'] is None else t['value']:} "
              f"(chance {t['chance'] if t['chance'] is not None else '-'}, the untrained network "
              f"{t['start']:.4f}); every mode evaluated every {values['eval_batches']} batches"
              + (", stopping at the target" if target else "")
              + (f" or after {budget:g} training seconds" if budget else ""))
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
