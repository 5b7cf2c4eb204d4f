"""One run of the bench, each in processes of its own: a pipeline, or the one-process reference
in a fresh interpreter with a chosen number of BLAS threads."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from dni_async.config import Config, ConfigError, make_config
from dni_async.runtime import supervisor as launch

REFERENCE_TIMEOUT_S = 3600


class BenchFailed(RuntimeError):
    pass


def mode_config(values: dict, mode: str, **extra) -> Config:
    try:
        return make_config({**values, **extra, "mode": mode})
    except ConfigError as exc:
        raise ConfigError(f"mode {mode}: {exc}") from None


def run_child(cmd: list, blas_threads: int, timeout_s: float, what: str):
    """A child interpreter with its own BLAS threads, bounded in time; BenchFailed if it fails."""
    try:
        proc = subprocess.run(cmd, env=launch.child_env(blas_threads), capture_output=True,
                              text=True, timeout=timeout_s, preexec_fn=launch._die_with_parent)
    except subprocess.TimeoutExpired:
        raise BenchFailed(f"{what} took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchFailed(f"{what} failed: {tail}")
    return proc


def _strip_weights(run_dir: str) -> None:
    for path in glob.glob(os.path.join(run_dir, "stage-*.npz")):
        os.unlink(path)


def run_pipeline(cfg: Config, run_dir: str, trace: bool = False, keep_weights: bool = False) -> dict:
    status = launch.train(cfg, run_dir=run_dir, quiet=True, trace=trace)
    if status != 0:
        raise BenchFailed(f"{cfg.mode} run in {run_dir} failed with status {status}")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    if not keep_weights:
        _strip_weights(run_dir)
    return summary


def _toml_value(v) -> str:
    return json.dumps(v)    # str, int, float, bool and lists of them read the same in TOML


def write_toml(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        for k, v in cfg.to_dict().items():
            fh.write(f"{k} = {_toml_value(v)}\n")


def run_reference(cfg: Config, folder: str, threads: int) -> dict:
    """The single-process reference in a fresh interpreter with `threads` BLAS threads."""
    os.makedirs(folder, exist_ok=True)
    toml_path = os.path.join(folder, "config.toml")
    out = os.path.join(folder, "summary.json")
    write_toml(cfg, toml_path)
    cmd = [sys.executable, "-m", "dni_async", "reference", "--config", toml_path,
           "--json", out, "--quiet"]
    run_child(cmd, threads, REFERENCE_TIMEOUT_S, "the reference run")
    with open(out) as fh:
        summary = json.load(fh)
    summary["blas_threads"] = threads
    return summary
