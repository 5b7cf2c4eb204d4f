"""What a chaos case checks once a run has ended: which processes are still there, which ipc
files and half-written checkpoints were left, whether the failure named its cause, and whether
the final result is an undisturbed run's.

Processes are known by (pid, start time) read from /proc, so a pid the kernel hands to some
other program later is never mistaken for one of the run's.
"""

from __future__ import annotations

import os
import signal
import time

from dni_async import report
from dni_async.runtime import checkpoint
from dni_async.runtime.runspec import ipc_files

TIMING_FIELDS = ("seconds", "samples_per_s")     # history fields that differ run to run


def proc_stat(pid: int):
    """(state, ppid, start time) of a live process, or None if it has gone (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def role_of(cmd: str) -> str | None:
    """'coordinator' or 'stage K' from a run process's command line."""
    words = cmd.split()
    if "coordinator" in words:
        return "coordinator"
    if "stage" in words and "--rank" in words:
        return f"stage {words[words.index('--rank') + 1]}"
    return None


def children(parent: int) -> dict:
    """The run processes a `train` started: role -> (pid, start time)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st and st[1] == parent:
            role = role_of(cmdline(int(name)))
            if role:
                found[role] = (int(name), st[2])
    return found


def alive(pid: int, start: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[2] == start


def signal_if_same(pid: int, start: int, sig: int) -> bool:
    """Send `sig` only if `pid` is still the process recorded; True if sent."""
    if not alive(pid, start):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def mentioning(text: str) -> list:
    """Live processes whose command line names `text` (a run folder), not this one."""
    return [int(n) for n in os.listdir("/proc")
            if n.isdigit() and int(n) != os.getpid() and text in cmdline(int(n))
            and proc_stat(int(n)) is not None]


def leftover_processes(procs: dict, run_dir: str, wait_s: float) -> list:
    """Roles (or pids) still running `wait_s` seconds from now; each one found is SIGKILLed,
    so a failed check leaves nothing behind either."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [r for r, (pid, start) in procs.items() if alive(pid, start)]
        left += [f"pid {p}" for p in mentioning(run_dir)
                 if p not in {pid for pid, _ in procs.values()}]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for r, (pid, start) in procs.items():
        signal_if_same(pid, start, signal.SIGKILL)
    for p in mentioning(run_dir):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def leftover_ipc(endpoints: dict) -> list:
    """ipc socket files of the run still on disk, and their private folder."""
    files = ipc_files(endpoints)
    left = [p for p in files if os.path.exists(p)]
    folders = {os.path.dirname(p) for p in files}
    return left + sorted(f for f in folders if os.path.isdir(f))


def half_checkpoints(run_dir: str) -> list:
    """Temporary files of unfinished atomic writes, and checkpoint folders without a manifest."""
    left = []
    for folder, _, files in os.walk(run_dir):
        left += [os.path.join(folder, f) for f in files if f.startswith(".tmp-")]
    for ckpt in checkpoint.candidates(run_dir):
        if not os.path.exists(os.path.join(ckpt, checkpoint.MANIFEST)):
            left.append(ckpt)
    return [os.path.relpath(p, run_dir) for p in left]


def complete_checkpoints(run_dir: str) -> int:
    return sum(os.path.exists(os.path.join(c, checkpoint.MANIFEST))
               for c in checkpoint.candidates(run_dir))


def failure_text(stderr: str, run_dir: str) -> str:
    """What the run said about its failure: train's `failed:` line and failure.json's error."""
    said = [ln.split("failed:", 1)[1].strip() for ln in stderr.splitlines()
            if ln.startswith("dni-async train: failed:")]
    failure = report.read_json(os.path.join(run_dir, "failure.json")) or {}
    if failure.get("error"):
        said.append(str(failure["error"]))
    return " | ".join(dict.fromkeys(said))


def names(text: str, target: str) -> bool:
    """Does the failure text name the disturbed process ("stage 1", "coordinator")?"""
    return target in text


def result_of(summary: dict) -> dict:
    """What must not depend on how a lockstep run got there: weights, history, final metrics."""
    return {"weights_sha256": summary.get("weights_sha256"),
            "history": [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
                        for row in summary.get("history", [])],
            "final": summary.get("final")}


def differs(summary: dict | None, expected: dict) -> str | None:
    """Why a run's summary is not the undisturbed run's, or None if it is the same."""
    if summary is None:
        return "no summary.json"
    got = result_of(summary)
    for key in ("weights_sha256", "history", "final"):
        if got[key] != expected[key]:
            return f"{key} differs from the undisturbed run's"
    return None
