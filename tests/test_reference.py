"""The single-process reference: the seed reproduced, determinism, and what each mode learns."""

import json

import pytest

import seed_oracle
from conftest import cli
from dni_async.oneprocess import reference
from dni_async.config import make_config


def test_seed_preset_reproduces_the_post_number_for_number():
    figures, weights, _ = seed_oracle.run(3)
    s = reference.train(make_config({"epochs": 3}), log=None)
    assert [r["delta_l1"] for r in s["history"]] == [float(e) for e in figures]
    import hashlib
    assert s["weights_sha256"] == [hashlib.sha256(w.tobytes()).hexdigest() for w in weights]


def test_two_runs_are_identical():
    a = reference.train(make_config({"epochs": 4, "mode": "cdni"}, preset="tiny"), log=None)
    b = reference.train(make_config({"epochs": 4, "mode": "cdni"}, preset="tiny"), log=None)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


def test_cdni_learns_the_seed_task():
    # cDNI with the defaults passes 99% training bit accuracy between epochs 400 and 500 of
    # its 1000-epoch budget (0.977 at 400, 0.997 at 500); 550 epochs keep the test short.
    s = reference.train(make_config({"mode": "cdni", "epochs": 550}), log=None)
    assert s["final"]["train_bit_acc"] >= 0.99


def test_dni_from_h_alone_runs_and_reports_a_real_accuracy():
    s = reference.train(make_config({"mode": "dni", "epochs": 20}), log=None)
    acc = s["final"]["train_bit_acc"]
    assert 0.0 <= acc <= 1.0 and s["generators"][0]["targets_applied"] == 20 * 100
    print(f"dni (context h) after 20 epochs: train bit accuracy {acc:.4f}")


def test_float32_runs():
    s = reference.train(make_config({"dtype": "float32", "mode": "cdni"}, preset="tiny"), log=None)
    assert s["history"][-1]["loss"] == s["history"][-1]["loss"]   # not NaN


def test_reference_cli_writes_the_json_summary(tmp_path):
    out = tmp_path / "ref.json"
    r = cli("reference", "--preset", "tiny", "--mode", "backprop", "--json", out, "--quiet")
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    keys = {"epoch", "delta_l1", "loss", "train_bit_acc", "train_exact_acc", "test_bit_acc",
            "test_exact_acc"}
    assert keys <= set(s["history"][0])
    assert len(s["weights_sha256"]) == 3 and s["samples_per_s"] > 0
    assert s["config"]["mode"] == "backprop" and "wall_seconds" in s


@pytest.mark.parametrize("flags,needle", [
    (["--mode", "sideways"], "unknown mode"),
    (["--preset", "nope"], "unknown preset"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--hidden", "12,-3"], "widths must be positive"),
    (["--batch-size", "abc"], "invalid int value"),
])
def test_bad_flags_give_one_clear_error_and_status_2(flags, needle):
    r = cli("reference", *flags)
    assert r.returncode == 2
    assert needle in r.stderr
