"""`dni-async bench` on a tiny config: it runs, prints its table, writes every figure.

Never asserts speed: timings on a shared machine are the benchmark's business, not the tests'.
"""

import json
import os

import pytest

from dni_async.measure.bench import command as bench
from dni_async.measure.bench import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "bench-tiny.toml")
MODE_KEYS = ("samples_per_s", "speedup", "bound_samples_per_s", "efficiency", "stage_busy",
             "stage_batch_ms", "lockstep_bound_samples_per_s", "time_to_target_s",
             "final_metric", "history", "alone")


# -- pure parts --------------------------------------------------------------------------------

def test_steady_rate_leaves_out_the_warmup_epochs():
    hist = [{"seconds": 5.0}, {"seconds": 6.0}, {"seconds": 7.0}]
    assert figures.steady_rate(hist, 1, 100) == pytest.approx(200 / 2.0)
    assert figures.steady_rate(hist, 0, 100) == pytest.approx(300 / 7.0)
    assert figures.steady_rate(hist[:1], 1, 100) == pytest.approx(100 / 5.0)   # nothing else


def test_time_to_target_uses_training_seconds():
    hist = [{"seconds": 1.0, "test_bit_acc": 0.5}, {"seconds": 2.0, "test_bit_acc": None},
            {"seconds": 3.0, "test_bit_acc": 0.8}]
    assert figures.time_to(hist, ("test_bit_acc", 0.7)) == 3.0
    assert figures.time_to(hist, ("test_bit_acc", 0.9)) is None


@pytest.mark.parametrize("argv, words", [
    (["--no-such-flag"], "unrecognized"),
    (["--modes", "backprop,sideways"], "sideways"),
    (["--config", "/nonexistent/x.toml"], "cannot read config"),
    (["--config", TINY, "--target", "accuracy"], "METRIC=VALUE"),
    (["--config", TINY, "--sweep", "depth=1,2"], "--sweep"),
    (["--config", TINY, "--set", "batch_size=7", "--modes", "gpipe"], "micro-batches"),
    (["--config", TINY, "--json", "/dev/null/sub/out.json"], "not writable"),
])
def test_bad_input_is_one_line_and_status_2(argv, words, capsys, tmp_path):
    assert bench.main([*argv, "--run-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "runs").exists()      # nothing started


# -- real runs ---------------------------------------------------------------------------------

def test_bench_tiny_prints_a_table_and_writes_every_key(tmp_path, capsys):
    out = tmp_path / "out.json"
    status = bench.main(["--config", TINY, "--repeats", "1", "--no-plots", "--json", str(out),
                         "--run-dir", str(tmp_path / "runs"), "--quiet"])
    text = capsys.readouterr().out
    assert status == 0
    for word in ("backprop", "gpipe", "dni", "cdni", "reference, 1 thread", "samples/s",
                 "speed-up", "bound/s", "effic.", "alone/s", "generator on"):
        assert word in text, word
    doc = json.loads(out.read_text())
    assert set(doc["modes"]) == {"backprop", "gpipe", "dni", "cdni"}
    for m, r in doc["modes"].items():
        for k in MODE_KEYS:
            assert k in r, (m, k)
        assert r["samples_per_s"] > 0 and r["bound_samples_per_s"] > 0
        assert len(r["stage_busy"]) == 3 and all(0 <= b <= 1 for b in r["stage_busy"])
        assert r["bad_messages"] == 0
    assert doc["modes"]["backprop"]["speedup"] == pytest.approx(1.0)
    # lockstep: per stage forward, backward, update; the chain is shorter than their sum
    bp = doc["modes"]["backprop"]
    assert len(bp["stage_parts_ms"]) == 3 and all(min(p) > 0 for p in bp["stage_parts_ms"])
    assert 0 < bp["lockstep_chain_ms"] < sum(bp["stage_batch_ms"])
    for r in doc["modes"].values():    # the same work timed alone, one stage at a time
        assert len(r["alone"]["stage_batch_ms"]) == 3 and r["alone"]["bound_samples_per_s"] > 0
    for key in ("reference", "reference_all_cores"):
        assert doc[key]["samples_per_s"] > 0
    assert doc["reference_all_cores"]["blas_threads"] == os.cpu_count()
    assert doc["machine"]["cores"] == os.cpu_count()
    assert {"numpy", "pyzmq", "libzmq", "python", "blas_threads"} <= set(doc["machine"])
    assert doc["generator"]["cdni"]["context"] == "hy"
    # same layout, data and initial weights: lockstep modes end on the same weights
    assert doc["modes"]["backprop"]["weights_sha256"] == doc["reference"]["weights_sha256"]
    # weights are not kept unless asked
    assert not list((tmp_path / "runs").glob("*/stage-*.npz"))


def test_bench_trace_sweep_and_plots(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:    # an optional extra: the rest must work without it
        plots = False
    out = tmp_path / "b.json"
    tr = tmp_path / "t.json"
    status = bench.main(["--config", TINY, "--modes", "backprop,cdni", "--repeats", "1",
                         "--no-reference", "--trace", str(tr), "--sweep", "width=8,16",
                         "--json", str(out), "--run-dir", str(tmp_path / "runs"), "--quiet",
                         "--plots" if plots else "--no-plots"])
    text = capsys.readouterr().out
    assert status == 0
    assert "sweep" in text and "trace:" in text
    doc = json.loads(out.read_text())
    assert set(doc["trace"]["overhead"]) == {"backprop", "cdni"}
    events = json.loads(tr.read_text())["traceEvents"]
    titles = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert {"backprop stage-0", "cdni stage-2", "cdni coordinator"} <= titles
    assert {"forward", "backward", "update", "send"} <= {e["name"] for e in events}
    pts = doc["sweep"]["points"]
    assert [p["value"] for p in pts] == [8, 16]
    assert all(set(p["modes"]) == {"backprop", "cdni"} for p in pts)
    assert all("alone" in p["modes"]["cdni"] for p in pts)
    if not plots:
        return
    for kind in ("gantt", "metric", "sweep"):
        path = doc["plots"][kind]
        assert path == str(tmp_path / f"b-{kind}.png") and os.path.getsize(path) > 1000


def test_bench_wire_alone(tmp_path, capsys, monkeypatch):
    from dni_async.measure import wirebench
    monkeypatch.setattr(wirebench, "SIZES", (1 << 10, 1 << 20))
    out = tmp_path / "w.json"
    status = bench.main(["--wire", "--json", str(out), "--run-dir", str(tmp_path / "runs"),
                         "--quiet"])
    assert status == 0
    assert "wire layer vs raw pyzmq" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert "modes" not in doc
    assert [w["bytes"] for w in doc["wire"]] == [1 << 10, 1 << 20]
    for w in doc["wire"]:
        for k in ("latency_us", "raw_latency_us", "bandwidth_MiBps", "raw_bandwidth_MiBps"):
            assert w[k] > 0
