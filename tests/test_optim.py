"""Optimizers: SGD is the seed's step bit for bit; Adam follows its textbook rule on
per-example means; state round-trips exactly."""

import numpy as np
import pytest

from dni_async.nn import optim

RNG = np.random.RandomState(3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_is_the_seed_step_bit_for_bit(dtype):
    W, b = RNG.randn(4, 3).astype(dtype), RNG.randn(3).astype(dtype)
    gW, gb = RNG.randn(4, 3).astype(dtype), RNG.randn(3).astype(dtype)
    want_W, want_b = W - gW * 0.1, b - gb * 0.1
    opt = optim.SGD({"W": W, "b": b}, 0.1)
    opt.step({"W": gW.copy(), "b": gb.copy()}, n=10)
    assert np.array_equal(W, want_W) and np.array_equal(b, want_b)
    assert W.dtype == dtype and opt.state() == {}


def test_adam_two_steps_by_hand():
    # batch sums over n = 2 rows; lr 0.1, betas 0.9 / 0.999, eps 1e-8.
    # step 1: mean g = (0.2, -0.1); m = (0.02, -0.01), v = (4e-5, 1e-5); m_hat / sqrt(v_hat)
    #   = (1, -1), so p = (1, -2) - 0.1 * (1, -1) (up to eps) = (0.900000005, -1.90000001)
    # step 2: mean g = (-0.1, 0.3); m = (0.008, 0.021), v = (4.996e-5, 9.999e-5);
    #   m_hat = m / 0.19, v_hat = v / 0.001999; p -= 0.1 * m_hat / (sqrt(v_hat) + eps)
    #   = (0.8733663027186758, -1.9494189911200654)
    p = np.array([1.0, -2.0])
    opt = optim.Adam({"p": p}, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    opt.step({"p": np.array([0.4, -0.2])}, n=2)
    assert np.allclose(p, [0.9000000049999998, -1.900000009999999], rtol=0, atol=1e-14)
    assert np.allclose(opt.m["p"], [0.02, -0.01], rtol=1e-13)
    assert np.allclose(opt.v["p"], [4e-5, 1e-5], rtol=1e-13)
    opt.step({"p": np.array([-0.2, 0.6])}, n=2)
    assert np.allclose(p, [0.8733663027186758, -1.9494189911200654], rtol=0, atol=1e-14)
    assert np.allclose(opt.m["p"], [0.008, 0.021], rtol=1e-13)
    assert np.allclose(opt.v["p"], [4.996e-5, 9.999e-5], rtol=1e-13)
    assert opt.t == 2


def test_adam_linear_decay_shrinks_each_step_to_nothing_at_the_horizon():
    # a constant gradient makes m_hat / sqrt(v_hat) exactly 1, so each step is the lr it used
    p = np.zeros(1)
    opt = optim.Adam({"p": p}, lr=0.1, eps=0.0, decay_updates=4)
    moves = []
    for _ in range(6):
        before = p.copy()
        opt.step({"p": np.ones(1)}, n=1)
        moves.append(float(before[0] - p[0]))
    assert np.allclose(moves, [0.1, 0.075, 0.05, 0.025, 0.0, 0.0], rtol=0, atol=1e-15)


def test_adam_step_does_not_depend_on_the_batch_size_of_the_sum():
    a, b = np.ones(3), np.ones(3)
    g = RNG.randn(3)
    optim.Adam({"p": a}, 0.01).step({"p": g * 4}, n=4)
    optim.Adam({"p": b}, 0.01).step({"p": g.copy()}, n=1)
    assert np.allclose(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_keeps_the_dtype_and_skips_missing_gradients(dtype):
    W, b = np.ones((2, 2), dtype), np.ones(2, dtype)
    opt = optim.Adam({"W": W, "b": b}, 0.01)
    opt.step({"W": np.ones((2, 2), dtype), "b": None}, n=1)
    assert W.dtype == dtype and opt.m["W"].dtype == dtype
    assert np.all(W < 1) and np.array_equal(b, np.ones(2, dtype))


def test_adam_state_round_trip_continues_bit_for_bit():
    grads = [RNG.randn(5, 4) for _ in range(6)]
    p = RNG.randn(5, 4)
    a_p = p.copy()
    a = optim.Adam({"W": a_p}, 0.01, 0.8, 0.99, 1e-7)
    for g in grads[:3]:
        a.step({"W": g.copy()}, 7)
    saved = {k: np.array(v) for k, v in a.state().items()}
    b_p = a_p.copy()
    b = optim.Adam({"W": b_p}, 0.01, 0.8, 0.99, 1e-7)
    b.load_state(saved)
    assert b.t == 3
    for g in grads[3:]:
        a.step({"W": g.copy()}, 7)
        b.step({"W": g.copy()}, 7)
    assert np.array_equal(a_p, b_p)
    assert all(np.array_equal(x, y) for x, y in zip(a.state().values(), b.state().values()))


def test_adam_refuses_a_state_that_does_not_fit():
    opt = optim.Adam({"W": np.zeros((2, 3))}, 0.01)
    with pytest.raises(ValueError, match="lacks W.v"):
        opt.load_state({"t": np.array(1), "W.m": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="W.m"):
        opt.load_state({"t": np.array(1), "W.m": np.zeros((3, 2)), "W.v": np.zeros((2, 3))})


def test_make_names_the_choices():
    assert isinstance(optim.make("sgd", {}, 0.1), optim.SGD)
    assert isinstance(optim.make("adam", {}, 0.1), optim.Adam)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make("rmsprop", {}, 0.1)


@pytest.mark.parametrize("kind,decay", [("sgd", 0), ("adam", 0), ("adam", 5)])
def test_a_parameter_with_its_own_rate_steps_as_an_optimizer_of_that_rate_alone(kind, decay):
    # one optimizer with rates={"b": 0.003} must equal two: one per rate
    W, b = RNG.randn(4, 3), RNG.randn(3)
    grads = [(RNG.randn(4, 3), RNG.randn(3)) for _ in range(4)]
    extra = {"decay_updates": decay} if kind == "adam" else {}
    mixed_W, mixed_b, only_W, only_b = W.copy(), b.copy(), W.copy(), b.copy()
    mixed = optim.make(kind, {"W": mixed_W, "b": mixed_b}, 0.05, rates={"b": 0.003}, **extra)
    fast = optim.make(kind, {"W": only_W}, 0.05, **extra)
    slow = optim.make(kind, {"b": only_b}, 0.003, **extra)
    for gW, gb in grads:
        mixed.step({"W": gW.copy(), "b": gb.copy()}, n=6, scale=0.7)
        fast.step({"W": gW.copy()}, n=6, scale=0.7)
        slow.step({"b": gb.copy()}, n=6, scale=0.7)
    assert np.array_equal(mixed_W, only_W) and np.array_equal(mixed_b, only_b)
    assert not np.array_equal(mixed_b, b)


def test_a_rate_for_a_parameter_it_does_not_have_is_refused():
    with pytest.raises(ValueError, match=r"unknown parameters \['Wy'\]"):
        optim.make("adam", {"W": np.zeros(2)}, 0.1, rates={"Wy": 0.01})
