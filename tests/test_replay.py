"""A step a stage has already run, sent to it again: refused and counted, never trained twice."""

import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from conftest import ROOT, end_run, summary_after_the_run, wait_for_spec
from dni_async.config import make_config
from dni_async.oneprocess import reference
from dni_async.runtime import monitor, replay, wire

EPOCHS = {"backprop": 200, "dni": 500}   # runs that outlast the replays on a fast host
REPLAYED = 50            # steps 0..49, each sent again to every stage's inbound data sockets
BATCHES_PER_EPOCH = 20   # tiny: 200 rows in batches of 10


def test_a_step_at_or_below_the_last_one_run_is_a_replay():
    r = replay.Replays()
    assert not r.refuses("fwd", 0)
    r.ran("fwd", 0)
    r.ran("fwd", 1)
    assert r.refuses("fwd", 1) and r.refuses("fwd", 0) and not r.refuses("fwd", 2)
    assert not r.refuses("grad", 0)      # each link keeps its own
    assert r.refused == 2


def start(run_dir, mode):
    return subprocess.Popen([sys.executable, "-m", "dni_async", "train", "--preset", "tiny",
                             "--mode", mode, "--epochs", str(EPOCHS[mode]), "--run-dir",
                             str(run_dir), "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for_batches(ctx, spec, proc, n: int) -> None:
    """Until the coordinator has seen `n` batches finish: every stage has run steps 0..n-1."""
    sub = monitor.subscribe(ctx, spec["endpoints"]["monitor"])
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before the test could replay anything"
            if sub.poll(200):
                snap = monitor.decode(sub.recv(), spec["run_id"])
                if snap and snap["completed_batches"] >= n:
                    return
        raise AssertionError(f"{n} batches did not finish within 60 s")
    finally:
        sub.close(linger=0)


@pytest.mark.parametrize("mode", ["backprop", "dni"])
def test_replayed_batches_and_gradients_are_refused(mode, tmp_path, zmq_ctx):
    """Once steps 0..49 are done, each is sent again, well-formed, as a batch to stage 0 and as
    a gradient to stages 0 and 1. A dni stage updates on receipt and would train on each batch
    twice; here each is refused and counted as a replay, every stage ran exactly the run's
    batches, no generator target went unmatched, and in backprop the weights are those of an
    undisturbed run."""
    proc = start(tmp_path, mode)
    try:
        spec = wait_for_spec(tmp_path, proc, settle=0.0)    # wait_for_batches waits for the run
        run_id, ep = spec["run_id"], spec["endpoints"]
        wait_for_batches(zmq_ctx, spec, proc, REPLAYED)
        sockets = {}
        for name, endpoint in (("fwd0", ep["fwd_in"][0]), ("grad0", ep["grad_in"][0]),
                               ("grad1", ep["grad_in"][1])):
            s = sockets[name] = zmq_ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDTIMEO, 5000)
            s.connect(endpoint)
        x, y = np.full((10, 12), 0.5), np.ones((10, 6))
        for step in range(REPLAYED):
            wire.send(sockets["fwd0"], run_id, "fwd", step, [x, y])
            wire.send(sockets["grad0"], run_id, "grad", step, [np.ones((10, 32))])
            wire.send(sockets["grad1"], run_id, "grad", step, [np.ones((10, 16))])
        summary = summary_after_the_run(proc, tmp_path)
    finally:
        end_run(proc)
    stages = summary["stages"]
    assert [s["batches"] for s in stages] == [EPOCHS[mode] * BATCHES_PER_EPOCH] * 3
    assert [s["counters"]["targets_unknown"] for s in stages] == [0, 0, 0]
    assert summary["bad_messages"] == {"coordinator": 0, "stage-0": 2 * REPLAYED,
                                       "stage-1": REPLAYED, "stage-2": 0}
    assert [s["refused"]["replayed"] for s in stages] == [2 * REPLAYED, REPLAYED, 0]
    if mode == "backprop":
        want = reference.train(make_config({"mode": mode, "epochs": EPOCHS[mode]},
                                           preset="tiny"), log=None)
        assert summary["weights_sha256"] == want["weights_sha256"]
