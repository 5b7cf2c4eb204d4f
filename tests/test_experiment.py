"""The experiment command: the results table on a reduced budget (real pipelines), its files,
bad experiment files, gradient fidelity, and the seed post's DNI run."""

import os
import re

import numpy as np
import pytest

from dni_async.experiments import command as experiment
from dni_async.experiments import fidelity
from dni_async.experiments import spec as spec_mod
from dni_async.oneprocess import reference
from dni_async.oneprocess import seed_post
from dni_async.nn import stage_model
from dni_async.config import ConfigError, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "launch", "experiments", "table1-quick.toml")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DNI_ASYNC_CACHE", str(tmp_path / "cache"))


def table_rows(text: str) -> list:
    """(dataset, layers) of every row of the results table (the first table in the file)."""
    rows = re.findall(r"^\| (\S+) \| (\d+) \| [^\n]*\|$", text, flags=re.M)
    return [(d, int(n)) for d, n in rows if d not in ("dataset", "---")]


def test_quick_table_runs_the_pipeline_and_writes_every_row(tmp_path):
    """launch/experiments/table1-quick.toml end to end: 12 real pipelines, well under a minute."""
    pytest.importorskip("sklearn")
    pytest.importorskip("mnist1d")
    out = tmp_path / "results.md"
    rc = experiment.main([QUICK, "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                          "--images", str(tmp_path / "img" / "results-quick"), "--quiet"])
    assert rc == 0
    text = out.read_text()
    spec = spec_mod.load_spec(QUICK)
    want = [(d, n) for d in spec["dataset"] for n in spec["layers"]]
    assert "dni-async experiment" in text and "table1-quick.toml" in text   # names the command
    assert "| dataset | layers | backprop held-out acc | dni held-out acc | cdni held-out acc" in text
    summary_rows = table_rows(text)[:len(want)]
    assert summary_rows == want
    # every run is listed, and each ran as a real pipeline (one process per layer)
    for d, n in want:
        for mode in spec["modes"]:
            assert re.search(rf"^\| {d} \| {n} \| {mode} \| 1 \| 0\.\d{{4}} \|", text, re.M), (d, n, mode)
            summary = tmp_path / "runs" / f"{d}-{n}-{mode}-1" / "summary.json"
            assert summary.exists()
            assert len(list((tmp_path / "runs" / f"{d}-{n}-{mode}-1").glob("stage-*.npz"))) == n
    assert (tmp_path / "img" / "results-quick.png").exists() or not _have_matplotlib()


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def write_blobs(path, n=300):
    rng = np.random.RandomState(0)
    centres = rng.randn(3, 8) * 3
    labels = rng.randint(0, 3, n)
    x = centres[labels] + rng.randn(n, 8)
    cut = n * 4 // 5
    np.savez(path, x_train=x[:cut], y_train=labels[:cut], x_test=x[cut:], y_test=labels[cut:])


def write_table_spec(path, dataset, runner="pipeline", extra=""):
    path.write_text(f"""
kind = "table"
title = "blobs"
runner = "{runner}"
modes = ["backprop", "cdni"]
seeds = [1, 2]
layers = [2, 3]
width = 16
frozen_control = true
{extra}
[settings]
activation = ["relu"]
bias = true
init = "he"
output_activation = "softmax"
loss = "softmax_xent"
batch_size = 20
lr = 0.005
generator_lr = 0.0001
max_in_flight = 2
[dataset."{dataset}"]
n_train = 240
epochs = 3
""")


def test_table_on_an_npz_file_without_optional_packages(tmp_path):
    """The same machinery on a made-up .npz set: needs neither scikit-learn nor mnist1d."""
    data = tmp_path / "blobs.npz"
    write_blobs(data)
    spec_path = tmp_path / "t.toml"
    write_table_spec(spec_path, str(data))
    out = tmp_path / "r.md"
    rc = experiment.main([str(spec_path), "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                          "--json", str(tmp_path / "all.json"), "--quiet"])
    assert rc == 0
    text = out.read_text()
    assert [n for _, n in table_rows(text)[:2]] == [2, 3]
    assert "hidden frozen" in text
    # mean and spread over the two seeds, and a learnt task
    cells = re.findall(r"(\d\.\d{3}) ± (\d\.\d{3})", text)
    assert cells and all(float(m) > 0.8 for m, _ in cells[:2])
    assert (tmp_path / "all.json").exists()


def test_bad_experiment_files_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    cases = {
        'kind = "tabel"': "kind must be one of",
        'kind = "table"\nmodes = ["bp"]\n[dataset.digits]': "unknown mode",
        'kind = "table"': "needs at least one",
        'kind = "sweep"\n[settings]': "needs vary",
        'kind = "table"\nlayers = [1]\n[dataset.digits]': "layers must be",
        'kind = "table"\ncolour = 1\n[dataset.digits]': "unknown key",
        'kind = "table"\n[dataset.digits]\nlr = "fast"': "lr: cannot read",
        'kind = "fidelity"\nmodes = ["backprop"]': "modes dni and cdni only",
        "kind = ": "not valid TOML",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            spec_mod.load_spec(str(bad))
    assert experiment.main([str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read experiment" in err[0]


def test_dry_run_lists_the_table_runs(capsys):
    assert experiment.main([os.path.join(ROOT, "launch", "experiments", "table1.toml"),
                            "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "72 runs (pipeline)" in out   # 2 datasets x 4 depths x 3 modes x 3 seeds


def test_fidelity_leaves_training_unchanged_and_measures(tmp_path):
    """The measuring loop ends with the reference trainer's weights, bit for bit."""
    data = tmp_path / "blobs.npz"
    write_blobs(data)
    cfg_values = {"dataset": str(data), "n_train": 240, "hidden": [16, 16, 16],
                  "activation": ["relu"], "bias": True, "init": "he",
                  "output_activation": "softmax", "loss": "softmax_xent", "batch_size": 20,
                  "lr": 0.005, "epochs": 3, "generator_lr": 0.0001}
    for mode in ("dni", "cdni"):
        got = fidelity.train_with_fidelity(make_config({**cfg_values, "mode": mode}), every=1)
        want = reference.train(make_config({**cfg_values, "mode": mode}), log=None)
        assert got["weights_sha256"] == want["weights_sha256"]
        assert len(got["rows"]) == 3 * 12
        first, last = got["rows"][0], got["rows"][-1]
        # the generators start at zero: the first guess is zero, its error 100%
        assert first["cos"] == [0.0, 0.0, 0.0] and first["rel"] == [1.0, 1.0, 1.0]
        assert all(-1.0 <= c <= 1.0 for c in last["cos"])
        # the last hidden stage's target is the true gradient itself
        assert last["target_cos"][-1] == pytest.approx(1.0)
    assert stage_model.fidelity(np.ones(3), 2 * np.ones(3))[0] == pytest.approx(1.0)
    assert stage_model.fidelity(np.zeros(3), np.ones(3)) == (0.0, 1.0)
    with pytest.raises(ConfigError):
        fidelity.train_with_fidelity(make_config({**cfg_values, "mode": "backprop"}))


def test_fidelity_experiment_draws_its_picture(tmp_path):
    pytest.importorskip("matplotlib")
    data = tmp_path / "blobs.npz"
    write_blobs(data)
    spec = tmp_path / "f.toml"
    spec.write_text(f"""
kind = "fidelity"
runner = "reference"
modes = ["dni", "cdni"]
every = 2
[settings]
dataset = "{data}"
n_train = 240
hidden = [16, 16]
activation = ["relu"]
bias = true
init = "he"
output_activation = "softmax"
loss = "softmax_xent"
batch_size = 20
lr = 0.005
epochs = 2
generator_lr = 0.0001
""")
    img = tmp_path / "fid"
    assert experiment.main([str(spec), "--images", str(img), "--runs-dir",
                            str(tmp_path / "runs"), "--quiet"]) == 0
    assert (tmp_path / "fid.png").stat().st_size > 10_000


def test_seed_post_dni_prints_a_falling_figure_at_chance_accuracy():
    """The 2017 post's DNI run: its figure collapses while the bit accuracy stays near 0.5."""
    lines = []
    np.random.seed(5)
    want = np.random.rand()
    np.random.seed(5)
    rows = seed_post.seed_post_dni(200, every=50, log=lines.append)
    assert np.random.rand() == want                     # numpy's global stream is left alone
    assert lines[0].startswith("epoch")
    first, last = rows[0], rows[-1]
    assert first[1] > 1000 and last[1] < 1.0           # the printed figure
    assert abs(last[2] - 0.5) < 0.05 and last[3] == 0.0   # bit and exact accuracy: chance
    assert last[4] > 0.95                               # outputs stuck at 0 or 1
