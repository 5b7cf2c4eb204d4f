"""Thousands of malformed messages at every inbound socket of a running lockstep pipeline:
no process crashes, every one is counted, and the weights come out bit for bit unchanged."""

import random
import subprocess
import sys

import msgpack
import numpy as np
import zmq

from conftest import ROOT, end_run, summary_after_the_run, wait_for_spec
from dni_async.oneprocess import reference
from dni_async.runtime import wire
from dni_async.config import make_config

EPOCHS = 80      # outlasts the fuzzing on a fast host
PER_SOCKET = 600


def header(run_id, **over):
    h = {"v": 1, "run": run_id, "kind": "fwd", "step": -7, "meta": {}, "arrays": []}
    h.update(over)
    return msgpack.packb(h)


def malformed(run_id, rng: random.Random, width: int):
    """One bad message, as a list of frames; every family of mistake in turn."""
    f8 = np.zeros((10, width + 3)).tobytes()        # a width no stage expects
    kinds = [
        lambda: [rng.randbytes(rng.randint(0, 64))],
        lambda: [header(run_id)[: rng.randint(1, 20)]],                        # truncated
        lambda: [b"\x81" + msgpack.packb("x" * 70_000)[:70_001]],              # oversized header
        lambda: [header(run_id, v=2)],                                         # wrong version
        lambda: [header("not-this-run")],                                      # wrong run
        lambda: [header(run_id, kind="launch-missiles")],                      # unknown kind
        lambda: [header(run_id, arrays=[["|O", [1]]]), b"\0" * 8],             # dtype not allowed
        lambda: [header(run_id, arrays=[["<f8", [10, 5]]]), b"\0" * 12],        # size mismatch
        lambda: [header(run_id, arrays=[["<f8", [-1, 3]]]), b""],              # negative dim
        lambda: [header(run_id, arrays=[["<f8", [2, 2]]])],                    # frame missing
        lambda: [header(run_id, arrays=[["<f8", [10, width + 3]], ["<f8", [10, 12]]]),
                 f8, np.zeros((10, 12)).tobytes()],                            # wrong width
        lambda: [header(run_id, kind="grad", arrays=[["<f8", [10, width + 3]]]), f8],
        lambda: [header(run_id, kind="loss", meta={"sums": "lots"})],          # unknown step
        lambda: [header(run_id, arrays=[["<f8", [1 << 40, 1 << 40]]]), b""],   # absurd size
    ]
    return rng.choice(kinds)()


def start(run_dir, mode: str, epochs: int):
    return subprocess.Popen([sys.executable, "-m", "dni_async", "train", "--mode", mode,
                             "--epochs", str(epochs), "--run-dir", str(run_dir), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fuzzing_every_inbound_socket_changes_nothing(tmp_path, zmq_ctx):
    proc = start(tmp_path, "backprop", EPOCHS)
    ctx = zmq_ctx
    sent = {}
    try:
        spec = wait_for_spec(tmp_path, proc)
        run_id, ep = spec["run_id"], spec["endpoints"]                      # let every process bind and the run begin
        targets = [(f"stage-{k}", e) for k, e in enumerate(ep["fwd_in"])]
        targets += [(f"stage-{k}", e) for k, e in enumerate(ep["grad_in"]) if e]
        targets += [("coordinator", ep["results"]), ("coordinator", ep["control"])]
        rng = random.Random(7)
        kept = []          # every socket stays open until the run ends: see sent_while_running
        for who, endpoint in targets:
            kind = zmq.DEALER if endpoint == ep["control"] else zmq.PUSH
            s = ctx.socket(kind)
            kept.append(s)
            if kind == zmq.DEALER:
                s.setsockopt(zmq.IDENTITY, b"intruder")
            s.setsockopt(zmq.SNDTIMEO, 5000)
            s.connect(endpoint)
            for _ in range(PER_SOCKET):
                s.send_multipart(malformed(run_id, rng, 24))
            sent[who] = sent.get(who, 0) + PER_SOCKET
        # A frame above the socket's size cap never reaches the process: ZeroMQ drops the
        # connection on its own (ZMQ_MAXMSGSIZE), so it is refused rather than counted.
        big = ctx.socket(zmq.PUSH)
        big.connect(ep["fwd_in"][0])
        big.send_multipart([header(run_id), b"\0" * (64 << 20)])
        summary = summary_after_the_run(proc, tmp_path)
    finally:
        end_run(proc)
    counted = summary["bad_messages"]
    assert counted == sent, (counted, sent)
    print(f"fuzz: sent {sum(sent.values())} malformed messages, counted {counted}")
    want = reference.train(make_config({"mode": "backprop", "epochs": EPOCHS}), log=None)
    assert summary["weights_sha256"] == want["weights_sha256"]


def test_well_formed_but_wrong_messages_crash_nothing_in_cdni(tmp_path, zmq_ctx):
    """Right run id and kind, wrong contents: targets of the wrong height for steps a stage
    is waiting on, loss and eval sums that are not numbers, answers to questions not asked."""
    proc = start(tmp_path, "cdni", 200)
    ctx = zmq_ctx
    to_coordinator = 0
    try:
        spec = wait_for_spec(tmp_path, proc)
        run_id, ep = spec["run_id"], spec["endpoints"]
        grad = ctx.socket(zmq.PUSH)
        grad.connect(ep["grad_in"][0])
        res = ctx.socket(zmq.PUSH)
        res.connect(ep["results"])
        bad_sums = {"n": 10, "loss": "x", "delta_l1": 1.0, "units_right": 1, "units": 1,
                    "rows_right": 1}
        for step in range(0, 3000, 3):
            wire.send(grad, run_id, "grad", step, [np.zeros((3, 128))])    # 3 rows, not 10
            wire.send(res, run_id, "evalres", 1000 * (step % 7), meta={"sums": bad_sums})
            wire.send(res, run_id, "loss", step, meta={"sums": bad_sums})
            to_coordinator += 2
        summary = summary_after_the_run(proc, tmp_path)
    finally:
        end_run(proc)
    assert summary["bad_messages"]["coordinator"] == to_coordinator
    st0 = summary["stages"][0]
    assert st0["bad_messages"] == 1000          # every wrong-height target refused
    assert st0["counters"]["targets_unknown"] == 0
    assert summary["final"]["train_bit_acc"] > 0.5
