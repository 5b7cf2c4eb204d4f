"""The monitor stream: what a subscriber sees of a real run agrees with the run's summary."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, end_run, wait_for_spec
from dni_async.measure.clock import CATEGORIES
from dni_async.runtime import monitor


def _watch_run(run_dir, zmq_ctx, mode, *extra, epochs=40):
    proc = subprocess.Popen([sys.executable, "-m", "dni_async", "train", "--preset", "tiny",
                             "--mode", mode, "--epochs", str(epochs), "--run-dir", str(run_dir),
                             "--quiet", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    snaps = []
    try:
        spec = wait_for_spec(run_dir, proc, settle=0.0)
        sub = monitor.subscribe(zmq_ctx, spec["endpoints"]["monitor"])
        while True:
            if sub.poll(200):
                snap = monitor.decode(sub.recv(), spec["run_id"])
                assert snap is not None
                snaps.append(snap)
                if snap["state"] in monitor.FINAL_STATES:
                    break
            elif proc.poll() is not None:
                break
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        end_run(proc)
    return spec, snaps, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("mode", ["backprop", "cdni"])
def test_stream_agrees_with_the_summary(no_leftovers, zmq_ctx, mode):
    # long enough for several snapshots (one every 0.25 s) on a fast host, where 40 epochs of
    # cdni took 0.35 s and gave 2 snapshots
    spec, snaps, summary = _watch_run(no_leftovers, zmq_ctx, mode, epochs=300)
    assert snaps[-1]["state"] == "done"
    # a subscriber that joined late misses the first snapshots, and none after that
    assert [s["seq"] for s in snaps] == list(range(snaps[0]["seq"], snaps[-1]["seq"] + 1))
    assert len(snaps) >= 3
    cfg = summary["config"]
    total = cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])
    # counts never go back, and end equal to the run's own
    done = [s["completed_batches"] for s in snaps]
    assert done == sorted(done) and done[-1] == total
    assert [s["seq"] for s in snaps] == sorted(s["seq"] for s in snaps)
    for k in range(cfg_stages(summary)):
        counts = [s["stages"][k]["batches"] for s in snaps]
        assert counts == sorted(counts), f"stage {k}: {counts}"
        assert counts[-1] == summary["stages"][k]["batches"] == total
    for s in snaps:
        assert s["mode"] == mode and s["n_stages"] == len(summary["stages"])
        assert 0 <= s["in_flight"] <= s["max_in_flight"] * (cfg["micro_batches"] if mode == "gpipe" else 1)
        assert 1 <= s["epoch"] <= cfg["epochs"]     # counted from 1, as metrics.csv
        for st in s["stages"]:
            assert set(st["shares"]) <= set(CATEGORIES)
            assert all(0.0 <= v <= 1.0 for v in st["shares"].values())
            assert sum(st["shares"].values()) <= 1.0 + 1e-9
            assert 0.0 <= st["busy"] <= 1.0
    # the final shares are the run's own time split
    for st, final in zip(snaps[-1]["stages"], summary["stages"]):
        assert st["busy"] == pytest.approx(final["busy"] / final["wall"], abs=1e-6)
    last = summary["history"][-1]
    assert snaps[-1]["test_bit_acc"] == pytest.approx(last["test_bit_acc"])
    assert snaps[-1]["recent"][-1][0] == last["epoch"] == snaps[-1]["epoch"] == cfg["epochs"]
    if mode == "cdni":
        lags = [st["lag_max"] for st in snaps[-1]["stages"][:-1]]
        assert lags == [s["counters"]["target_lag_max"] for s in summary["stages"][:-1]]
    # every stage showed the same moment at least once
    glimpses = [s["glimpse"] for s in snaps if "glimpse" in s]
    # one window a second once the stages beat: a run of a few seconds has some
    assert glimpses or snaps[-1]["elapsed_s"] < 3
    for g in glimpses:
        assert len(g["stages"]) == len(summary["stages"]) and g["t1_us"] > g["t0_us"]
        for spans in g["stages"]:
            for cat, ts, dur, step in spans:
                assert cat in CATEGORIES and ts + dur >= g["t0_us"] and ts <= g["t1_us"]


def cfg_stages(summary):
    return len(summary["stages"])


def test_slow_stage_is_recorded_and_slows_only_its_stage(no_leftovers, zmq_ctx):
    spec, snaps, summary = _watch_run(no_leftovers, zmq_ctx, "cdni", "--set", "slow_stage=1:2ms")
    assert spec["config"]["slow_stage"] == "1:2ms" and summary["config"]["slow_stage"] == "1:2ms"
    fwd = [s["times"]["forward"] / s["batches"] for s in summary["stages"]]
    assert fwd[1] >= 0.002 > max(fwd[0], fwd[2])


def test_decode_refuses_what_is_not_a_snapshot():
    assert monitor.decode(b"\x00garbage") is None
    assert monitor.decode(b"\x91\x01") is None
    import msgpack
    good = msgpack.packb({"v": monitor.VERSION, "run": "abc", "stages": []})
    assert monitor.decode(good, "abc") is not None
    assert monitor.decode(good, "other") is None
