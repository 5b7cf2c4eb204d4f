"""What a run records and prints: one history row per epoch, a summary, the run folder's files.

The reference trainer and the pipeline's coordinator both use this, so their histories have
the same keys and can be compared number for number.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import tempfile
from contextlib import contextmanager

import numpy as np

from dni_async.nn import metrics

HISTORY_KEYS = ("epoch", "delta_l1", "loss", "train_bit_acc", "train_exact_acc",
                "test_bit_acc", "test_exact_acc", "seconds", "samples_per_s")


def history_row(epoch: int, train_sums: dict, test: dict | None, seconds: float,
                samples_per_s: float | None) -> dict:
    """The row of the `epoch`-th epoch, counted from 1 as the console, metrics.csv and
    summary.json all count them."""
    t = metrics.summarize(train_sums, "train")
    row = {
        "epoch": epoch,
        "delta_l1": train_sums["delta_l1"],
        "loss": t["train_loss"],
        "train_bit_acc": t["train_bit_acc"],
        "train_exact_acc": t["train_exact_acc"],
        "test_bit_acc": test["test_bit_acc"] if test else None,
        "test_exact_acc": test["test_exact_acc"] if test else None,
        "seconds": seconds,
        "samples_per_s": samples_per_s,
    }
    return row


def diverged(row: dict) -> bool:
    return row["loss"] != row["loss"] or row["loss"] in (float("inf"), float("-inf"))


DIVERGED = ("training diverged (the loss is not a number): try a smaller --generator-lr, "
            "--lr or --max-in-flight")


def log_every(cfg) -> int:
    return cfg.log_every or max(1, cfg.epochs // 20)


def format_row(row: dict, epochs: int) -> str:
    test = "" if row["test_bit_acc"] is None else (
        f"  test bit {row['test_bit_acc']:.4f} exact {row['test_exact_acc']:.3f}")
    return (f"epoch {row['epoch']:>5}/{epochs}  delta_l1 {row['delta_l1']:.6g}  "
            f"loss {row['loss']:.5f}  train bit {row['train_bit_acc']:.4f} "
            f"exact {row['train_exact_acc']:.3f}{test}  {_rate(row['samples_per_s'])}")


def _rate(samples_per_s: float | None) -> str:
    return "- samples/s" if samples_per_s is None else f"{samples_per_s:,.0f} samples/s"


def machine() -> dict:
    """Library versions and BLAS thread settings, recorded with every run."""
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "blas_threads": {k: os.environ.get(k) for k in
                         ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    for mod in ("zmq", "msgpack"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", None) or ".".join(map(str, getattr(m, "version", ())))
    if "zmq" in sys.modules:
        info["libzmq"] = sys.modules["zmq"].zmq_version()
    return info


def ensure_writable(path: str, what: str = "cannot write") -> None:
    """Create the folder of an output file if need be; refuse, before any work, if impossible."""
    from dni_async.config import ConfigError
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        pass
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{what} {path}: folder {folder} is missing or not writable")


TEMPORARY = ".tmp-"    # the prefix of atomic_write's temporary files


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename: readers never see half a file.
    A writer killed mid-way leaves the temporary file (checkpoint.discard_unfinished)."""
    with atomic_file(path) as fh:
        fh.write(data)


@contextmanager
def atomic_file(path: str):
    """A file to write in place of `path`: a temporary one beside it, fsynced and renamed over
    `path` when the block ends without an error, removed when it fails."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMPORARY)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)      # mkstemp's 0600 is for secrets; these are results
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str):
    """A JSON file's contents, or None if it is missing or not (yet, or wholly) JSON."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=_jsonable).encode())


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serializable: {type(v)}")


def write_history_csv(path: str, history: list) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(HISTORY_KEYS), extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
