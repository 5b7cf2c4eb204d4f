"""CURVE between processes: a peer without the run's keys can neither join nor inject, and a
peer with one process's keys speaks only as that process."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zmq
import zmq.auth

from conftest import ROOT, cli, end_run, summary_after_the_run, wait_for_spec
from dni_async.oneprocess import reference
from dni_async.runtime import wire
from dni_async.runtime.security import Curve
from dni_async.config import ConfigError, make_config

SETTINGS = {"mode": "backprop", "epochs": 400}   # outlasts the injections on a fast host


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
        summary = summary_after_the_run(proc, tmp_path)
    finally:
        end_run(proc)
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


# -- identities bound to keys --------------------------------------------------------------------

def curve_socket(ctx, kind, keys, me: str, server: str, endpoint: str, identity: bytes = b""):
    """A socket that holds `me`'s keys and connects to `server`'s endpoint as a CURVE client."""
    s = ctx.socket(kind)
    s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(
        str(keys / "private" / f"{me}.key_secret"))
    s.curve_serverkey = zmq.auth.load_certificate(str(keys / "public" / f"{server}.key"))[0]
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.SNDTIMEO, 5000)
    s.connect(endpoint)
    return s


GOOD_SUMS = {"n": 10, "loss": 0.0, "delta_l1": 0.0, "units_right": 60, "units": 60,
             "rows_right": 10}


def test_a_holder_of_stage_1s_keys_speaks_only_as_stage_1(tmp_path, zmq_ctx):
    """Stage 1's keys get through every handshake, and its messages still count only where
    stage 1 may speak: evaluation batches sent as the coordinator (which would otherwise travel
    the whole pipeline and reach the coordinator), gradients sent to stage 1 as stage 2, losses
    and evaluation answers as the last stage, `done` as stage 0: each refused where it lands,
    counted there, and the weights are those of an undisturbed run."""
    keys = tmp_path / "keys"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    run = tmp_path / "run"
    proc = start_run(run, keys)
    n = 50
    try:
        spec = wait_for_spec(run, proc)
        run_id, ep = spec["run_id"], spec["endpoints"]
        as_coordinator = curve_socket(zmq_ctx, zmq.PUSH, keys, "stage-1", "stage-0",
                                      ep["fwd_in"][0])
        as_stage_2 = curve_socket(zmq_ctx, zmq.PUSH, keys, "stage-1", "stage-1", ep["grad_in"][1])
        to_results = curve_socket(zmq_ctx, zmq.PUSH, keys, "stage-1", "coordinator",
                                  ep["results"])
        x, y, g = np.ones((10, 12)), np.ones((10, 6)), np.ones((10, 16))
        for i in range(n):
            wire.send(as_coordinator, run_id, "eval", 900_000 + i, [x, y])
            wire.send(as_stage_2, run_id, "grad", i, [g])
            wire.send(to_results, run_id, "loss", i, meta={"sums": GOOD_SUMS})
            wire.send(to_results, run_id, "evalres", 900_000 + i, meta={"sums": GOOD_SUMS})
            wire.send(to_results, run_id, "done", i)
        summary = summary_after_the_run(proc, run)
    finally:
        end_run(proc)
    assert summary["bad_messages"] == {"coordinator": 3 * n, "stage-0": n, "stage-1": n,
                                       "stage-2": 0}
    assert summary["refused"]["coordinator"]["wrong_key"] == 3 * n
    assert [summary["refused"][f"stage-{k}"]["wrong_key"] for k in range(3)] == [n, n, 0]
    want = reference.train(make_config(SETTINGS, preset="tiny"), log=None)
    assert summary["weights_sha256"] == want["weights_sha256"]


def plan_by_hand(run_dir, keys, extra=()) -> str:
    """A tcp plan on loopback with keys, for processes started one by one."""
    r = cli("plan", "--preset", "tiny", "--mode", "backprop", "--epochs", 5, "--transport", "tcp",
            "--run-dir", run_dir, "--set", f"curve_keys={keys}", *extra)
    assert r.returncode == 0, r.stderr
    return str(run_dir / "config.json")


def end_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_stage_2s_name_on_the_control_plane_needs_stage_2s_key(tmp_path, zmq_ctx):
    """Stage 1's keys take stage 2's routing name before stage 2 connects and say hello as
    stage 2, then report a failure as stage 2. Both are refused: the coordinator does not take
    stage 2 for present, and does not stop on its word; it waits for stage 2's own hello until
    its start-up deadline, and names stage 2 as the one that never said it."""
    keys = tmp_path / "keys"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    path = plan_by_hand(tmp_path, keys, ["--set", "startup_timeout_s=6"])
    spec = json.loads(open(path).read())
    py = [sys.executable, "-m", "dni_async"]
    coord = subprocess.Popen([*py, "coordinator", path], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    stages = [subprocess.Popen([*py, "stage", path, "--rank", str(k)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for k in (0, 1)]
    try:
        squatter = curve_socket(zmq_ctx, zmq.DEALER, keys, "stage-1", "coordinator",
                                spec["endpoints"]["control"], identity=b"stage-2")
        wire.send(squatter, spec["run_id"], "hello", meta={"rank": 2, "pid": 1, "host": "x"})
        wire.send(squatter, spec["run_id"], "error", meta={"message": "forged by stage 1's key"})
        _, err = coord.communicate(timeout=60)
        for s in stages:
            s.wait(timeout=30)
    finally:
        end_all([coord, *stages])
    assert coord.returncode == 3, err
    assert "stage 2 did not say hello" in err, err
    assert "forged" not in err, err


def test_a_spelling_of_a_stage_name_is_not_that_stage(tmp_path, zmq_ctx):
    """Without keys a routing name is all a stage is; "stage-02" or "stage-+2" is not stage 2,
    so what comes under it (here a report of failure that would end the run) is counted, not
    believed."""
    proc = start_run(tmp_path)
    names = [b"stage-02", b"stage-+2", b"stage- 2", b"stage-0_2"]
    try:
        spec = wait_for_spec(tmp_path, proc)
        kept = []
        for name in names:
            d = zmq_ctx.socket(zmq.DEALER)
            kept.append(d)
            d.setsockopt(zmq.IDENTITY, name)
            d.connect(spec["endpoints"]["control"])
            wire.send(d, spec["run_id"], "error", meta={"message": "forged"})
        summary = summary_after_the_run(proc, tmp_path)
    finally:
        end_run(proc)
    assert summary["bad_messages"]["coordinator"] == len(names)


def test_each_connection_is_named_after_its_key(tmp_path, zmq_ctx):
    """In one process: a frame from stage 0's keys carries the name "stage-0", whatever the
    message inside claims, and `refuses` lets it in only where stage 0 may send."""
    keys = tmp_path / "keys"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    server, client = Curve(str(keys), "stage-1"), Curve(str(keys), "stage-0")
    server.start(zmq_ctx)
    try:
        pull, push = zmq_ctx.socket(zmq.PULL), zmq_ctx.socket(zmq.PUSH)
        server.server(pull)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        client.client(push, "stage-1")
        push.connect(f"tcp://127.0.0.1:{port}")
        wire.send(push, "r", "hello", meta={"rank": 2})
        frames = wire.recv_frames(pull, 10_000)
        assert frames is not None
        assert frames[0].get("User-Id") == "stage-0"
        assert not server.refuses(frames[0], "stage-0")
        assert server.refuses(frames[0], "stage-2") and server.refuses(frames[0], "coordinator")
        assert server.refused == 2
    finally:
        server.stop()


def test_two_names_sharing_one_public_key_are_refused(tmp_path):
    keys = tmp_path / "keys"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    shutil.copy(keys / "public" / "stage-1.key", keys / "public" / "stage-2.key")
    with pytest.raises(ConfigError, match="share one public key"):
        Curve(str(keys), "stage-0")
