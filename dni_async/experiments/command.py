"""`dni-async experiment`: run an experiment file, or the seed post's own DNI run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from dni_async import report
from dni_async.config import ArgumentParser, ConfigError, make_config
from dni_async.experiments.fidelity import fidelity_markdown, plot_fidelity, train_with_fidelity
from dni_async.experiments.runs import _write_json
from dni_async.experiments.spec import EXIT_BAD_INPUT, ExperimentFailed, load_spec, plan
from dni_async.experiments.sweep import plot_lag, run_sweep, sweep_markdown
from dni_async.experiments.table import (command_line, plot_table, results_markdown, run_table,
                                         table_cells, table_markdown)
from dni_async.oneprocess import seed_post


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
            from dni_async.measure import live
            with live.epoch_bar(f"experiment {spec['name']}", len(runs),
                                enabled=not args.quiet, unit="runs") as bar:
                res = run_table(spec, runs_dir, log=bar.say if log else None,
                                on_run=bar.advance)
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
        if images:
            path = plot_lag(spec, rows, f"{images}.png")
            if path:
                print(f"picture: {path}")
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
