"""Pictures of runs: `train --trace` writes the trace and the timeline, `plot` the curves."""

import json

import pytest

from conftest import cli

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for mode in ("backprop", "cdni"):
        r = cli("train", "--preset", "tiny", "--mode", mode, "--epochs", "3", "--trace",
                "--run-dir", root / mode, timeout=300)
        assert r.returncode == 0, r.stderr
        out[mode] = (root / mode, r.stdout)
    return root, out


def test_train_trace_writes_the_trace_and_the_timeline(runs):
    _, out = runs
    for mode, (run, stdout) in out.items():
        assert (run / "gantt.png").stat().st_size > 10_000
        assert f"trace: {run / 'trace.json'}" in stdout and "timeline:" in stdout
        doc = json.loads((run / "trace.json").read_text())
        xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
        work = [e for e in xs if e["name"] == "forward"]
        assert work and all(e["args"]["step"] >= 0 for e in work)     # batch numbers
        assert all("cpu_us" in e["args"] for e in xs)                 # for preemption


def test_plot_one_run_and_several(runs):
    root, out = runs
    bp, cdni = out["backprop"][0], out["cdni"][0]
    r = cli("plot", cdni)
    assert r.returncode == 0, r.stderr
    assert (cdni / "plot.png").stat().st_size > 10_000
    r = cli("plot", bp, cdni)
    assert r.returncode == 0, r.stderr
    made = list(root.glob("compare-*.png"))
    assert len(made) == 1 and f"wrote {made[0]}" in r.stdout


def test_plot_needs_finished_runs(tmp_path):
    r = cli("plot", tmp_path)
    assert r.returncode == 2 and "no finished run" in r.stderr
