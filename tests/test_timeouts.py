"""Timeouts that fit the work: a wide layer's evaluation and checkpoints stay within the
heartbeats, and settings whose batches would not are refused before training.

The pipeline test runs a 4096-wide layer with the default timeouts: one evaluation chunk
through it is 4096 x 4096 x 4096 multiply-adds, 1.2-1.7 s on an idle core here and 4.5 s in a
run at load average 8, where computed in one go it outlasts `peer_timeout_s` (3 s); its
checkpoint is 64 MB per copy of the weights. Modules new to this feature are imported inside
the tests, so that this file also runs (and fails for the right reason) on code without them.
"""

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import cli

WIDE = ["--mode", "backprop", "--hidden", "4096,4096", "--dtype", "float32",
        "--n-train", "50", "--n-test", "4096", "--epochs", "1", "--checkpoint-every", "1"]


def test_a_4096_wide_layer_evaluates_and_checkpoints_without_a_silent_stage(no_leftovers):
    r = cli("train", "--run-dir", no_leftovers, "--quiet", *WIDE, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "silent" not in r.stderr and "no word" not in r.stderr
    s = json.loads((no_leftovers / "summary.json").read_text())
    assert "test_bit_acc" in s["history"][0] and "test_bit_acc" in s["final"]
    assert len(s["checkpoint_seconds"]) == 1
    assert os.listdir(no_leftovers / "checkpoints") == ["step-000000005"]
    assert all(st["preflight"]["batch_s"] > 0 for st in s["stages"])


def test_a_batch_too_long_for_the_timeout_is_refused_before_training(no_leftovers):
    r = cli("train", "--run-dir", no_leftovers, "--quiet", "--mode", "backprop",
            "--hidden", "4096,4096", "--dtype", "float32", "--batch-size", "256",
            "--n-train", "512", "--epochs", "1",
            "--set", "peer_timeout_s=0.02", "--set", "heartbeat_s=0.01", timeout=120)
    assert r.returncode == 2, r.stderr
    refusals = [line for line in r.stderr.splitlines() if "set peer_timeout_s to at least" in line]
    assert refusals, r.stderr
    assert "too long for peer_timeout_s = 0.02 s" in refusals[0]
    assert "refused to start" in r.stderr
    assert not (no_leftovers / "summary.json").exists()


def test_the_refusal_names_the_timeout_to_set_and_what_else_to_lower():
    from dni_async.config import make_config
    from dni_async.runtime import preflight
    cfg = make_config({"peer_timeout_s": 3, "heartbeat_s": 0.5})
    assert preflight.verdict(cfg, 1, 0.5, 0.2, 128) is None
    line = preflight.verdict(cfg, 1, 2.0, 0.2, 128)
    assert line == ("stage 1: one batch of 10 takes 2.00 s here, too long for peer_timeout_s = "
                    "3 s (heartbeats wait for it): set peer_timeout_s to at least 4.5, or lower "
                    "batch_size")
    line = preflight.verdict(cfg, 2, 0.1, 1.31, 128)
    assert line.endswith("one evaluation block of 128 rows takes 1.31 s here, too long for "
                         "peer_timeout_s = 3 s (heartbeats wait for it): set peer_timeout_s to "
                         "at least 3.2")


def test_an_evaluation_is_cut_into_row_blocks_with_room_between(monkeypatch):
    from dni_async.nn import row_blocks
    from dni_async.nn.layers import Dense
    from dni_async.nn.stage_model import StageModel
    rng = np.random.default_rng(0)
    model = StageModel(Dense(rng.standard_normal((32, 16)), None, "tanh"), lr=0.1)
    x = rng.standard_normal((100, 32))
    assert row_blocks.rows_per_block(4096, 4096) == 128
    assert row_blocks.rows_per_block(128, 64) >= 4096     # small layers: one block per chunk
    monkeypatch.setattr(row_blocks, "MAX_BLOCK_MACS", 32 * 16 * 10)     # 10 rows a block
    calls = []
    h = row_blocks.forward(model, x, between=lambda: calls.append(1))
    assert len(calls) == 9
    np.testing.assert_allclose(h, model.forward(x), rtol=1e-13)


def test_writing_a_large_checkpoint_leaves_room_for_heartbeats(tmp_path):
    from dni_async.runtime import checkpoint
    arrays = {f"a{i}": np.full((1024, 1024), i, np.float64) for i in range(3)}   # 8 MB each
    calls = []
    path = str(tmp_path / "stage-0.npz")
    digest = checkpoint.save_arrays(path, arrays, between=lambda: calls.append(1))
    assert len(calls) >= 3 + 3            # after each array, and between blocks of hashing
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest()
    back = checkpoint.load_arrays(path)
    assert sorted(back) == sorted(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert [f for f in os.listdir(tmp_path)] == ["stage-0.npz"]     # no temporary file left


def test_the_checkpoint_deadline_grows_with_the_bytes_and_with_a_slow_disk():
    from dni_async.runtime.write_budget import ASSUMED_BYTES_PER_S, WriteBudget
    budget = WriteBudget(3.0)
    assert budget.deadline_s() == 3.0
    budget.note_size(0, 120_000)
    budget.note_size(1, 400_000_000)
    budget.note_size(2, "lots")            # not a size: ignored
    small = 3.0 + 400_120_000 / ASSUMED_BYTES_PER_S
    assert budget.deadline_s() == pytest.approx(small)
    budget.note_write(1_000_000_000, 1.0)  # a fast disk does not shorten it
    assert budget.deadline_s() == pytest.approx(small)
    budget.note_write(10_000_000, 2.0)     # a slow one (5 MB/s) lengthens it
    assert budget.deadline_s() > 3.0 + 400_120_000 / 5e6


def test_a_stage_counts_a_waiting_message_as_word_from_the_coordinator(monkeypatch):
    from dni_async.runtime import heartbeat
    now = [100.0]
    monkeypatch.setattr(heartbeat.time, "monotonic", lambda: now[0])
    sent = []
    beat = heartbeat.Heartbeat(sent.append, lambda: {"n": len(sent)}, 0.5, 3.0)
    beat.beat()
    assert sent == []
    now[0] += 0.6
    beat.beat()
    beat.beat()
    assert sent == [{"n": 0}]
    now[0] += 5.0          # long work: nothing read for 5.6 s
    assert not beat.coordinator_silent(lambda: True)     # but a heartbeat is waiting unread
    assert beat.coordinator_silent(lambda: False)
    beat.heard()
    assert not beat.coordinator_silent(lambda: False)
