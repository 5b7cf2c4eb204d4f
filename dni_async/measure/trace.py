"""Timelines: each process writes its spans at exit; `merge` turns a run's into one Chrome trace.

    spans of one process   run_dir/trace-<name>.json   {"name", "pid", "spans": [[cat, ts, dur, step, cpu]]}
    merged                 {"traceEvents": [...]}       opens in Perfetto and chrome://tracing

Span start times are microseconds since the Unix epoch (see `timing.Clock`), so processes on one
machine share a clock. The merged file subtracts the earliest start (kept in `otherData`), puts
every process of every run on a track of its own ("X" complete events; pid: the OS process,
tid: 0 for the coordinator, k + 1 for stage k) and names the tracks with metadata events.
"""

from __future__ import annotations

import glob
import json
import os

PREFIX = "trace-"


def write_spans(run_dir: str, name: str, pid: int, spans) -> str:
    """Save one process's spans, (category, start_us, duration_us, step[, cpu_us]) tuples, as
    small JSON; cpu_us is the thread's CPU time inside the span (well below the duration: the
    process was preempted)."""
    path = os.path.join(run_dir, f"{PREFIX}{name}.json")
    rows = [[c, round(ts, 3), round(dur, 3), int(step), *(round(x, 1) for x in cpu[:1])]
            for c, ts, dur, step, *cpu in spans]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"name": name, "pid": int(pid), "spans": rows}, fh, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def read_spans(run_dir: str) -> list[dict]:
    """Every process's span file of a run, coordinator first, then stages in rank order."""
    out = []
    for path in glob.glob(os.path.join(run_dir, f"{PREFIX}*.json")):
        with open(path) as fh:
            out.append(json.load(fh))
    return sorted(out, key=lambda d: _order(d["name"]))


def _order(name: str) -> tuple:
    if name.startswith("stage-") and name[6:].isdigit():
        return (1, int(name[6:]))
    return (0, 0)


def events(run_dirs, labels=None) -> dict:
    """Chrome trace-event dict for one or more runs (labels prefix the track names)."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    labels = list(labels) if labels is not None else [None] * len(run_dirs)
    procs = []
    for run_dir, label in zip(run_dirs, labels):
        for proc in read_spans(run_dir):
            procs.append((label, proc))
    starts = [s[1] for _, p in procs for s in p["spans"]]
    origin = min(starts) if starts else 0.0
    evs = []
    for sort_index, (label, proc) in enumerate(procs):
        name = proc["name"]
        kind, rank = _order(name)
        pid, tid = proc["pid"], rank + 1 if kind else 0   # coordinator 0, stage k: k + 1
        title = f"{label} {name}" if label else name
        evs.append({"ph": "M", "name": "process_name", "pid": pid, "tid": tid,
                    "args": {"name": title}})
        evs.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": tid,
                    "args": {"sort_index": sort_index}})
        evs.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                    "args": {"name": name}})
        for cat, ts, dur, step, *cpu in sorted(proc["spans"], key=lambda s: s[1]):
            args = {"step": step, **({"cpu_us": cpu[0]} if cpu else {})}
            evs.append({"ph": "X", "name": cat, "cat": cat, "ts": round(ts - origin, 3),
                        "dur": dur, "pid": pid, "tid": tid, "args": args})
    return {"traceEvents": evs, "displayTimeUnit": "ms",
            "otherData": {"origin_us_since_epoch": origin,
                          "runs": [os.path.abspath(r) for r in run_dirs],
                          "labels": [lb for lb in labels]}}


def merge(run_dir, out_path: str, labels=None) -> dict:
    """Write the Chrome trace of `run_dir` (or a list of run folders) to `out_path`."""
    trace = events(run_dir, labels)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(trace, fh, separators=(",", ":"))
    os.replace(tmp, out_path)
    return trace


def tracks(trace: dict, cpu: bool = False) -> dict:
    """(pid, tid) -> {"name": track name, "spans": [(cat, ts, dur, step)]}, for plots and tests;
    with `cpu`, each span also has its CPU microseconds (None where not recorded)."""
    out: dict = {}
    for e in trace["traceEvents"]:
        key = (e["pid"], e["tid"])
        t = out.setdefault(key, {"name": None, "spans": []})
        if e["ph"] == "M" and e["name"] == "process_name":
            t["name"] = e["args"]["name"]
        elif e["ph"] == "X":
            span = (e["name"], e["ts"], e["dur"], e["args"].get("step", -1))
            t["spans"].append(span + (e["args"].get("cpu_us"),) if cpu else span)
    return out
