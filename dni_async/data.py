"""Datasets: the seed's binary addition, and offline classification sets.

Binary addition is drawn exactly as the seed did, from numpy's legacy generator: left operands,
then right operands, each uniform in [0, 2^(bits-1)) so the sum fits in `bits` bits, written
most-significant bit first. The held-out set is drawn the same way from a different seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dni_async.config import Config, ConfigError


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
    elif name.endswith(".npz"):
        ds = _from_npz(name)
    elif name == "digits":
        ds = _digits(cfg.seed)
    elif name == "mnist1d":
        ds = _mnist1d(cfg.seed)
    else:
        raise ConfigError(f"unknown dataset {name!r} (binary-addition, mnist1d, digits or PATH.npz)")
    dtype = np.dtype(cfg.dtype)
    return Dataset(ds.x_train.astype(dtype), ds.y_train.astype(dtype),
                   ds.x_test.astype(dtype), ds.y_test.astype(dtype), ds.task)


def _one_hot(labels, n_classes=None) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).ravel()
    n_classes = n_classes or int(labels.max()) + 1
    out = np.zeros((labels.size, n_classes))
    out[np.arange(labels.size), labels] = 1.0
    return out


def _classes(x, y, xt, yt) -> Dataset:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    xt = np.asarray(xt, np.float64).reshape(len(xt), -1)
    if np.ndim(y) == 1 or np.shape(y)[1] == 1:
        k = int(max(np.max(y), np.max(yt))) + 1
        y, yt = _one_hot(y, k), _one_hot(yt, k)
    return Dataset(x, np.asarray(y, np.float64), xt, np.asarray(yt, np.float64), "classes")


def _from_npz(path: str) -> Dataset:
    if not os.path.exists(path):
        raise ConfigError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise ConfigError(f"{path} lacks {', '.join(sorted(missing))}")
            return _classes(f["x_train"], f["y_train"], f["x_test"], f["y_test"])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _standardize(x, xt):
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-8
    return (x - mu) / sd, (xt - mu) / sd


def _digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("dataset 'digits' needs scikit-learn: pip install 'dni-async[data]'") from None
    d = load_digits()
    order = np.random.RandomState(12345).permutation(len(d.target))  # fixed split, any seed
    x, y = d.data[order] / 16.0, d.target[order]
    cut = int(0.8 * len(y))
    xs, xts = _standardize(x[:cut], x[cut:])
    return _classes(xs, y[:cut], xts, y[cut:])


def _mnist1d(seed: int) -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ConfigError("dataset 'mnist1d' needs the mnist1d package: pip install 'dni-async[data]'") from None
    args = get_dataset_args()
    d = make_dataset(args)  # built locally from templates; never downloaded
    xs, xts = _standardize(np.asarray(d["x"], np.float64), np.asarray(d["x_test"], np.float64))
    return _classes(xs, d["y"], xts, d["y_test"])
