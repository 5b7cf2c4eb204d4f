"""Traces: each process's spans, merged into Chrome trace-event JSON that Perfetto opens."""

import json

import pytest

from dni_async.runtime import supervisor as launch
from dni_async.measure import trace
from dni_async.config import make_config
from dni_async.measure.clock import CATEGORIES

TINY = {"epochs": 2, "batch_size": 20}


def test_write_and_merge_synthetic_spans(tmp_path):
    trace.write_spans(tmp_path, "stage-1", 222, [("update", 1_000_050.0, 5.0, 1),
                                                 ("forward", 1_000_010.0, 20.0, 1)])
    trace.write_spans(tmp_path, "coordinator", 111, [("send", 1_000_000.0, 3.0, 1)])
    trace.write_spans(tmp_path, "stage-0", 333, [])
    out = tmp_path / "merged.json"
    trace.merge(str(tmp_path), str(out))
    doc = json.loads(out.read_text())
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in xs] == ["send", "forward", "update"]   # sorted per track
    assert xs[0]["ts"] == 0.0 and xs[1]["ts"] == 10.0                 # relative to the first
    assert doc["otherData"]["origin_us_since_epoch"] == 1_000_000.0
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {111: "coordinator", 333: "stage-0", 222: "stage-1"}


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("traced")
    cfg = make_config({**TINY, "mode": "cdni"}, preset="tiny")
    assert launch.train(cfg, run_dir=str(run_dir), quiet=True, trace=True) == 0
    out = run_dir / "trace.json"
    trace.merge(str(run_dir), str(out))
    return cfg, run_dir, json.loads(out.read_text())


def test_trace_is_chrome_trace_event_json(traced_run):
    cfg, _, doc = traced_run
    evs = doc["traceEvents"]
    xs = [e for e in evs if e["ph"] == "X"]
    assert xs
    for e in xs:
        assert {"name", "ph", "ts", "dur", "pid", "tid", "args"} <= set(e)
        assert e["name"] in CATEGORIES
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float))
        assert e["ts"] >= 0 and e["dur"] >= 0
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
    # every process is named, and every stage does real work
    meta = [e for e in evs if e["ph"] == "M" and e["name"] == "process_name"]
    names = sorted(e["args"]["name"] for e in meta)
    assert names == ["coordinator"] + [f"stage-{k}" for k in range(cfg.n_stages)]
    for m in meta:
        if m["args"]["name"].startswith("stage-"):
            cats = {e["name"] for e in xs if e["pid"] == m["pid"]}
            assert {"forward", "update"} <= cats


def test_one_track_per_stage_with_monotone_time(traced_run):
    cfg, _, doc = traced_run
    tracks = trace.tracks(doc)
    stages = {k: v for k, v in tracks.items() if (v["name"] or "").startswith("stage-")}
    assert len(stages) == cfg.n_stages
    assert len({tid for _, tid in stages}) == cfg.n_stages          # one tid per stage
    assert len({pid for pid, _ in tracks}) == cfg.n_stages + 1      # one process each + coordinator
    for t in tracks.values():
        ts = [s[1] for s in t["spans"]]
        assert ts == sorted(ts)


def test_spans_of_all_processes_share_one_clock(traced_run):
    """Stage 1 cannot start a batch before stage 0 has finished forwarding it."""
    _, _, doc = traced_run
    tracks = {v["name"]: v["spans"] for v in trace.tracks(doc).values()}
    first_fwd0 = {}
    for cat, ts, dur, step in tracks["stage-0"]:
        if cat == "forward":
            first_fwd0.setdefault(step, ts + dur)
    checked = 0
    for cat, ts, dur, step in tracks["stage-1"]:
        if cat == "forward" and step in first_fwd0:
            assert ts >= first_fwd0[step] - 1.0   # 1 us slack for rounding
            checked += 1
    assert checked > 10


def test_span_files_are_small_json(traced_run):
    _, run_dir, _ = traced_run
    files = sorted(p.name for p in run_dir.glob("trace-*.json"))
    assert files == ["trace-coordinator.json", "trace-stage-0.json", "trace-stage-1.json",
                     "trace-stage-2.json"]
    d = json.loads((run_dir / "trace-stage-0.json").read_text())
    assert set(d) == {"name", "pid", "spans"} and all(len(s) == 5 for s in d["spans"])   # + CPU us
