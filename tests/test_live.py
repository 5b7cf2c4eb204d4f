"""The live view: drawn from snapshots (rendered to a string, as rich allows), plain lines
without a terminal, Ctrl-C as without it, and `watch` attaching to a run and detaching."""

import io
import os
import signal
import subprocess
import sys

from conftest import ROOT, cli, end_run, wait_for_spec, wait_gone
from test_lifecycle import finish, start_train, wait_running

from dni_async.measure import live
from dni_async.measure.clock import CATEGORIES


def snapshot(state="running", in_flight=1, seq=0, glimpse=None):
    stages = []
    for k in range(3):
        shares = {"forward": 0.1, "update": 0.05, "send": 0.05, "wait": 0.7}
        stages.append({"rank": k, "batches": 40 + seq, "shares": shares, "busy": 0.15,
                       "fresh": True, "window_s": 0.5, "held": 1 if k < 2 else 0,
                       "pending": 0, "lag_mean": None, "lag_max": None,
                       "targets_dropped": 0, "age_s": 0.1})
    snap = {"v": 1, "run": "r1", "seq": seq, "time": 0.0, "state": state, "mode": "backprop",
            "n_stages": 3, "epochs": 10, "batches_per_epoch": 20, "batch_size": 10,
            "max_in_flight": 1, "epoch": 3, "batch": 7, "completed_batches": 47 + seq,
            "in_flight": in_flight, "samples_per_s": 1234.0, "elapsed_s": 12.0, "loss": 0.5,
            "bit_acc": 0.6, "exact_acc": 0.1, "test_bit_acc": 0.55, "test_exact_acc": 0.05,
            "recent": [[0, 0.9, 0.5, 0.5], [1, 0.7, 0.55, 0.52]], "bad_messages": 0,
            "stages": stages}
    if glimpse:
        snap["glimpse"] = glimpse
    return snap


def staircase():
    """Lockstep, as a glimpse: batch 7 goes down the stages and back, one stage at a time."""
    spans = [[], [], []]
    t = 1_000_000.0
    for k in range(3):                      # forward down
        spans[k] += [["forward", t, 100.0, 7], ["send", t + 100, 20.0, 7]]
        t += 120
    for k in (1, 0):                         # gradients back up
        spans[k] += [["backward", t, 100.0, 7], ["update", t + 100, 50.0, 7]]
        t += 150
    spans[0] += [["forward", t, 100.0, 8]]
    for k in range(3):
        spans[k].append(["wait", 1_000_000.0, 0.0, -1])
    return {"t0_us": 1_000_000.0, "t1_us": t + 200, "stages": spans}


def render_text(feed, width=160):
    from rich.console import Console
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(live.render(feed, width))
    return console.export_text()


def test_view_renders_every_stage_with_its_numbers():
    feed = live.Feed(None, "r1")
    assert "waiting for the run" in render_text(feed)
    for seq in range(5):
        feed.add(snapshot(seq=seq, glimpse=staircase() if seq == 4 else None))
    text = render_text(feed)
    for k in range(3):
        assert f"stage {k}" in text
    assert "backprop" in text and "epoch 3/10" in text and "in flight 1/1" in text
    assert "1,234 samples/s" in text and "held-out 0.5500" in text
    assert "of 200 batches" in text and "25.5%" in text
    for cat in CATEGORIES:
        assert cat in text                          # the legend names every colour
    assert "one moment" in text
    # the glimpse: batch 7's digit on each stage, later on each stage going down
    lanes = [line for line in text.splitlines() if line.lstrip("│ ").startswith("stage ")][-3:]
    firsts = [line.index("7") for line in lanes]
    assert firsts == sorted(firsts) and len(set(firsts)) == 3
    assert "done" not in text.splitlines()[1]
    feed.add(snapshot(state="done", seq=6))
    assert feed.final and "· done" in render_text(feed)


def test_strip_keeps_one_column_per_fresh_heartbeat():
    feed = live.Feed(None, None)
    for seq in range(3):
        s = snapshot(seq=seq)
        s["stages"][0]["fresh"] = seq != 1
        feed.add(s)
    assert len(feed.strips[0]) == 2 and len(feed.strips[1]) == 3
    assert len(live.strip_text(feed.strips[0], 10).plain) == 10


def test_plain_lines_without_a_terminal(no_leftovers):
    r = cli("train", "--preset", "tiny", "--mode", "cdni", "--epochs", "20", "--live",
            "--run-dir", no_leftovers / "run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    said = [line for line in lines if line.startswith("live: ")]
    assert said and said[-1].startswith("live: done epoch 20/20 batch 400/400")
    assert "\x1b[" not in r.stdout                       # no terminal, no escape codes
    assert "== cdni across 3 stage processes ==" in r.stdout
    assert any(line.startswith("epoch    20/20") for line in lines)   # the usual lines too


def test_ctrl_c_with_live_as_without(no_leftovers, zmq_ctx):
    proc = start_train(no_leftovers, "--mode", "cdni", "--epochs", "1000", "--live")
    wait_running(no_leftovers, proc, zmq_ctx, 4)     # trained, so there is something to resume
    os.killpg(proc.pid, signal.SIGINT)
    rc, err = finish(proc, 10)
    assert rc == 130, err
    assert "resume with: dni-async train --resume" in err
    assert (no_leftovers / "stopped.json").exists()
    assert not wait_gone(str(no_leftovers), 3.0)


def test_watch_attaches_and_detaches_without_disturbing_the_run(no_leftovers):
    run = no_leftovers / "run"
    train = subprocess.Popen([sys.executable, "-m", "dni_async", "train", "--preset", "tiny",
                              "--mode", "backprop", "--epochs", "600", "--run-dir", str(run),
                              "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_spec(run, train, settle=0.2)
        # one watcher detaches after its first line (Ctrl-C), another stays to the end
        first = subprocess.Popen([sys.executable, "-m", "dni_async", "watch", str(run)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        line = first.stdout.readline()
        assert line.startswith("live: running"), line
        # long enough (600 epochs) that the run is still going when the watcher detaches,
        # even on a loaded machine
        assert train.poll() is None
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
        assert first.returncode == 0 and "detached; the run goes on" in err
        second = subprocess.run([sys.executable, "-m", "dni_async", "watch", str(run)],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
        assert "live: done epoch 600/600" in second.stdout
        assert "== backprop across 3 stage processes ==" in second.stdout
        out, err = train.communicate(timeout=300)
        assert train.returncode == 0, err
    finally:
        end_run(train)


def test_watch_needs_a_run_folder(tmp_path):
    r = cli("watch", tmp_path)
    assert r.returncode == 2 and "no config.json" in r.stderr
