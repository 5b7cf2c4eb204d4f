"""Every process we start, we end: after success, Ctrl-C, a crash, a hang, a lost coordinator."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, procs_mentioning, wait_gone

LONG_RUN = ["--mode", "cdni", "--epochs", "1000"]


def start_train(run_dir, *flags, env=None, sigint=signal.SIG_DFL):
    return subprocess.Popen(
        [sys.executable, "-m", "dni_async", "train", "--run-dir", str(run_dir), *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=dict(os.environ, **(env or {})),
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def wait_running(run_dir, proc, zmq_ctx, n_procs, timeout=30):
    """Until the coordinator and every stage are up and every stage has trained a batch."""
    deadline = time.monotonic() + timeout
    while len(procs_mentioning(str(run_dir))) < n_procs or not (run_dir / "config.json").exists():
        assert time.monotonic() < deadline, "pipeline did not start"
        time.sleep(0.05)
    wait_reported(run_dir, proc, zmq_ctx, timeout)


def finish(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"train did not exit within {timeout} s")
    return proc.returncode, err


# A shell starts background jobs with SIGINT ignored; SIGINT to `train` must still stop it.
@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_ctrl_c_stops_every_process_within_2_s(no_leftovers, zmq_ctx, inherited):
    proc = start_train(no_leftovers, *LONG_RUN, sigint=inherited)
    wait_running(no_leftovers, proc, zmq_ctx, 4)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)          # what a terminal's Ctrl-C does
    rc, err = finish(proc, 5)
    assert not wait_gone(str(no_leftovers), 2.0 - (time.monotonic() - t0))
    assert rc == 130, err


def test_sigterm_to_train_alone_stops_everyone(no_leftovers, zmq_ctx):
    proc = start_train(no_leftovers, *LONG_RUN)
    wait_running(no_leftovers, proc, zmq_ctx, 4)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, 5)
    assert rc == 130, err
    assert not wait_gone(str(no_leftovers), 2.0 - (time.monotonic() - t0))


def wait_reported(run_dir, proc, zmq_ctx, timeout=30):
    """Until every stage's heartbeats have reached the coordinator (its monitor stream says)."""
    from conftest import wait_for_spec
    from dni_async.runtime import monitor
    spec = wait_for_spec(run_dir, proc, settle=0.0)
    sub = monitor.subscribe(zmq_ctx, spec["endpoints"]["monitor"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sub.poll(200):
            snap = monitor.decode(sub.recv(), spec["run_id"])
            if snap and all(st.get("batches") for st in snap["stages"]):
                return
    raise AssertionError("no heartbeat from every stage")


def test_killed_stage_fails_the_run_within_5_s_naming_it(no_leftovers, zmq_ctx):
    proc = start_train(no_leftovers, *LONG_RUN)
    wait_running(no_leftovers, proc, zmq_ctx, 4)
    victim = next(p for p in procs_mentioning(str(no_leftovers))
                  if "--rank 1" in open(f"/proc/{p}/cmdline").read().replace("\0", " "))
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    rc, err = finish(proc, 10)
    assert time.monotonic() - t0 < 5
    assert rc != 0 and "stage 1" in err and "last completed step" in err, err
    failure = json.loads((no_leftovers / "failure.json").read_text())
    assert failure["failed"] == "stage 1"
    assert failure["flight"]["stage-1"]["events"], failure     # from its heartbeats, kept by the coordinator


def test_stage_that_fails_at_start_is_named(no_leftovers):
    proc = start_train(no_leftovers, *LONG_RUN, env={"DNI_ASYNC_FAULT": "2:exit:0"})
    rc, err = finish(proc, 30)
    assert rc != 0 and "stage 2" in err, err


def test_stuck_stage_is_detected_by_application_heartbeats(no_leftovers):
    proc = start_train(no_leftovers, *LONG_RUN, env={"DNI_ASYNC_FAULT": "1:hang:3000"})
    rc, err = finish(proc, 60)
    assert rc != 0 and "stage 1" in err and "silent" in err, err
    # the hung stage cannot report any more: failure.json has what it said last
    flight = json.loads((no_leftovers / "failure.json").read_text())["flight"]
    assert flight["stage-1"]["events"] and flight["stage-1"]["reported_s_ago"] > 3.0
    assert flight["stage-0"]["reported_s_ago"] < 2.0     # a live stage's final report


def test_stages_exit_by_themselves_when_the_coordinator_dies(no_leftovers, zmq_ctx):
    from dni_async.runtime import supervisor as launch
    from dni_async.config import make_config
    spec, ipc_dir = launch.prepare(make_config({"mode": "cdni", "epochs": 1000}), str(no_leftovers))
    path = os.path.join(spec.run_dir, "config.json")
    py = [sys.executable, "-m", "dni_async"]
    stages = [subprocess.Popen([*py, "stage", path, "--rank", str(k)], cwd=ROOT,
                               stderr=subprocess.PIPE) for k in range(3)]
    coord = subprocess.Popen([*py, "coordinator", path], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_reported(no_leftovers, coord, zmq_ctx)   # past the handshake: peers time out
        assert coord.poll() is None and all(s.poll() is None for s in stages)
        t0 = time.monotonic()
        coord.kill()
        for s in stages:
            s.wait(timeout=6)
        assert time.monotonic() - t0 < 5
        assert all(s.returncode == 3 for s in stages)
    finally:
        for p in [coord, *stages]:
            if p.poll() is None:
                p.kill()
                p.wait()
        import shutil
        shutil.rmtree(ipc_dir, ignore_errors=True)


def test_children_die_with_a_killed_train(no_leftovers, zmq_ctx):
    proc = start_train(no_leftovers, *LONG_RUN)
    wait_running(no_leftovers, proc, zmq_ctx, 4)
    proc.kill()
    proc.wait()
    assert not wait_gone(str(no_leftovers), 3.0)


@pytest.mark.parametrize("mode", ["backprop", "gpipe", "cdni"])
def test_a_lost_message_ends_the_run_naming_the_step(no_leftovers, mode):
    """Stage 1 silently drops what it would send on for its 30th batch (step 29): the run
    must end with an error that names the step and where it was last seen, not hang."""
    flags = ["--preset", "tiny", "--mode", mode, "--epochs", "200", "--batch-size", "20"]
    t0 = time.monotonic()
    proc = start_train(no_leftovers, *flags, env={"DNI_ASYNC_FAULT": "1:drop:30"})
    rc, err = finish(proc, 60)
    assert rc != 0 and time.monotonic() - t0 < 60
    assert "step 29 was lost" in err, err
    assert "stage 1: received it, did not send it on" in err, err
    assert not wait_gone(str(no_leftovers), 5.0)
    failure = json.loads((no_leftovers / "failure.json").read_text())
    assert "29" in failure["open_steps"] and failure["last_completed_step"] >= 0
    # the flight record: every process's last events, and what it was holding
    flight = failure["flight"]
    assert flight["coordinator"]["holding"]["open_steps"] == failure["open_steps"]
    assert any(e.endswith("out fwd 29 to stage-0") for e in flight["coordinator"]["events"])
    events = {k: flight[f"stage-{k}"]["events"] for k in range(3)}
    assert all(events.values()), flight
    assert any(e.endswith("in  fwd 29 from stage-0") for e in events[1])
    assert any(e.endswith("dropped fwd 29 to stage-2") for e in events[1])
    assert not any(" fwd 29 " in e for e in events[2])      # the edge where it stopped
    holding = {k: flight[f"stage-{k}"]["holding"] for k in range(3)}
    if mode == "cdni":      # stage 1 still waits for the generator target of step 29
        assert 29 in holding[1]["pending_targets"] and holding[0]["held"] == []
    else:                   # the lockstep waiting table: both stages hold step 29
        assert 29 in holding[0]["held"] and 29 in holding[1]["held"]


QUICK = ["--preset", "tiny", "--mode", "backprop", "--epochs", "1000",
         "--set", "peer_timeout_s=1", "--set", "heartbeat_s=0.2"]


def test_a_stopped_coordinator_is_named_by_the_stages_that_lose_it(no_leftovers):
    """SIGSTOP the coordinator: the stages give up on it, and the failure says whom they lost,
    not only which stage happened to exit first."""
    proc = start_train(no_leftovers, *QUICK, "--checkpoint-every", "1")
    deadline = time.monotonic() + 60
    while not (no_leftovers / "checkpoints").exists():   # training, not still starting up
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
        time.sleep(0.05)
    coord = next(p for p in procs_mentioning(str(no_leftovers))
                 if " coordinator " in open(f"/proc/{p}/cmdline").read().replace("\0", " "))
    os.kill(coord, signal.SIGSTOP)
    rc, err = finish(proc, 30)
    failed = [ln for ln in err.splitlines() if "train: failed:" in ln]
    assert rc != 0 and failed and "no word from the coordinator" in failed[0], err
    failure = json.loads((no_leftovers / "failure.json").read_text())
    assert "no word from the coordinator" in failure["stage_said"]


def test_a_stage_that_never_says_hello_is_named_not_its_waiting_peers(no_leftovers):
    proc = start_train(no_leftovers, *QUICK, "--set", "startup_timeout_s=8",
                       env={"DNI_ASYNC_FAULT": "2:hang:0"})
    rc, err = finish(proc, 30)
    assert rc != 0 and "failed: stage 2 did not say hello within 8 s" in err, err


def test_a_stage_that_dies_after_its_final_report_leaves_the_run_complete(no_leftovers):
    """Killed on its way out, after its weights and report were in: the run is complete, and
    `train` says so rather than fail a run whose summary is written."""
    proc = start_train(no_leftovers, "--preset", "tiny", "--mode", "backprop",
                       env={"DNI_ASYNC_FAULT": "1:exit:final"})
    rc, err = finish(proc, 60)
    assert rc == 0, err
    assert "stage 1 exited with status 17 after the run had completed; its summary is written" \
        in err
    assert (no_leftovers / "summary.json").exists()


def test_silence_is_counted_from_the_start_not_from_each_hello():
    """Stages send nothing between hello and start: one that said hello long before the last
    stage did must not be found silent the moment the run starts."""
    from dni_async.config import make_config
    from dni_async.runtime.control import ControlPlane
    plane = ControlPlane.__new__(ControlPlane)      # its bookkeeping, without sockets
    plane.n, plane.cfg = 2, make_config({"peer_timeout_s": 1, "heartbeat_s": 0.2})
    plane.last_seen = {0: time.monotonic() - 5.0, 1: time.monotonic()}   # hellos 5 s apart
    plane.broadcast = lambda kind, meta=None: None
    plane.start()
    plane.beat_and_check(-1)                        # no "stage 0 has been silent for 5.0 s"
