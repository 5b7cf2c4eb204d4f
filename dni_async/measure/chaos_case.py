"""One chaos case: start a short lockstep run, disturb one of its processes once, see how it ends.

A disturbance (`Plan`) is drawn from the case's own seeded random stream: nothing; SIGKILL of
`train`, the coordinator or a stage; or SIGSTOP of the coordinator or a stage for longer than
`peer_timeout_s`, then SIGCONT or not. It lands at a random moment after every process of the
run exists (start-up included). The case passes when the run either finishes with the
undisturbed run's result, or fails naming the disturbed process within its deadline and
`--resume` then finishes with that same result (or, failed before its first checkpoint, is
refused in one line); and when no process, ipc file or half-written checkpoint is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from dni_async import report
from dni_async.measure import chaos_checks as checks

START_S = 30.0          # for every process of a run to exist


@dataclass
class Plan:
    kind: str           # none | kill | stop
    target: str = ""    # train | coordinator | stage K
    at_s: float = 0.0   # after every process exists
    stop_s: float = 0.0
    cont: bool = False  # after a stop: SIGCONT

    @property
    def label(self) -> str:
        """The disturbance's row in the table: what was done to which kind of process."""
        if self.kind == "none":
            return "none"
        who = "stage" if self.target.startswith("stage") else self.target
        return f"{self.kind}{'+cont' if self.cont else ''} {who}"

    def describe(self) -> str:
        if self.kind == "none":
            return "no disturbance"
        if self.kind == "kill":
            return f"SIGKILL {self.target} at {self.at_s:.2f} s"
        return (f"SIGSTOP {self.target} at {self.at_s:.2f} s for {self.stop_s:.2f} s, then "
                + ("SIGCONT" if self.cont else "leave it stopped"))


def draw_plan(rng, n_stages: int, span_s: float, peer_timeout_s: float) -> Plan:
    """One disturbance: a fifth none, two fifths kill, two fifths stop."""
    kind = rng.choice(("none", "kill", "kill", "stop", "stop"))
    if kind == "none":
        return Plan("none")
    targets = ["coordinator", *(f"stage {k}" for k in range(n_stages))]
    if kind == "kill":
        targets.append("train")
    return Plan(kind, rng.choice(targets), round(rng.uniform(0.0, span_s), 3),
                round(rng.uniform(1.5, 3.0) * peer_timeout_s, 3) if kind == "stop" else 0.0,
                kind == "stop" and rng.random() < 0.5)


@dataclass
class Limits:
    detect_s: float     # from a disturbance to every process gone
    finish_s: float     # an undisturbed run or a resume, start to end


def limits_for(cfg, undisturbed_s: float) -> Limits:
    """A disturbed run must end within what its own timeouts allow. The longest chain: a
    coordinator stopped before its handshake, so a stage gives up only after
    `startup_timeout_s + peer_timeout_s`; `train` then waits for the coordinator's verdict
    (`supervisor.verdict_wait_s`) and GRACE_S before SIGKILL. Plus 5 s for a busy machine."""
    from dni_async.runtime.supervisor import GRACE_S, verdict_wait_s
    detect = cfg.startup_timeout_s + cfg.peer_timeout_s + verdict_wait_s(cfg) + GRACE_S + 5.0
    return Limits(detect, 4 * undisturbed_s + cfg.startup_timeout_s + 30.0)


def train_cmd(run_dir: str, flags: list, resume: bool = False) -> list:
    base = [sys.executable, "-m", "dni_async", "train", "--quiet"]
    return [*base, "--resume", run_dir] if resume else [*base, "--run-dir", run_dir, *flags]


def start(cmd: list, log_path: str) -> subprocess.Popen:
    """`train` in a session of its own, its output in a file (a pipe would keep the reader
    waiting on any child that outlived it); it stops in order if this process dies."""
    from dni_async.runtime.supervisor import _die_with_parent
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)


def await_processes(train: subprocess.Popen, n: int) -> dict:
    """The run's processes once all n exist (or train has ended, or START_S passed)."""
    deadline = time.monotonic() + START_S
    procs = checks.children(train.pid)
    while len(procs) < n and train.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        procs = {**procs, **checks.children(train.pid)}
    return procs


def sleep_while_running(train: subprocess.Popen, seconds: float) -> None:
    end = time.monotonic() + seconds
    while train.poll() is None and time.monotonic() < end:
        time.sleep(min(0.02, max(0.0, end - time.monotonic())))


def disturb(plan: Plan, train: subprocess.Popen, procs: dict) -> bool:
    """Carry out the plan on a running run; False if its target had already gone."""
    if plan.kind == "none" or train.poll() is not None:
        return False
    if plan.target == "train":
        train.kill()
        return True
    if plan.target not in procs:       # it never started
        return False
    pid, started = procs[plan.target]
    if plan.kind == "kill":
        return checks.signal_if_same(pid, started, signal.SIGKILL)
    if not checks.signal_if_same(pid, started, signal.SIGSTOP):
        return False
    sleep_while_running(train, plan.stop_s)
    if plan.cont:
        checks.signal_if_same(pid, started, signal.SIGCONT)
    return True


