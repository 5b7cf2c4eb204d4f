"""numpy's floating-point warnings are counted per process and reported once, not printed."""

import json
import warnings

import numpy as np

from conftest import cli
from dni_async.measure.float_warnings import FloatWarnings, line
from dni_async.nn.layers import sigmoid

# hidden layers frozen, generators with a learning rate that overflows them: the generators
# overflow while the loss (the last layer learns from the true gradient) stays a number
OVERFLOWS = ["--preset", "tiny", "--mode", "cdni", "--freeze-hidden", "--generator-lr", "1e30",
             "--epochs", "3"]
DIVERGES = [a for a in OVERFLOWS if a != "--freeze-hidden"]     # the loss soon is not a number
HEADLINE = "numpy floating-point warnings (counted, not printed)"


def test_counted_by_kind_inside_and_printed_nowhere():
    fp = FloatWarnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a warning printed would raise here
        with fp.counting():
            big = np.array([1e308, 1e308])
            big * 10
            big * 10
            np.array([0.0]) / np.array([0.0])
            sigmoid(np.array([-1e4]))           # expected there, and not counted
    assert fp.as_dict() == {"invalid": 1, "overflow": 2}
    assert line({"stage-1": fp.as_dict(), "stage-2": {}}) == f"{HEADLINE}: stage-1: invalid 1, overflow 2"
    assert line({"stage-1": {}}) is None


def test_a_run_that_overflows_reports_counts_once(no_leftovers):
    r = cli("train", "--run-dir", no_leftovers, *OVERFLOWS)
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr, r.stderr
    counts = json.loads((no_leftovers / "summary.json").read_text())["fp_warnings"]
    # stage 1's generator learns from the true gradient, finite, and overflows; stage 0's
    # learns from what stage 1 passes down, which may already be nan (no warning) or inf by
    # the time it arrives, so its counts depend on timing and are not pinned
    assert counts["stage-1"]["overflow"] > 0
    assert set(counts) <= {"coordinator", "stage-0", "stage-1", "stage-2"}
    said = [ln for ln in r.stdout.splitlines() if ln.startswith(HEADLINE)]
    assert said == [line(counts)]


def test_a_diverged_run_says_its_counts_in_one_line(no_leftovers):
    r = cli("train", "--run-dir", no_leftovers, *DIVERGES)
    assert r.returncode == 4, r.stderr
    assert "RuntimeWarning" not in r.stderr, r.stderr
    counts = json.loads((no_leftovers / "failure.json").read_text())["fp_warnings"]
    assert any(c.get("overflow") for c in counts.values())
    assert [ln for ln in r.stderr.splitlines() if HEADLINE in ln] == [f"dni-async: {line(counts)}"]


def test_the_reference_counts_them_too(tmp_path):
    r = cli("reference", *OVERFLOWS, "--quiet", "--json", tmp_path / "ref.json")
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr
    counts = json.loads((tmp_path / "ref.json").read_text())["fp_warnings"]
    assert counts["reference"]["overflow"] > 0
    assert r.stderr.splitlines() == [line(counts)]
