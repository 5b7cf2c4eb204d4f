"""Datasets: the seed's binary addition, and offline classification sets.

    --dataset binary-addition   the seed's task, drawn here (bits, n_train, n_test)
    --dataset digits            scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn)
    --dataset mnist1d           MNIST-1D, built locally by the mnist1d package's make_dataset
    --dataset PATH.npz          any file with x_train, y_train, x_test, y_test

Binary addition is drawn exactly as the seed did, from numpy's legacy generator: left operands,
then right operands, each uniform in [0, 2^(bits-1)) so the sum fits in `bits` bits, written
most-significant bit first. The held-out set is drawn the same way from a different seed.

Classification sets come with one-hot labels (integer labels are converted) and inputs
flattened to rows. The run uses the first `n_train` training rows (it is an error to ask for
more than there are) and at most `n_test` held-out rows. The split of a named set is fixed,
whatever the run's seed, so seeds vary the weights only. digits and mnist1d need the optional
`[data]` extra; they are never downloaded. A built named set is kept in a cache folder
(`$DNI_ASYNC_CACHE`, default `~/.cache/dni-async`; `DNI_ASYNC_CACHE=off` disables it), so the
many processes of a pipeline do not each rebuild it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from dni_async.config import Config, ConfigError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
INSTALL_HINT = "pip install 'dni-async[data]'"
CACHE_VERSION = 1   # bump when a named set's preparation changes


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str   # "bits": every output unit is a 0/1 target; "classes": one-hot rows

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def output_dim(self) -> int:
        return self.y_train.shape[1]


def int_to_bits(values, bits: int) -> np.ndarray:
    """Rows of 0.0/1.0, most-significant bit first (the seed's int2vec)."""
    shifts = np.arange(bits - 1, -1, -1)
    return ((np.asarray(values)[:, None] >> shifts) & 1).astype(np.float64)


def binary_addition(bits: int, n: int, rng: np.random.RandomState):
    left = (rng.rand(n) * 2 ** (bits - 1)).astype("int")
    right = (rng.rand(n) * 2 ** (bits - 1)).astype("int")
    x = np.concatenate([int_to_bits(left, bits), int_to_bits(right, bits)], axis=1)
    y = int_to_bits(left + right, bits)
    return x, y


def held_out_rng(seed: int) -> np.random.RandomState:
    """A stream of its own for the held-out set, so drawing it leaves the weights' stream alone."""
    return np.random.RandomState([seed, 1])


def load(cfg: Config, rng: np.random.RandomState) -> Dataset:
    """The run's data; for binary addition this draws from `rng` first, as the seed did."""
    name = cfg.dataset
    if name == "binary-addition":
        x, y = binary_addition(cfg.bits, cfg.n_train, rng)
        xt, yt = binary_addition(cfg.bits, cfg.n_test, held_out_rng(cfg.seed))
        ds = Dataset(x, y, xt, yt, "bits")
    else:
        if name.endswith(".npz"):
            ds = _from_npz(name)
        elif name in NAMED:
            ds = _cached(name, NAMED[name])
        else:
            raise ConfigError(f"unknown dataset {name!r} "
                              "(binary-addition, mnist1d, digits or PATH.npz)")
        ds = _take(ds, name, cfg.n_train, cfg.n_test)
    dtype = np.dtype(cfg.dtype)
    return Dataset(ds.x_train.astype(dtype), ds.y_train.astype(dtype),
                   ds.x_test.astype(dtype), ds.y_test.astype(dtype), ds.task)


def _take(ds: Dataset, name: str, n_train: int, n_test: int) -> Dataset:
    """The first n_train training rows (all of them must exist) and at most n_test test rows."""
    have = len(ds.x_train)
    if n_train > have:
        raise ConfigError(f"dataset {name} has {have} training examples, fewer than "
                          f"n_train = {n_train}: set --n-train {have} or less")
    return Dataset(ds.x_train[:n_train], ds.y_train[:n_train],
                   ds.x_test[:n_test], ds.y_test[:n_test], ds.task)


def _one_hot(labels, n_classes=None) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).ravel()
    n_classes = n_classes or int(labels.max()) + 1
    out = np.zeros((labels.size, n_classes))
    out[np.arange(labels.size), labels] = 1.0
    return out


def _is_labels(y) -> bool:
    return np.ndim(y) == 1 or (np.ndim(y) == 2 and np.shape(y)[1] == 1)


