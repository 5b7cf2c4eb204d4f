"""Epochs are counted from 1 wherever a user reads them: the console, metrics.csv, summary.json
(history and curve), in the pipeline and the reference alike."""

import csv
import json
import re

from conftest import cli

FLAGS = ["--preset", "tiny", "--mode", "backprop", "--epochs", "4", "--log-every", "1",
         "--eval-batches", "10"]


def console_rows(stdout: str) -> dict:
    """epoch -> the loss its console line shows."""
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"^epoch\s+(\d+)/4 .* loss (\S+) ", stdout, re.M)}


def check(stdout: str, summary: dict, csv_rows: list | None) -> None:
    shown = console_rows(stdout)
    assert sorted(shown) == [1, 2, 3, 4], stdout
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for h in history:      # the line that says "epoch N" shows epoch N's loss
        assert shown[h["epoch"]] == f"{h['loss']:.5f}"
    if csv_rows is not None:
        assert [int(r["epoch"]) for r in csv_rows] == [1, 2, 3, 4]
        assert [float(r["loss"]) for r in csv_rows] == [h["loss"] for h in history]
    curve = summary["curve"]
    assert curve[0]["epoch"] == 0 and curve[-1]["epoch"] == 4     # untrained; after epoch 4
    bpe = summary["config"]["n_train"] // summary["config"]["batch_size"]
    assert all(p["epoch"] == round(p["batches"] / bpe, 4) for p in curve)


def test_pipeline_console_csv_and_summary_count_epochs_alike(no_leftovers):
    r = cli("train", "--run-dir", no_leftovers, *FLAGS)
    assert r.returncode == 0, r.stderr
    summary = json.loads((no_leftovers / "summary.json").read_text())
    with open(no_leftovers / "metrics.csv") as fh:
        check(r.stdout, summary, list(csv.DictReader(fh)))


def test_reference_counts_epochs_as_the_pipeline_does(tmp_path):
    r = cli("reference", *FLAGS, "--json", tmp_path / "ref.json")
    assert r.returncode == 0, r.stderr
    check(r.stdout, json.loads((tmp_path / "ref.json").read_text()), None)
