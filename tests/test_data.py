import numpy as np

from dni_async.data import datasets as data
from dni_async.config import make_config


def bits_to_int(rows):
    return rows.dot(2 ** np.arange(rows.shape[1] - 1, -1, -1)).astype(int)


def test_binary_addition_is_addition_msb_first():
    x, y = data.binary_addition(12, 500, np.random.RandomState(3))
    assert x.shape == (500, 24) and y.shape == (500, 12)
    left, right = bits_to_int(x[:, :12]), bits_to_int(x[:, 12:])
    assert np.array_equal(left + right, bits_to_int(y))
    assert left.max() < 2 ** 11 and right.max() < 2 ** 11


def test_held_out_set_is_drawn_from_another_seed():
    ds = data.load(make_config({}), np.random.RandomState(1))
    assert ds.x_test.shape == ds.x_train.shape
    assert not np.array_equal(ds.x_test, ds.x_train)


def test_dtype_follows_config():
    ds = data.load(make_config({"dtype": "float32"}), np.random.RandomState(1))
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.float32
