"""gpipe: micro-batches in flight, gradients summed, one update per batch.

In float64 the pipeline gives the reference's gpipe run bit for bit, and both match plain
backprop on the whole batch to rounding (the sums are taken in another order, so not bitwise).
"""

import json

import numpy as np
import pytest

from dni_async.nn import metrics
from dni_async.runtime import supervisor as launch
from dni_async.nn import network
from dni_async.oneprocess import reference
from dni_async.config import make_config

HISTORY_KEYS = ("delta_l1", "loss", "train_bit_acc", "train_exact_acc", "test_bit_acc",
                "test_exact_acc")
SETTINGS = {"bits": 6, "n_train": 240, "n_test": 120, "hidden": [24, 16, 12], "epochs": 3,
            "batch_size": 24, "micro_batches": 4, "dtype": "float64"}


def reference_weights(cfg):
    """Train in this process with the reference's own step; return every stage's W."""
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    bpe, bs = cfg.batches_per_epoch(), cfg.batch_size
    for epoch in range(cfg.epochs):
        for i in range(bpe):
            reference.train_step(models, cfg, epoch * bpe + i, ds.x_train[i * bs:(i + 1) * bs],
                                 ds.y_train[i * bs:(i + 1) * bs], metrics.empty())
    return [m.layer.W.copy() for m in models]


@pytest.fixture(scope="module")
def gpipe_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpipe")
    cfg = make_config({**SETTINGS, "mode": "gpipe"}, preset="tiny")
    assert launch.train(cfg, run_dir=str(run_dir), quiet=True) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = []
    for k in range(cfg.n_stages):
        with np.load(run_dir / f"stage-{k}.npz") as f:
            weights.append(f["W"].copy())
    return summary, weights


def test_pipeline_gpipe_equals_reference_gpipe_bit_for_bit(gpipe_run):
    got, _ = gpipe_run
    want = reference.train(make_config({**SETTINGS, "mode": "gpipe"}, preset="tiny"), log=None)
    assert got["weights_sha256"] == want["weights_sha256"]
    assert len(got["history"]) == len(want["history"]) == SETTINGS["epochs"]
    for g, w in zip(got["history"], want["history"]):
        assert {k: g[k] for k in HISTORY_KEYS} == {k: w[k] for k in HISTORY_KEYS}
    assert got["final"] == want["final"]
    assert sum(got["bad_messages"].values()) == 0


def test_gpipe_matches_whole_batch_backprop(gpipe_run):
    _, pipe_w = gpipe_run
    gpipe_w = reference_weights(make_config({**SETTINGS, "mode": "gpipe"}, preset="tiny"))
    backprop_w = reference_weights(make_config({**SETTINGS, "mode": "backprop"}, preset="tiny"))
    for k, (p, g, b) in enumerate(zip(pipe_w, gpipe_w, backprop_w)):
        assert np.array_equal(p, g), f"stage {k}: pipeline gpipe != reference gpipe"
        np.testing.assert_allclose(g, b, rtol=1e-10, atol=1e-12, err_msg=f"stage {k}")
        assert not np.array_equal(g, np.zeros_like(g))


def test_gpipe_counts_micro_batches_and_updates_once_per_batch(gpipe_run):
    got, _ = gpipe_run
    cfg = make_config({**SETTINGS, "mode": "gpipe"}, preset="tiny")
    total = cfg.epochs * cfg.batches_per_epoch() * cfg.micro_batches
    assert [s["batches"] for s in got["stages"]] == [total] * cfg.n_stages
