"""Datasets offline: shapes, one-hot labels, .npz round trip, and clear errors when a file,
a key or an optional package is missing."""

import builtins

import numpy as np
import pytest

from dni_async.data import datasets as data
from dni_async.oneprocess import reference
from dni_async.config import ConfigError, make_config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test builds the named sets into its own cache folder, never the user's."""
    monkeypatch.setenv("DNI_ASYNC_CACHE", str(tmp_path / "cache"))


def load(**settings):
    return data.load(make_config(settings), np.random.RandomState(1))


def assert_one_hot(y, classes):
    assert y.shape[1] == classes
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert np.all(y.sum(axis=1) == 1)


def test_digits_shapes_and_one_hot_labels():
    pytest.importorskip("sklearn")
    ds = load(dataset="digits", n_train=1437, n_test=1000)
    assert ds.task == "classes"
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert_one_hot(ds.y_train, 10)
    assert_one_hot(ds.y_test, 10)
    assert set(ds.y_train.argmax(axis=1)) == set(range(10))
    # standardised with the training set's statistics
    assert abs(ds.x_train.mean()) < 1e-6


def test_mnist1d_is_built_locally_with_the_packages_default_split():
    pytest.importorskip("mnist1d")
    pytest.importorskip("scipy")
    ds = load(dataset="mnist1d", n_train=4000, n_test=1000)
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert_one_hot(ds.y_train, 10)
    assert_one_hot(ds.y_test, 10)
    assert 300 < ds.y_train.sum(axis=0).min() and ds.y_train.sum(axis=0).max() < 500


def test_named_sets_do_not_depend_on_the_run_seed_and_use_the_cache(tmp_path):
    pytest.importorskip("sklearn")
    a = load(dataset="digits", seed=1)
    assert (tmp_path / "cache" / f"digits-v{data.CACHE_VERSION}.npz").exists()
    b = load(dataset="digits", seed=7)           # read back from the cache
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)


def test_mnist1d_leaves_numpys_global_generator_alone():
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    want = np.random.rand()
    np.random.seed(123)
    load(dataset="mnist1d")
    assert np.random.rand() == want


def test_n_train_and_n_test_select_rows():
    pytest.importorskip("sklearn")
    ds = load(dataset="digits", n_train=500, n_test=100, dtype="float32")
    assert ds.x_train.shape == (500, 64) and ds.x_test.shape == (100, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.float32
    with pytest.raises(ConfigError, match=r"digits has 1437 training examples.*--n-train 1437"):
        load(dataset="digits", n_train=5000)


def make_npz(path, labels_as_ints=True, **drop):
    rng = np.random.RandomState(0)
    arrays = {"x_train": rng.randn(60, 3, 4), "x_test": rng.randn(20, 3, 4),
              "y_train": rng.randint(0, 3, 60), "y_test": rng.randint(0, 3, 20)}
    if not labels_as_ints:
        arrays["y_train"] = np.eye(3)[arrays["y_train"]]
        arrays["y_test"] = np.eye(3)[arrays["y_test"]]
    for k in drop:
        arrays.pop(k)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("labels_as_ints", [True, False])
def test_npz_round_trip(tmp_path, labels_as_ints):
    path = tmp_path / "set.npz"
    arrays = make_npz(path, labels_as_ints)
    ds = load(dataset=str(path), n_train=60)
    assert ds.x_train.shape == (60, 12) and ds.x_test.shape == (20, 12)   # rows flattened
    assert np.array_equal(ds.x_train, arrays["x_train"].reshape(60, 12))
    assert_one_hot(ds.y_train, 3)
    want = arrays["y_train"] if labels_as_ints else arrays["y_train"].argmax(axis=1)
    assert np.array_equal(ds.y_train.argmax(axis=1), want)
    # and back: save_npz writes what --dataset PATH.npz reads
    again = tmp_path / "again.npz"
    data.save_npz(str(again), ds)
    ds2 = load(dataset=str(again), n_train=60)
    for k in data.NPZ_KEYS:
        assert np.array_equal(getattr(ds, k), getattr(ds2, k))


def test_missing_npz_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(dataset=str(tmp_path / "nope.npz"))


def test_npz_without_a_key_names_it(tmp_path):
    path = tmp_path / "partial.npz"
    make_npz(path, y_test=True)
    with pytest.raises(ConfigError, match=r"lacks y_test"):
        load(dataset=str(path), n_train=60)


@pytest.mark.parametrize("content", [b"not a zip file", None])
def test_unreadable_npz_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content is None:   # object arrays need pickle, which is refused
        np.savez(path, x_train=np.array([{"a": 1}] * 3, dtype=object), y_train=np.zeros(3),
                 x_test=np.zeros((1, 2)), y_test=np.zeros(1))
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="cannot read dataset file"):
        load(dataset=str(path), n_train=1, batch_size=1)


def test_npz_with_mismatched_rows_is_a_clear_error(tmp_path):
    path = tmp_path / "rows.npz"
    np.savez(path, x_train=np.zeros((10, 2)), y_train=np.zeros(9, int),
             x_test=np.zeros((3, 2)), y_test=np.zeros(3, int))
    with pytest.raises(ConfigError, match="10 x_train rows for 9 labels"):
        load(dataset=str(path), n_train=9, batch_size=3)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        load(dataset="mnist")


def _fail_import(monkeypatch, prefix):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == prefix or name.startswith(prefix + "."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.mark.parametrize("name, module", [("digits", "sklearn"), ("mnist1d", "mnist1d")])
def test_missing_optional_package_names_the_extra(monkeypatch, name, module):
    monkeypatch.setenv("DNI_ASYNC_CACHE", "off")
    _fail_import(monkeypatch, module)
    with pytest.raises(ConfigError) as err:
        load(dataset=name)
    assert "pip install 'dni-async[data]'" in str(err.value)
    assert name in str(err.value)


def test_missing_package_fails_the_cli_with_one_line(monkeypatch, capsys):
    from dni_async import cli
    monkeypatch.setenv("DNI_ASYNC_CACHE", "off")
    _fail_import(monkeypatch, "sklearn")
    rc = cli.main(["reference", "--dataset", "digits", "--epochs", "1"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dni-async[data]" in err[0]


def test_classification_trains_in_the_reference(tmp_path):
    """softmax cross-entropy, relu, biases, he init: a small separable npz set is learned."""
    rng = np.random.RandomState(0)
    centres = rng.randn(3, 8) * 3
    labels = rng.randint(0, 3, 300)
    x = centres[labels] + rng.randn(300, 8)
    path = tmp_path / "blobs.npz"
    np.savez(path, x_train=x[:240], y_train=labels[:240], x_test=x[240:], y_test=labels[240:])
    for mode in ("backprop", "dni", "cdni"):
        cfg = make_config({"dataset": str(path), "n_train": 240, "hidden": [16, 16],
                           "activation": ["relu"], "bias": True, "init": "he",
                           "output_activation": "softmax", "loss": "softmax_xent",
                           "batch_size": 20, "lr": 0.005, "epochs": 10, "mode": mode,
                           "generator_lr": 1e-3, "generator_hidden": 8,
                           "generator_normalize": True})
        s = reference.train(cfg, log=None)
        assert s["final"]["test_bit_acc"] > 0.9, (mode, s["final"])
        assert s["final"]["test_bit_acc"] == s["final"]["test_exact_acc"]
