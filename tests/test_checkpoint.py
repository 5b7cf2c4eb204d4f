"""Checkpoints: a lockstep run stopped or killed mid-way and resumed ends exactly where an
uninterrupted run does; a damaged checkpoint is refused in favour of the previous one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT, cli, procs_mentioning, remove_ipc_folder
from dni_async.runtime import checkpoint
from dni_async.oneprocess import reference
from dni_async.config import make_config

FLAGS = ["--mode", "backprop", "--epochs", "60"]


def uninterrupted(epochs=60):
    return reference.train(make_config({"mode": "backprop", "epochs": epochs}), log=None)


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "dni_async", "train", "--run-dir", str(run_dir),
                             "--quiet", *FLAGS, *extra], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_after_an_epoch(run_dir, flags=FLAGS, settle_s=0.0) -> tuple[str, dict]:
    """Ctrl-C once the run has logged its first epoch (and `settle_s` more): training is under
    way, whatever the machine's load (a fixed sleep may land in the start-up). Returns the
    checkpoint's folder and the coordinator's state in it."""
    err_path = run_dir.parent / f"{run_dir.name}.stderr"     # a file: no pipe left unread
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "dni_async", "train", "--run-dir",
                                 str(run_dir), "--log-every", "1", *flags], cwd=ROOT,
                                start_new_session=True, stdout=subprocess.PIPE,
                                stderr=err_file, text=True)
        for line in proc.stdout:         # ends at the first row, or when the run ends
            if line.startswith("epoch"):
                break
        time.sleep(settle_s)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=20)
    err = err_path.read_text()
    assert proc.returncode == 130, err
    assert "resume with: dni-async train --resume" in err
    folder = json.loads((run_dir / "stopped.json").read_text())["checkpoint"]
    return folder, json.loads(open(os.path.join(folder, "coordinator.json")).read())


def wait_for_checkpoints(run_dir, n, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [c for c in checkpoint.candidates(str(run_dir))
                if os.path.exists(os.path.join(c, checkpoint.MANIFEST))]
        if len(done) >= n:
            return done
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def resume(run_dir):
    r = cli("train", "--resume", run_dir, "--quiet", timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads((run_dir / "summary.json").read_text()), r.stderr


def same_run(got, want):
    assert got["weights_sha256"] == want["weights_sha256"]
    assert [h["delta_l1"] for h in got["history"]] == [h["delta_l1"] for h in want["history"]]
    assert [h["test_bit_acc"] for h in got["history"]] == [h["test_bit_acc"] for h in want["history"]]


def test_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(no_leftovers):
    interrupt_after_an_epoch(no_leftovers, ["--mode", "backprop", "--epochs", "20"])
    got, _ = resume(no_leftovers)
    same_run(got, uninterrupted(epochs=20))
    # training seconds are the whole run's; wall seconds only this leg's, and it says so
    assert got["resumed"] and got["train_seconds"] > 0


# one batch of training per epoch and a held-out set 5,000 times larger: Ctrl-C lands in an
# evaluation, after the epoch's training and before its row (a resume once skipped the rest)
EVAL_BOUND = {"mode": "backprop", "epochs": 20, "n_train": 10, "batch_size": 10,
              "n_test": 50_000}


EVAL_BOUND_FLAGS = [a for k, v in EVAL_BOUND.items() for a in ("--set", f"{k}={v}")]


def interrupt_in_an_evaluation(run_dir, *flags, settle_s=0.0):
    for attempt in range(3):        # Ctrl-C lands elsewhere now and then: try again
        tried = run_dir / f"try-{attempt}"
        folder, state = interrupt_after_an_epoch(tried, [*EVAL_BOUND_FLAGS, *flags], settle_s)
        if state["next_batch"] == 1:
            return tried, folder    # the epoch's one batch done, its evaluation cut short
    raise AssertionError("three Ctrl-Cs in a row missed the evaluation")


def test_ctrl_c_in_an_evaluation_resumes_to_the_uninterrupted_end(no_leftovers):
    run_dir, _ = interrupt_in_an_evaluation(no_leftovers)
    got, _ = resume(run_dir)
    assert [h["epoch"] for h in got["history"]] == list(range(1, 21))
    same_run(got, reference.train(make_config(EVAL_BOUND), log=None))


def test_a_resume_leaves_the_checkpoint_it_started_from_as_it_was(no_leftovers):
    # checkpointed every epoch: the resumed run's first one falls on its source's step
    run_dir, source = interrupt_in_an_evaluation(
        no_leftovers, "--checkpoint-every", "1", "--set", "keep_checkpoints=100",
        settle_s=0.15)              # past the epoch's own checkpoint, into the evaluation
    before = {f: open(os.path.join(source, f), "rb").read() for f in os.listdir(source)}
    got, _ = resume(run_dir)
    assert {f: open(os.path.join(source, f), "rb").read() for f in os.listdir(source)} == before
    same_run(got, reference.train(make_config(EVAL_BOUND), log=None))


def test_killed_run_resumes_from_its_last_periodic_checkpoint(no_leftovers):
    proc = start(no_leftovers, "--checkpoint-every", "5")
    wait_for_checkpoints(no_leftovers, 2)
    for pid in procs_mentioning(str(no_leftovers)):
        os.kill(pid, signal.SIGKILL)               # no chance to save anything more
    proc.communicate(timeout=10)
    remove_ipc_folder(no_leftovers)                # nobody was left to do it
    got, _ = resume(no_leftovers)
    same_run(got, uninterrupted())


def kill_after_checkpoints(run_dir, *flags):
    proc = start(run_dir, "--checkpoint-every", "5", *flags)
    wait_for_checkpoints(run_dir, 2)
    for pid in procs_mentioning(str(run_dir)):
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    remove_ipc_folder(run_dir)
    assert not (run_dir / "summary.json").exists()


def test_killed_gpipe_run_resumes_to_the_uninterrupted_end(no_leftovers):
    flags = ["--mode", "gpipe", "--micro-batches", "2"]
    kill_after_checkpoints(no_leftovers, *flags)
    got, _ = resume(no_leftovers)
    assert got["batches"] == 60 * 100
    assert [h["epoch"] for h in got["history"]] == list(range(1, 61))
    want = reference.train(make_config({"mode": "gpipe", "micro_batches": 2, "epochs": 60}),
                           log=None)
    same_run(got, want)      # lockstep: bit for bit


def test_killed_cdni_run_resumes_to_the_end_losing_no_target(no_leftovers):
    # with sg_trust, whose state each stage checkpoints (a resume refuses one without it)
    kill_after_checkpoints(no_leftovers, "--mode", "cdni", "--set", "sg_trust=0.1")
    got, _ = resume(no_leftovers)
    history = got["history"]
    assert got["batches"] == 60 * 100
    assert [h["epoch"] for h in history] == list(range(1, 61))
    assert all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"] and got["final"]["train_bit_acc"] > 0.55
    for st in got["stages"][:-1]:   # every batch's target: applied, dropped, or counted missing
        c = st["counters"]
        accounted = (c["targets_applied"] + c["targets_dropped"] + c["targets_missing"]
                     + st["holding"]["n_pending_targets"])
        assert accounted == 60 * 100, (st["rank"], c, st["holding"])
        assert 0.0 < st["sg_trust"] <= 1.0
    assert "sg_trust" not in got["stages"][-1]


def test_damaged_checkpoint_is_refused_and_the_previous_one_used(no_leftovers):
    proc = start(no_leftovers, "--checkpoint-every", "5")
    wait_for_checkpoints(no_leftovers, 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    remove_ipc_folder(no_leftovers)
    newest = checkpoint.candidates(str(no_leftovers))[0]
    victim = os.path.join(newest, "stage-1.npz")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    got, err = resume(no_leftovers)
    assert "refusing checkpoint" in err and "stage-1.npz is damaged" in err
    same_run(got, uninterrupted())


def test_unfinished_checkpoint_is_not_used(tmp_path):
    folder = checkpoint.folder(str(tmp_path), 10)
    os.makedirs(folder)
    checkpoint.save_arrays(os.path.join(folder, "stage-0.npz"), {"W": np.zeros(3)})
    try:
        checkpoint.latest_good(str(tmp_path), log=None)
    except checkpoint.CheckpointError as exc:
        assert "no usable checkpoint" in str(exc)
    else:
        raise AssertionError("an unfinished checkpoint was accepted")


def test_resume_without_checkpoints_is_a_clear_error(tmp_path):
    r = cli("train", "--preset", "tiny", "--run-dir", tmp_path, "--quiet")
    assert r.returncode == 0
    (tmp_path / "summary.json").unlink()     # as if it had stopped before any checkpoint
    r = cli("train", "--resume", tmp_path)
    assert r.returncode == 2 and "no usable checkpoint" in r.stderr


def test_resume_sweeps_what_a_killed_train_left(tmp_path):
    """`train` SIGKILLed during start-up: children that died before they could remove their ipc
    files, and writers killed mid-checkpoint, leave things nobody else sweeps; the resume does."""
    from dni_async.runtime import supervisor
    spec, ipc_dir = supervisor.prepare(make_config({"preset": "tiny"}), str(tmp_path))
    for ep in (spec.endpoints["control"], spec.endpoints["fwd_in"][1]):
        open(ep[len("ipc://"):], "w").close()
    half = checkpoint.folder(str(tmp_path), 20)
    os.makedirs(half)
    open(os.path.join(half, ".tmp-x"), "w").close()
    r = cli("train", "--resume", tmp_path)
    assert r.returncode == 2 and "no usable checkpoint" in r.stderr
    assert not os.path.exists(ipc_dir) and not os.path.exists(half)
