"""`dni-async bench` on a tiny config: it runs, prints its table, writes every figure.

Never asserts speed: timings on a shared machine are the benchmark's business, not the tests'.
"""

import json
import os

import pytest

from dni_async.measure.bench import command as bench
from dni_async.config import ConfigError
from dni_async.measure.bench import figures
from dni_async.config import make_config
from dni_async.progress import Progress, Target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "bench-tiny.toml")
MODE_KEYS = ("samples_per_s", "speedup", "bound_samples_per_s", "efficiency", "stage_busy",
             "stage_batch_ms", "lockstep_bound_samples_per_s", "time_to_target_s",
             "final_metric", "history", "alone")


# -- pure parts --------------------------------------------------------------------------------

def test_steady_rate_leaves_out_the_warmup_epochs():
    # 100 samples an epoch; the last epoch was cut short at 40 samples (a target was reached)
    hist = [{"seconds": 5.0, "samples_per_s": 20.0}, {"seconds": 6.0, "samples_per_s": 100.0},
            {"seconds": 7.0, "samples_per_s": 100.0}, {"seconds": 7.5, "samples_per_s": 80.0}]
    assert figures.steady_rate(hist, 1) == pytest.approx(240 / 2.5)
    assert figures.steady_rate(hist, 0) == pytest.approx(340 / 7.5)
    assert figures.steady_rate(hist[:1], 1) == pytest.approx(100 / 5.0)   # nothing else


def test_time_to_target_uses_training_seconds_of_the_held_out_curve():
    curve = [{"seconds": 0.0, "test_bit_acc": 0.5}, {"seconds": 2.0, "test_bit_acc": 0.6},
             {"seconds": 3.0, "test_bit_acc": 0.8}]
    assert figures.time_to({"curve": curve}, Target("test_bit_acc", 0.7)) == 3.0
    assert figures.time_to({"curve": curve}, Target("test_bit_acc", 0.9)) is None
    assert figures.final_metric({"curve": curve, "final": {}}, "test_bit_acc") == 0.8


def test_a_point_an_interrupt_cut_short_is_taken_first_on_resume():
    cfg = make_config({"eval_batches": 10, "epochs": 2})
    curve = [{"batches": 0, "seconds": 0.0, "test_bit_acc": 0.5}]
    assert not Progress(cfg, curve, 5).missing_point()      # between points
    assert Progress(cfg, curve, 10).missing_point()         # due at 10, not on the curve
    curve.append({"batches": 10, "seconds": 1.0, "test_bit_acc": 0.6})
    assert not Progress(cfg, curve, 10).missing_point()
    assert not Progress(make_config({"epochs": 2}), [], 10).missing_point()   # no cadence


@pytest.mark.parametrize("value, start, ok", [(0.45, 0.5, False), (0.51, 0.5, False),
                                              (0.59, 0.58, False), (0.6, 0.5, True)])
def test_a_target_must_clear_chance_and_the_start(value, start, ok):
    t = Target("test_bit_acc", value)
    if ok:
        figures.check_target(t, 0.5, start)
    else:
        with pytest.raises(ConfigError, match="choose at least"):
            figures.check_target(t, 0.5, start)


def test_the_verdict_compares_times_to_target():
    t = Target("test_bit_acc", 0.8)
    res = {"backprop": {"time_to_target_s": 6.0}, "cdni": {"time_to_target_s": 4.0}}
    refs = {"reference_all_cores": {"time_to_target_s": 2.0}}
    line = figures.verdict(res, refs, t)
    assert "cdni reaches test_bit_acc=0.8 in 4.0 s, lockstep backprop in 6.0 s" in line
    assert "pays 1.50x" in line and "all cores: 2.0 s" in line
    res["cdni"]["time_to_target_s"] = None
    assert "cdni does not reach" in figures.verdict(res, refs, t)


@pytest.mark.parametrize("argv, words", [
    (["--no-such-flag"], "unrecognized"),
    (["--modes", "backprop,sideways"], "sideways"),
    (["--config", "/nonexistent/x.toml"], "cannot read config"),
    (["--config", TINY, "--target", "accuracy"], "METRIC=VALUE"),
    (["--config", TINY, "--target", "test_bit_acc=0.3"], "not above chance"),
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
    # the verdict: time to a held-out target above chance and the start, on one curve per run
    assert doc["verdict"] and doc["target"]["chance"] == 0.5
    assert {"metric", "value", "start"} <= set(doc["target"])
    for r in doc["modes"].values():
        assert "time_to_target_speedup" in r
        assert r["curve"][0]["batches"] == 0 and r["curve"][0]["seconds"] == 0
        assert r["curve"][-1][doc["target"]["metric"]] == r["final_metric"]
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
