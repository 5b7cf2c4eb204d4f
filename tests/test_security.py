"""CURVE between processes: a peer without the run's keys can neither join nor inject."""

import json
import subprocess
import sys

import numpy as np
import zmq
import zmq.auth

from conftest import ROOT, cli, end_run, sent_while_running, wait_for_spec
from dni_async.oneprocess import reference
from dni_async.runtime import wire
from dni_async.config import make_config

SETTINGS = {"mode": "backprop", "epochs": 150}


def test_default_endpoints_are_local_only(tmp_path):
    from dni_async.runtime import supervisor as launch
    for transport in ("ipc", "tcp"):
        spec, ipc_dir = launch.prepare(make_config({"transport": transport}, preset="tiny"),
                                       str(tmp_path / transport))
        eps = [spec.endpoints["control"], spec.endpoints["results"], *spec.endpoints["fwd_in"],
               *filter(None, spec.endpoints["grad_in"])]
        assert all(e.startswith("ipc://") or e.startswith("tcp://127.0.0.1:") for e in eps)
        assert len(set(eps)) == len(eps), eps
        if ipc_dir:
            import shutil
            shutil.rmtree(ipc_dir)


def start_run(run, keys=None):
    extra = ["--set", f"curve_keys={keys}"] if keys else []
    return subprocess.Popen(
        [sys.executable, "-m", "dni_async", "train", "--preset", "tiny", "--transport", "tcp",
         "--mode", "backprop", "--epochs", str(SETTINGS["epochs"]), *extra,
         "--run-dir", str(run), "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def test_without_curve_an_injection_does_get_in(tmp_path, zmq_ctx):
    """The control experiment: the same kind of injection, no keys, reaches every process
    (forward-only eval messages travel the whole pipeline and are counted at the coordinator)."""
    proc = start_run(tmp_path)
    try:
        spec = wait_for_spec(tmp_path, proc)
        s = zmq_ctx.socket(zmq.PUSH)
        s.connect(spec["endpoints"]["fwd_in"][0])
        x, y = np.ones((10, 12)), np.ones((10, 6))
        for step in range(50):
            wire.send(s, spec["run_id"], "eval", 900_000 + step, [x, y])
        sent_while_running(proc)
        _, err = proc.communicate(timeout=120)
    finally:
        end_run(proc)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bad_messages"]["coordinator"] == 50


def test_intruders_without_keys_cannot_join_or_inject(tmp_path, zmq_ctx):
    keys = tmp_path / "keys"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    run = tmp_path / "run"
    proc = start_run(run, keys)
    ctx = zmq_ctx
    try:
        spec = wait_for_spec(run, proc)
        run_id, ep = spec["run_id"], spec["endpoints"]
        x, y = np.ones((10, 12)), np.ones((10, 6))
        # 1. no CURVE at all; 2. CURVE with a key the run does not know
        stranger_pub, stranger_sec = zmq.curve_keypair()
        server_pub, _ = zmq.auth.load_certificate(str(keys / "public" / "stage-0.key"))
        for curve in (False, True):
            s = ctx.socket(zmq.PUSH)
            if curve:
                s.curve_publickey, s.curve_secretkey = stranger_pub, stranger_sec
                s.curve_serverkey = server_pub
            s.setsockopt(zmq.SNDTIMEO, 200)
            s.connect(ep["fwd_in"][0])
            for step in range(50):   # well-formed, right run id: would get in without keys
                try:
                    wire.send(s, run_id, "fwd", step, [x, y])
                    wire.send(s, run_id, "eval", 900_000 + step, [x, y])
                except zmq.Again:
                    break
            s.close(linger=500)
        # 3. try to join the control plane as a stage
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.IDENTITY, b"stage-1")
        d.curve_publickey, d.curve_secretkey = stranger_pub, stranger_sec
        d.curve_serverkey = zmq.auth.load_certificate(str(keys / "public" / "coordinator.key"))[0]
        d.connect(ep["control"])
        try:
            wire.send(d, run_id, "stop", -1, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert not d.poll(1000), "the coordinator answered an unknown key"
        d.close(linger=0)
        _, err = proc.communicate(timeout=120)
    finally:
        end_run(proc)
    assert proc.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert sum(summary["bad_messages"].values()) == 0
    want = reference.train(make_config(SETTINGS, preset="tiny"), log=None)
    assert summary["weights_sha256"] == want["weights_sha256"]
