"""`dni-async chaos`: many short lockstep runs, each disturbed once at random; every one must
end well, and each is checked (`chaos_case.py`, `chaos_checks.py`).

    dni-async chaos --runs 50 --seed 7 --json chaos.json

First one undisturbed run gives the result every other must reach and the time span in which
disturbances land. Each case draws its plan from its own stream, seeded by the seed and its
index, so `--seed S --span T --from-run I --runs 1` (the header prints it) draws case I's plan
again: what, to whom, and when are replayed exactly; how the processes are scheduled around
it is not. The tool lives
beside the bench in `measure/`: like it, it drives whole runs from outside through the `train`
command and reports on them, and no process of a run ever imports it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from dni_async import report
from dni_async.config import ArgumentParser, ConfigError, make_config
from dni_async.measure import chaos_case as case_mod
from dni_async.measure import chaos_checks as checks
from dni_async.nn.modes import mode_of

OUTCOMES = ("finished", "resumed", "failed before a checkpoint", "broken")
LATE = "none (came too late)"     # a disturbance planned for after the run had ended
LABELS = ("none", LATE, "kill train", "kill coordinator", "kill stage", "stop coordinator",
          "stop stage", "stop+cont coordinator", "stop+cont stage")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="dni-async chaos",
                       description="Short lockstep runs, each with one random SIGKILL or SIGSTOP "
                                   "(or none); checks that every run ends well.")
    p.add_argument("--runs", type=int, default=20, help="disturbed runs (default 20)")
    p.add_argument("--seed", type=int, help="seed of the disturbances (default: drawn, printed)")
    p.add_argument("--from-run", type=int, default=0, metavar="I",
                   help="first case's index: with --runs 1, replays case I of a seed")
    p.add_argument("--mode", default="backprop", help="backprop | gpipe (lockstep modes resume "
                                                      "exactly; default backprop)")
    p.add_argument("--epochs", type=int, default=40, help="epochs of each run (tiny preset; "
                                                          "default 40)")
    p.add_argument("--span", type=float, metavar="SECONDS",
                   help="disturbances land within this long after every process of a run "
                        "exists (default: how long the undisturbed run had them all)")
    p.add_argument("--peer-timeout", type=float, default=1.0, metavar="SECONDS",
                   help="the runs' peer_timeout_s (default 1)")
    p.add_argument("--work-dir", help="folder for the runs (default: a temporary one, removed "
                                      "unless a check failed or --keep)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders")
    p.add_argument("--json", metavar="PATH", help="write every case and the counts here")
    p.add_argument("--quiet", action="store_true", help="print the table only")
    return p


def run_settings(args) -> tuple[list, object]:
    """The flags of every run, and their config (checked here, before any process starts)."""
    values = {"preset": "tiny", "mode": args.mode, "epochs": args.epochs, "checkpoint_every": 1,
              "peer_timeout_s": args.peer_timeout, "heartbeat_s": args.peer_timeout / 5,
              "startup_timeout_s": 10.0}
    cfg = make_config(values)
    if mode_of(cfg).decoupled:
        raise ConfigError(f"--mode {args.mode}: chaos compares results bit for bit, which only "
                          "the lockstep modes (backprop, gpipe) reach after a resume")
    if not 1 <= args.runs <= 9999 or args.from_run < 0:
        raise ConfigError("--runs must be in 1..9999 and --from-run >= 0")
    if args.span is not None and not args.span > 0:
        raise ConfigError(f"--span must be positive, got {args.span:g}")
    flags = ["--preset", "tiny"]
    for k, v in values.items():
        if k != "preset":
            flags += ["--set", f"{k}={v}"]
    return flags, cfg


def undisturbed(work: str, flags: list, n_procs: int, limit_s: float):
    """The result every case must reach, how long an undisturbed run takes, and how much of
    that its processes all exist (the span in which disturbances land)."""
    run_dir = os.path.join(work, "undisturbed")
    t0 = time.monotonic()
    train = case_mod.start(case_mod.train_cmd(run_dir, flags), run_dir + ".log")
    case_mod.await_processes(train, n_procs)
    up = time.monotonic()
    if not case_mod.end_by(train, {}, t0 + limit_s) or train.returncode != 0:
        with open(run_dir + ".log") as fh:
            tail = (fh.read().strip().splitlines() or ["?"])[-1]
        raise ConfigError(f"the undisturbed run failed ({train.returncode}): {tail}")
    summary = report.read_json(os.path.join(run_dir, "summary.json"))
    return checks.result_of(summary), time.monotonic() - t0, time.monotonic() - up


def counts(cases: list) -> dict:
    table = {}
    for c in cases:
        row = c["label"] if c["applied"] else "none" if c["plan"]["kind"] == "none" else LATE
        table.setdefault(row, dict.fromkeys(OUTCOMES, 0))[c["outcome"]] += 1
    order = [r for r in LABELS if r in table] + sorted(set(table) - set(LABELS))
    return {r: table[r] for r in order}


def table_text(table: dict) -> str:
    width = max(len(r) for r in [*table, "disturbance"])
    head = f"{'disturbance':<{width}}  " + "  ".join(OUTCOMES) + "  total"
    lines = [head]
    for row, n in table.items():
        cells = "  ".join(f"{n[o]:>{len(o)}}" for o in OUTCOMES)
        lines.append(f"{row:<{width}}  {cells}  {sum(n.values()):>5}")
    total = {o: sum(n[o] for n in table.values()) for o in OUTCOMES}
    lines.append(f"{'all':<{width}}  " + "  ".join(f"{total[o]:>{len(o)}}" for o in OUTCOMES)
                 + f"  {sum(total.values()):>5}")
    return "\n".join(lines)


def _case_line(i: int, c: dict) -> str:
    late = "" if c["applied"] or c["plan"]["kind"] == "none" else " (the run had ended)"
    text = f"case {i:4d}: {c['does']}{late} -> {c['outcome']}"
    if c["status"] != 0:
        text += f" [{c['cause'] or 'status ' + str(c['status'])}; ended {c['ended_s']:.1f} s " \
                f"after, deadline {c['deadline_s']:.1f} s]"
    elif c.get("note"):
        text += f" [{c['note']}]"
    return text + "".join(f"\n    problem: {p}" for p in c["problems"])


def main(argv: list) -> int:
    try:
        args = build_parser().parse_args(argv)
        flags, cfg = run_settings(args)
        if args.json:
            report.ensure_writable(args.json)
    except ConfigError as exc:
        print(f"dni-async: error: {exc}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="dni-chaos-"))
    os.makedirs(work, exist_ok=True)
    try:
        cases = run_all(args, flags, cfg, seed, work)
    except KeyboardInterrupt:      # the run going on dies with this process (PDEATHSIG)
        print(f"dni-async chaos: interrupted; runs kept in {work}", file=sys.stderr)
        return 130
    if cases is None:
        print(f"runs kept in {work}")
        return 1
    broken = sum(c["outcome"] == "broken" for c in cases)
    if broken or args.keep:
        print(f"runs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if broken else 0


def run_all(args, flags: list, cfg, seed: int, work: str) -> list | None:
    """The undisturbed run, then every case; prints the table. None if the undisturbed run
    failed (nothing to compare with)."""
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    say(f"dni-async chaos: seed {seed}, {args.runs} run{'s' * (args.runs != 1)} of {args.mode} "
        f"(tiny, {args.epochs} epochs, peer_timeout_s {args.peer_timeout:g}) in {work}")
    try:
        expected, took, up_s = undisturbed(work, flags, cfg.n_stages + 1, 300.0)
    except (ConfigError, subprocess.SubprocessError) as exc:
        print(f"dni-async chaos: {exc}", file=sys.stderr)
        return None
    span = round(args.span or up_s, 3)
    limits = case_mod.limits_for(cfg, took)
    say(f"undisturbed run: {took:.1f} s, {up_s:.1f} s of it with every process up; a disturbed "
        f"run must end within {limits.detect_s:.1f} s of the disturbance\n"
        f"replay case I with: dni-async chaos --seed {seed} --span {span:g} --from-run I "
        f"--runs 1")
    cases = []
    for i in range(args.from_run, args.from_run + args.runs):
        plan = case_mod.draw_plan(random.Random(f"{seed}:{i}"), cfg.n_stages, span,
                                  cfg.peer_timeout_s)
        c = case_mod.run_case(plan, os.path.join(work, f"case-{i:04d}"), flags,
                              cfg.n_stages + 1, limits, expected)
        cases.append({"index": i, **c})
        say(_case_line(i, c))
    table = counts(cases)
    broken = sum(c["outcome"] == "broken" for c in cases)
    print(table_text(table))
    print(f"{len(cases) - broken} of {len(cases)} runs passed every check (seed {seed})")
    if args.json:
        report.write_json(args.json, {
            "seed": seed, "mode": args.mode, "epochs": args.epochs,
            "peer_timeout_s": args.peer_timeout, "undisturbed_s": took, "span_s": span,
            "detect_s": limits.detect_s, "counts": table, "passed": broken == 0,
            "cases": cases})
    return cases
