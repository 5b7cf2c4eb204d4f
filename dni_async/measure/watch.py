"""`dni-async watch RUN_DIR`: the live view of a run that is already going, from anywhere that
reaches its coordinator's monitor stream (config.json names it). Ctrl-C detaches; the stream is
one-way, so watching, detaching or a watcher that falls behind never touches the run."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from dni_async.config import ConfigError
from dni_async.measure import live
from dni_async.runtime.runspec import RunSpec

ENDED = ("summary.json", "stopped.json", "failure.json")
QUIET_S = 3.0       # a finished run: no snapshot for this long and one of ENDED is there


def main(run_dir: str, plain: bool = False) -> int:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir}: no config.json, so no run to watch there")
    spec = RunSpec.load(path)
    if not spec.endpoints.get("monitor"):
        raise ConfigError(f"{run_dir}: this run was planned without a monitor stream")
    # Ctrl-C detaches even when this process was started with SIGINT ignored (a shell's
    # background job, a test harness)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    feed = live.Feed.for_run(spec)
    view = (live.LiveView(feed) if live.is_terminal() and not plain
            else live.PlainView(feed))
    began = time.monotonic()
    try:
        while not feed.final:
            view.tick(0.1)
            heard = feed.heard_at or began
            if time.monotonic() - heard > QUIET_S and _ended(run_dir):
                break
    except KeyboardInterrupt:
        view.close()
        print("dni-async watch: detached; the run goes on", file=sys.stderr)
        return 0
    view.close()
    print(_ending(run_dir, feed))
    return 0


def _ended(run_dir: str) -> bool:
    """One of the files a run leaves at its end is there (`train` removes them at its start)."""
    return any(os.path.exists(os.path.join(run_dir, name)) for name in ENDED)


def _ending(run_dir: str, feed) -> str:
    state = feed.snap["state"] if feed.snap else "ended"
    deadline = time.monotonic() + 5.0
    summary = os.path.join(run_dir, "summary.json")
    while state == "done" and not os.path.exists(summary) and time.monotonic() < deadline:
        time.sleep(0.1)      # the coordinator writes it just after its last snapshot
    if os.path.exists(summary):
        from dni_async.runtime.supervisor import summary_text
        try:
            with open(summary) as fh:
                return summary_text(json.load(fh))
        except (OSError, ValueError, KeyError):
            pass
    return f"dni-async watch: the run {state}; see {run_dir}"
