"""The pipeline against the reference: real processes, real sockets, the same numbers."""

import json
import os

import numpy as np
import pytest

from conftest import cli
from dni_async.oneprocess import reference
from dni_async.config import make_config

HISTORY_KEYS = ("delta_l1", "loss", "train_bit_acc", "train_exact_acc", "test_bit_acc",
                "test_exact_acc")


def run_pipeline(run_dir, *flags, timeout=180):
    r = cli("train", "--run-dir", run_dir, "--quiet", *flags, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads((run_dir / "summary.json").read_text())


def reference_summary(**overrides):
    preset = overrides.pop("preset", "seed")
    return reference.train(make_config(overrides, preset=preset), log=None)


CASES = {
    "seed, 3 stages": ({"preset": "seed", "epochs": 2}, []),
    "seed, 2 stages": ({"preset": "seed", "epochs": 2, "hidden": "128"}, []),
    "seed, 4 stages": ({"preset": "seed", "epochs": 2, "hidden": "128,64,32"}, []),
    "mixed, 4 stages": ({"preset": "mixed", "epochs": 3}, []),
    "mixed, 2 stages tcp": ({"preset": "mixed", "epochs": 3, "hidden": "48",
                             "activation": "relu"}, ["--transport", "tcp"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lockstep_pipeline_equals_reference_bit_for_bit(case, no_leftovers):
    settings, extra = CASES[case]
    flags = ["--mode", "backprop"]
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    got = run_pipeline(no_leftovers, *flags, *extra)
    want = reference_summary(mode="backprop", **settings)
    assert got["weights_sha256"] == want["weights_sha256"]
    for g, w in zip(got["history"], want["history"]):
        assert {k: g[k] for k in HISTORY_KEYS} == {k: w[k] for k in HISTORY_KEYS}
    assert got["final"] == want["final"]
    assert sum(got["bad_messages"].values()) == 0


def test_run_folder_has_config_endpoints_metrics_and_weights(no_leftovers):
    s = run_pipeline(no_leftovers, "--preset", "tiny", "--mode", "dni")
    files = set(os.listdir(no_leftovers))
    assert {"config.json", "metrics.csv", "summary.json", "stage-0.npz", "stage-1.npz",
            "stage-2.npz"} <= files
    spec = json.loads((no_leftovers / "config.json").read_text())
    assert len(spec["endpoints"]["fwd_in"]) == 3
    ipc_dirs = {os.path.dirname(e[len("ipc://"):]) for e in spec["endpoints"]["fwd_in"]}
    assert not any(os.path.exists(d) for d in ipc_dirs), "ipc files left behind"
    lines = (no_leftovers / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 5 and lines[0].startswith("epoch,delta_l1,loss")
    w = np.load(no_leftovers / "stage-1.npz")
    assert w["W"].shape == (32, 16) and "gen0" in w.files
    assert all(st["blas_threads"] == "1" for st in s["stages"])


def test_decoupled_stages_apply_every_target_they_get(no_leftovers):
    s = run_pipeline(no_leftovers, "--preset", "tiny", "--mode", "cdni", "--max-in-flight", "4")
    batches = 5 * 20   # tiny: 200 examples in batches of 10, 5 epochs
    for st in s["stages"][:-1]:
        c = st["counters"]
        assert c["targets_applied"] + c["targets_dropped"] + c["targets_unknown"] <= batches
        assert c["targets_applied"] >= batches - 4 - c["targets_dropped"]
    assert all(0 < b <= 1 for b in s["stage_busy"])


def test_cdni_pipeline_learns_the_seed_task(no_leftovers):
    # With the defaults (generator lr 5e-4, 4 batches in flight) the reference passes 99% near
    # epoch 450; two pipeline runs on a loaded machine were at 99.96% by epoch 600, where the
    # generators' targets arrive 1-3 updates late. 600 of the demo's 1000 epochs it is.
    s = run_pipeline(no_leftovers, "--mode", "cdni", "--epochs", "600", timeout=300)
    assert s["final"]["train_bit_acc"] >= 0.99, s["final"]


def test_cdni_with_every_boundary_true_is_lockstep_backprop_on_real_processes(no_leftovers):
    """Coupled stages wait for their gradients even with 4 batches in flight: the weights are
    lockstep backprop's, to the bit."""
    got = run_pipeline(no_leftovers, "--preset", "tiny", "--mode", "cdni", "--epochs", "3",
                       "--max-in-flight", "4", "--set", "true_boundaries=0,1")
    want = reference_summary(preset="tiny", mode="backprop", epochs=3)
    assert got["weights_sha256"] == want["weights_sha256"]
    assert sum(got["bad_messages"].values()) == 0


def test_cdni_with_one_true_boundary_learns_without_a_hang(no_leftovers):
    s = run_pipeline(no_leftovers, "--mode", "cdni", "--epochs", "300", "--max-in-flight", "4",
                     "--set", "true_boundaries=1")
    assert s["final"]["train_bit_acc"] >= 0.9, s["final"]
    lags = [st["counters"] for st in s["stages"]]
    assert lags[0]["targets_applied"] > 0 and lags[1]["targets_applied"] == 0
