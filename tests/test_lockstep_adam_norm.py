"""Lockstep pipelines with Adam and batch norm equal the reference bit for bit (real processes)."""

import json

import pytest

from conftest import cli
from dni_async.config import make_config
from dni_async.oneprocess import reference

SETTINGS = {"optimizer": "adam", "lr": "0.01", "batch_norm": "true", "bias": "true",
            "activation": "relu", "init": "he", "epochs": "3", "batch_size": "20",
            "lr_decay": "linear"}


@pytest.mark.parametrize("mode", ["backprop", "gpipe"])
def test_lockstep_with_adam_and_batch_norm_equals_reference(mode, no_leftovers):
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    r = cli("train", "--run-dir", no_leftovers, "--quiet", "--preset", "tiny", "--mode", mode,
            *sets, timeout=180)
    assert r.returncode == 0, r.stderr
    got = json.loads((no_leftovers / "summary.json").read_text())
    want = reference.train(make_config({**SETTINGS, "mode": mode}, preset="tiny"), log=None)
    assert got["weights_sha256"] == want["weights_sha256"]
    assert got["final"] == want["final"]
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in want["history"]]
