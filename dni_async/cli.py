"""The `dni-async` command: train, watch, plot, reference, bench, chaos, experiment, plan, keys,
stage.

Bad settings end here with one line on stderr and exit status 2, before any process starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from dni_async.config import (PRESETS, ArgumentParser, ConfigError, apply_sets, load_toml,
                              make_config)

EXIT_BAD_INPUT = 2


def _config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run settings (override the preset and --config)")
    g.add_argument("--config", metavar="FILE", help="TOML file of settings")
    g.add_argument("--preset", help="named settings: " + ", ".join(PRESETS) + " (default seed)")
    g.add_argument("--mode", help="backprop | gpipe | dni | cdni (train and plan: cdni by "
                                  "default; reference: backprop, the post's run)")
    g.add_argument("--dataset", help="binary-addition | mnist1d | digits | PATH.npz")
    g.add_argument("--bits", type=int)
    g.add_argument("--n-train", type=int)
    g.add_argument("--n-test", type=int)
    g.add_argument("--hidden", help="hidden widths, e.g. 128,64 (one stage per layer)")
    g.add_argument("--layers", type=int,
                   help="N weight layers (N stages), every hidden one as wide as the first")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="batch norm in every hidden layer")
    g.add_argument("--optimizer", help="sgd (on batch sums, as the seed) | adam")
    g.add_argument("--generator-optimizer", help="sgd | adam, with --generator-lr")
    g.add_argument("--freeze-hidden", action=argparse.BooleanOptionalAction, default=None,
                   help="the control: hidden layers never update, only the last one learns")
    g.add_argument("--activation", help="hidden activation(s): sigmoid, tanh, relu, identity")
    g.add_argument("--output-activation")
    g.add_argument("--loss", help="squared | softmax_xent")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--init", help="seed | xavier | he")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--generator-lr", type=float)
    g.add_argument("--generator-hidden", type=int, help="0: linear generator")
    g.add_argument("--generator-normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="standardise the generator's input over the batch")
    g.add_argument("--context", help="generator input: auto | h | y | hy")
    g.add_argument("--micro-batches", type=int, help="gpipe: micro-batches per batch")
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", help="float64 | float32")
    g.add_argument("--eval-every", type=int, help="epochs between held-out evaluations")
    g.add_argument("--eval-batches", type=int,
                   help="also evaluate held-out every N training batches (the curve)")
    g.add_argument("--stop-at", metavar="METRIC=VALUE",
                   help="stop training once a held-out evaluation reaches this, "
                        "e.g. test_exact_acc=0.6")
    g.add_argument("--time-budget-s", type=float, metavar="SECONDS",
                   help="stop training after this many training seconds")
    g.add_argument("--log-every", type=int, help="epochs between progress lines (0: ~20 lines)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set max_pending=32")


def _pipeline_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--transport", help="ipc (default) | tcp")
    g.add_argument("--host", help="address to bind for tcp (default 127.0.0.1)")
    g.add_argument("--max-in-flight", type=int, help="batches between sending and loss back")
    g.add_argument("--run-dir", help="folder for this run's files (default runs/<time>-<mode>-<pid>)")
    g.add_argument("--checkpoint-every", type=int, metavar="EPOCHS",
                   help="snapshot every stage and the coordinator every N epochs")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest good checkpoint")


CONFIG_FLAGS = ("preset", "mode", "dataset", "bits", "n_train", "n_test", "hidden", "layers",
                "batch_norm", "optimizer", "generator_optimizer", "freeze_hidden", "eval_batches",
                "stop_at", "time_budget_s", "activation",
                "output_activation", "loss", "bias", "init", "epochs", "batch_size", "lr",
                "generator_lr", "generator_hidden", "generator_normalize", "context",
                "micro_batches", "seed", "dtype", "eval_every", "fidelity_every", "log_every",
                "transport", "host", "max_in_flight", "checkpoint_every")


def config_from_args(args, default_mode: str | None = None):
    """Settings from --config, then --set, then flags; `default_mode` when none names a mode."""
    values = load_toml(args.config) if getattr(args, "config", None) else {}
    apply_sets(values, args.set)
    for name in CONFIG_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if default_mode and "mode" not in values:
        values["mode"] = default_mode
    return make_config(values, one_mode=True)


def _cmd_reference(args) -> int:
    from dni_async.oneprocess import reference
    from dni_async import report
    cfg = config_from_args(args)
    if args.json:
        report.ensure_writable(args.json)
    from dni_async.measure import live
    with live.epoch_bar(f"reference {cfg.mode}", cfg.epochs, enabled=not args.quiet) as bar:
        summary = reference.train(cfg, log=None if args.quiet else bar.say,
                                  on_epoch=bar.advance)
    f = summary["final"]
    print(f"reference {cfg.mode}: train bit acc {f['train_bit_acc']:.4f} "
          f"exact {f['train_exact_acc']:.4f} | test bit acc {f['test_bit_acc']:.4f} "
          f"exact {f['test_exact_acc']:.4f} | {summary['samples_per_s']:,.0f} samples/s "
          f"| {summary['wall_seconds']:.1f} s")
    if summary["stopped"] == "target":
        print(f"reached {cfg.stop_at} after {summary['batches']} updates")
    if args.json:
        report.write_json(args.json, summary)
    from dni_async.measure import float_warnings
    said = float_warnings.line(summary["fp_warnings"])
    if said:
        print(said, file=sys.stderr)
    if summary["diverged"] is not None:
        print(f"dni-async reference: step {summary['diverged']}: {report.DIVERGED}",
              file=sys.stderr)
        return 4
    return 0


def _cmd_train(args) -> int:
    from dni_async.runtime import supervisor as launch
    if getattr(args, "resume", None):
        given = [n for n in (*CONFIG_FLAGS, "config", "run_dir") if getattr(args, n, None) is not None]
        if given or args.set:
            raise ConfigError("--resume continues a run with its own settings; drop "
                              + ", ".join("--" + n.replace("_", "-") for n in given or ["set"]))
        return launch.resume(args.resume, json_path=args.json, quiet=args.quiet, live=args.live)
    cfg = config_from_args(args, default_mode="cdni")   # the pipeline's point: decoupling
    return launch.train(cfg, run_dir=args.run_dir, json_path=args.json, quiet=args.quiet,
                        trace=args.trace, live=args.live, timeline=args.trace)


def _cmd_watch(args) -> int:
    from dni_async.measure import watch
    return watch.main(args.run_dir, plain=args.plain)


def _cmd_plot(args) -> int:
    from dni_async.measure import plots
    paths = plots.plot_runs(args.run_dirs, out=args.out)
    if paths is None:
        return 1
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_stage(args) -> int:
    from dni_async.runtime import stage
    return stage.main(args.run_config, args.rank)


def _cmd_coordinator(args) -> int:
    from dni_async.runtime import coordinator
    return coordinator.main(args.run_config)


def _cmd_keys(args) -> int:
    from dni_async.runtime import security
    if args.stages < 1:
        raise ConfigError(f"--stages must be positive, got {args.stages}")
    made = security.make_keys(args.folder, args.stages)
    print(f"CURVE keys for {', '.join(made)} in {args.folder}/public (share) and "
          f"{args.folder}/private (each host keeps only its own); "
          f"set curve_keys = \"{args.folder}\" in the run's config")
    return 0


def _cmd_plan(args) -> int:
    from dni_async.runtime import supervisor as launch
    if args.resume:
        spec = _plan_resume(args)
    else:
        cfg = config_from_args(args, default_mode="cdni")
        if not args.run_dir:
            raise ConfigError("plan needs --run-dir: the folder every process reads config.json "
                              "from")
        spec, _ = launch.prepare(cfg, args.run_dir)
    path = os.path.join(spec.run_dir, "config.json")
    print(f"wrote {path} (run id {spec.run_id}); start each process, in any order:")
    print(f"  dni-async coordinator {path}")
    for k in range(spec.config.n_stages):
        print(f"  dni-async stage {path} --rank {k}")
    return 0


# what `plan --resume` may change: where the processes run, never what they compute
PLACEMENT = ("transport", "host", "coordinator_host", "stage_hosts", "base_port", "curve_keys",
             "allow_insecure")


def _plan_resume(args):
    """A resumed run's config.json: the run's own settings and its newest good checkpoint,
    with new addresses if given (a job that starts again on other nodes)."""
    from dni_async.config import config_from_dict
    from dni_async.runtime import supervisor as launch
    if args.run_dir and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
        raise ConfigError(f"--run-dir {args.run_dir} and --resume {args.resume} name different "
                          "folders: a run resumes in its own")
    sets = apply_sets({}, args.set)
    given = [f"--{n.replace('_', '-')}" for n in (*CONFIG_FLAGS, "config")
             if getattr(args, n, None) is not None and n not in PLACEMENT]
    given += [f"--set {k}" for k in sets if k not in PLACEMENT]
    if given:
        raise ConfigError("--resume continues a run with its own settings; only where its "
                          f"processes run may change ({', '.join(PLACEMENT)}); drop "
                          + ", ".join(given))
    old, ckpt = launch.resume_point(args.resume)
    placement = {**sets, **{n: getattr(args, n) for n in PLACEMENT
                            if getattr(args, n, None) is not None}}
    cfg = config_from_dict({**old.config.to_dict(), **placement})
    spec, _ = launch.prepare(cfg, args.resume, trace=old.trace, resume_from=ckpt)
    print(f"resuming {spec.run_dir} from {ckpt}")
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dni-async", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("reference", help="train in one process (the oracle)")
    _config_flags(r)
    r.add_argument("--json", metavar="PATH", help="write the run summary here")
    r.add_argument("--fidelity-every", type=int, metavar="N",
                   help="dni/cdni: every N batches compare synthetic and true gradients "
                        "(costs a backward pass; 0: off)")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.set_defaults(func=_cmd_reference)

    t = sub.add_parser("train", help="train with one OS process per layer (default: the demo)")
    _config_flags(t)
    _pipeline_flags(t)
    t.add_argument("--json", metavar="PATH", help="also write the run summary here")
    t.add_argument("--quiet", action="store_true", help="no progress lines and no summary")
    t.add_argument("--live", action="store_true",
                   help="a full-screen view of every stage computing, waiting and sending "
                        "(plain lines without a terminal); Ctrl-C stops the run as usual")
    t.add_argument("--trace", action="store_true",
                   help="record every span; write trace.json (Perfetto) and gantt.png "
                        "into the run folder")
    t.set_defaults(func=_cmd_train)

    w = sub.add_parser("watch", help="attach the live view to a run that is going (Ctrl-C "
                                     "detaches; the run goes on)")
    w.add_argument("run_dir", help="the run's folder (its config.json names the stream)")
    w.add_argument("--plain", action="store_true", help="plain lines even in a terminal")
    w.set_defaults(func=_cmd_watch)

    pt = sub.add_parser("plot", help="pictures of finished runs: learning curves, busy shares, "
                                     "target lag; several runs overlaid")
    pt.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pt.add_argument("--out", metavar="PNG", help="where to write the picture (default: "
                                                 "RUN_DIR/plot.png, or beside several runs)")
    pt.set_defaults(func=_cmd_plot)

    pl = sub.add_parser("plan", help="write a run's config.json (endpoints included) for "
                                     "starting each process by hand, here or on other hosts")
    _config_flags(pl)
    _pipeline_flags(pl)
    pl.set_defaults(func=_cmd_plan)

    k = sub.add_parser("keys", help="make CURVE keys for tcp runs between hosts")
    k.add_argument("folder")
    k.add_argument("--stages", type=int, required=True, help="number of stage processes")
    k.set_defaults(func=_cmd_keys)

    s = sub.add_parser("stage", help="run one stage process from a run config (config.json)")
    s.add_argument("run_config", help="the run's config.json with its endpoints")
    s.add_argument("--rank", type=int, required=True, help="stage index, 0-based")
    s.set_defaults(func=_cmd_stage)

    sub.add_parser("bench", help="measure every mode side by side (see dni-async bench -h)",
                   add_help=False)
    sub.add_parser("chaos", help="short runs, each with a random SIGKILL or SIGSTOP; checks "
                                 "that every one ends well (see dni-async chaos -h)",
                   add_help=False)
    sub.add_parser("experiment", help="the results table, sweeps, gradient fidelity, the seed "
                                      "post's DNI run (see dni-async experiment -h)",
                   add_help=False)

    c = sub.add_parser("coordinator", help="run the coordinator from a run config (config.json)")
    c.add_argument("run_config")
    c.set_defaults(func=_cmd_coordinator)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]   # no flags: the demo
    if argv[0] == "bench":   # bench parses its own flags (REMAINDER would drop "--x" ones)
        from dni_async.measure.bench import command as bench
        return bench.main(argv[1:])
    if argv[0] == "chaos":   # parses its own flags, like bench
        from dni_async.measure import chaos
        return chaos.main(argv[1:])
    if argv[0] == "experiment":   # parses its own flags, like bench
        from dni_async.experiments import command as experiment
        return experiment.main(argv[1:])
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:   # name the subcommand whose --help lists the flags that do exist
            where = " ".join(filter(None, (parser.prog, args.command)))
            raise ConfigError(f"unrecognized arguments: {' '.join(extra)} (see {where} --help)")
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return args.func(args)
    except ConfigError as exc:
        print(f"dni-async: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dni-async: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