def _classes(x, y, xt, yt, where: str = "the data") -> Dataset:
    """Rows of inputs and one-hot labels; integer labels (shape (n,) or (n, 1)) are converted."""
    x, xt = np.asarray(x), np.asarray(xt)
    y, yt = np.asarray(y), np.asarray(yt)
    for key, a in (("x_train", x), ("x_test", xt)):
        if a.ndim < 2 or not np.issubdtype(a.dtype, np.number):
            raise ConfigError(f"{where}: {key} must be a numeric array of rows, "
                              f"got shape {a.shape} of {a.dtype}")
    if len(x) != len(y) or len(xt) != len(yt):
        raise ConfigError(f"{where}: {len(x)} x_train rows for {len(y)} labels, "
                          f"{len(xt)} x_test rows for {len(yt)} labels")
    if len(x) == 0 or len(xt) == 0:
        raise ConfigError(f"{where}: needs at least one training and one test example")
    x = x.astype(np.float64).reshape(len(x), -1)
    xt = xt.astype(np.float64).reshape(len(xt), -1)
    if x.shape[1] != xt.shape[1]:
        raise ConfigError(f"{where}: x_train has {x.shape[1]} features, x_test {xt.shape[1]}")
    if _is_labels(y) != _is_labels(yt):
        raise ConfigError(f"{where}: y_train and y_test must both be labels or both one-hot")
    if _is_labels(y):
        for key, a in (("y_train", y), ("y_test", yt)):
            if not np.issubdtype(a.dtype, np.number) or np.any(a < 0) or np.any(a != np.round(a)):
                raise ConfigError(f"{where}: {key} labels must be integers >= 0")
        k = int(max(np.max(y), np.max(yt))) + 1
        y, yt = _one_hot(y, k), _one_hot(yt, k)
    elif y.ndim != 2 or yt.ndim != 2 or y.shape[1] != yt.shape[1]:
        raise ConfigError(f"{where}: y_train and y_test must be rows of the same width, "
                          f"got {y.shape} and {yt.shape}")
    return Dataset(x, np.asarray(y, np.float64), xt, np.asarray(yt, np.float64), "classes")


def _from_npz(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise ConfigError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = set(NPZ_KEYS) - set(f.files)
            if missing:
                raise ConfigError(f"dataset file {path} lacks {', '.join(sorted(missing))} "
                                  f"(it needs {', '.join(NPZ_KEYS)})")
            arrays = [f[k] for k in NPZ_KEYS]
    except (OSError, ValueError) as exc:   # not a zip, or an object array (pickle refused)
        raise ConfigError(f"cannot read dataset file {path}: {exc}") from None
    return _classes(*arrays, where=f"dataset file {path}")


def save_npz(path: str, ds: Dataset) -> None:
    """Write a dataset in the form `--dataset PATH.npz` reads."""
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)


def _standardize(x, xt):
    """Per-feature zero mean and unit spread, with the training set's statistics."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-8
    return (x - mu) / sd, (xt - mu) / sd


def _digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits: a fixed 80/20 split (1437 / 360), standardised."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(f"dataset 'digits' needs scikit-learn: {INSTALL_HINT}") from None
    d = load_digits()
    order = np.random.RandomState(12345).permutation(len(d.target))  # fixed split, any seed
    x, y = d.data[order] / 16.0, d.target[order]
    cut = int(0.8 * len(y))
    xs, xts = _standardize(x[:cut], x[cut:])
    return _classes(xs, y[:cut], xts, y[cut:], where="digits")


def _mnist1d() -> Dataset:
    """MNIST-1D with the package's default arguments (4000 / 1000, 40 features), standardised."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ConfigError(f"dataset 'mnist1d' needs the mnist1d package ({exc}): "
                          f"{INSTALL_HINT}") from None
    args = get_dataset_args()
    state = np.random.get_state()     # make_dataset seeds numpy's global generator
    try:
        d = make_dataset(args)        # built locally from templates; never downloaded
    finally:
        np.random.set_state(state)
    xs, xts = _standardize(np.asarray(d["x"], np.float64), np.asarray(d["x_test"], np.float64))
    return _classes(xs, d["y"], xts, d["y_test"], where="mnist1d")


NAMED = {"digits": _digits, "mnist1d": _mnist1d}


# --- cache of built named sets ---------------------------------------------------------------

def cache_dir() -> str | None:
    """Where built named sets are kept, or None when caching is off."""
    where = os.environ.get("DNI_ASYNC_CACHE")
    if where is not None:
        return None if where.strip().lower() in ("", "0", "off", "no") else where
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dni-async")


def _cached(name: str, build) -> Dataset:
    folder = cache_dir()
    path = os.path.join(folder, f"{name}-v{CACHE_VERSION}.npz") if folder else None
    if path and os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return Dataset(*(f[k] for k in NPZ_KEYS), "classes")
        except (OSError, ValueError, KeyError):
            pass   # a damaged cache file is rebuilt below
    ds = build()
    if path:
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=".npz")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{k: getattr(ds, k) for k in NPZ_KEYS})
            os.replace(tmp, path)   # readers see the whole file or none
        except OSError:
            if tmp and os.path.exists(tmp):   # a read-only home is no reason to fail a run
                os.unlink(tmp)
    return ds