def end_by(train: subprocess.Popen, procs: dict, deadline: float) -> bool:
    """Wait for train until the deadline; past it, kill everything. True if it ended in time."""
    try:
        train.wait(max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        os.killpg(train.pid, signal.SIGKILL)
        for pid, started in procs.values():
            checks.signal_if_same(pid, started, signal.SIGKILL)
        train.wait()
        return False


def endpoints(run_dir: str) -> dict:
    return (report.read_json(os.path.join(run_dir, "config.json")) or {}).get("endpoints", {})


def leftovers(run_dir: str, procs: dict, wait_s: float, files_of: list | None) -> list:
    """Everything a run that has ended left behind, as problems (and no longer running).
    `files_of`: the endpoints of every attempt whose ipc files and unfinished checkpoints
    must be gone by now (None: not yet, as after `train` itself was killed: nobody was left
    to sweep, and the resume does)."""
    problems = [f"left running: {r}" for r in checks.leftover_processes(procs, run_dir, wait_s)]
    if files_of is not None:
        for eps in files_of:
            problems += [f"ipc left: {p}" for p in checks.leftover_ipc(eps)]
        problems += [f"half-written checkpoint left: {p}" for p in checks.half_checkpoints(run_dir)]
    return problems


def run_case(plan: Plan, run_dir: str, flags: list, n_procs: int, limits: Limits,
             expected: dict) -> dict:
    """Run one case to its end and check it; a dict for the report."""
    t0 = time.monotonic()
    train = start(train_cmd(run_dir, flags), run_dir + ".log")
    procs = await_processes(train, n_procs)
    up = time.monotonic()
    sleep_while_running(train, plan.at_s)
    applied_at = time.monotonic()
    applied = disturb(plan, train, procs)
    deadline = applied_at + limits.detect_s if applied else t0 + limits.finish_s
    problems = [] if end_by(train, procs, deadline) else [
        f"hung: still running {limits.detect_s if applied else limits.finish_s:.1f} s after "
        + ("the disturbance" if applied else "its start")]
    first = endpoints(run_dir)
    swept = not (applied and plan.target == "train")
    problems += leftovers(run_dir, procs, max(0.5, deadline - time.monotonic()),
                          [first] if swept else None)
    ended = time.monotonic()
    with open(run_dir + ".log") as fh:
        said = fh.read()
    cause = checks.failure_text(said, run_dir)
    note = " | ".join(ln.split(": ", 1)[1] for ln in said.splitlines()
                      if ln.startswith("dni-async train:") and "after the run had completed" in ln)
    since = applied_at if applied else t0
    case = {"plan": asdict(plan), "does": plan.describe(), "label": plan.label,
            "applied": applied, "up_s": round(up - t0, 3), "status": train.returncode,
            "cause": cause, "note": note, "ended_s": round(ended - since, 3),
            "deadline_s": round(deadline - since, 3)}
    summary = report.read_json(os.path.join(run_dir, "summary.json"))
    if train.returncode == 0 or (summary and applied and plan.target == "train"):
        # (train killed after the coordinator had written the summary: the run is complete)
        why = checks.differs(summary, expected)
        problems += [why] if why else []
        case["outcome"] = "finished"
    else:
        problems += _judge_failure(plan, applied, train.returncode, cause)
        case["outcome"], more, case["resume"] = _resume(run_dir, limits, expected, first)
        problems += more
    case["problems"] = problems
    if problems:
        case["outcome"] = "broken"
    return case


def _judge_failure(plan: Plan, applied: bool, status: int, cause: str) -> list:
    if not applied:
        return [f"failed without a disturbance: {cause or f'status {status}'}"]
    if plan.target == "train":
        return [] if status == -signal.SIGKILL else [f"train ended with status {status}"]
    if not checks.names(cause, plan.target):
        return [f"the failure does not name {plan.target}: {cause or f'status {status}'}"]
    return []


def _resume(run_dir: str, limits: Limits, expected: dict, first: dict):
    """Resume a failed run; (outcome, problems, what the resume said). Afterwards neither the
    resume nor the first attempt (`first`: its endpoints) may have left anything."""
    had = checks.complete_checkpoints(run_dir)
    t0 = time.monotonic()
    log = run_dir + ".resume.log"
    proc = start(train_cmd(run_dir, [], resume=True), log)
    in_time = end_by(proc, {}, t0 + limits.finish_s)
    problems = [] if in_time else [f"resume hung: still running after {limits.finish_s:.0f} s"]
    problems += leftovers(run_dir, {}, 0.5, [first, endpoints(run_dir)])
    with open(log) as fh:
        said = fh.read().strip()
    info = {"status": proc.returncode, "said": said.splitlines()[-1] if said else "",
            "checkpoints_before": had}
    if proc.returncode == 0:
        why = checks.differs(report.read_json(os.path.join(run_dir, "summary.json")), expected)
        return "resumed", problems + ([why] if why else []), info
    if proc.returncode == 2 and "no usable checkpoint" in said and had == 0:
        return "failed before a checkpoint", problems, info
    return "resume failed", problems + [f"resume ended with status {proc.returncode}: "
                                        f"{info['said']}"], info
