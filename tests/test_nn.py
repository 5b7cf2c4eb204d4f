"""Finite-difference checks for every piece of math the stages run."""

import numpy as np
import pytest

from dni_async import nn

RNG = np.random.RandomState(0)


def numeric_grad(f, p, eps=1e-6):
    g = np.zeros_like(p)
    it = np.nditer(p, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = p[i]
        p[i] = old + eps
        fp = f()
        p[i] = old - eps
        fm = f()
        p[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def close(a, b, tol=1e-6):
    return np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_gradients_match_finite_differences(act, bias):
    x = RNG.randn(5, 4)
    layer = nn.Dense(RNG.randn(4, 3) * 0.5, RNG.randn(3) * 0.1 if bias else None, act)
    r = RNG.randn(5, 3)   # L = sum(r * h): dL/dh = r

    def loss():
        return float(np.sum(r * layer.forward(x)))

    h = layer.forward(x)
    delta = layer.delta(h, r)
    gW, gb = layer.gradients(x, delta)
    assert close(gW, numeric_grad(loss, layer.W))
    if bias:
        assert close(gb, numeric_grad(loss, layer.b))
    assert close(layer.grad_input(delta), numeric_grad(loss, x))


@pytest.mark.parametrize("loss_name,act", [("squared", "sigmoid"), ("squared", "tanh"),
                                           ("squared", "identity"), ("softmax_xent", "softmax")])
def test_output_delta_is_dloss_da(loss_name, act):
    a = RNG.randn(6, 5)
    y = (RNG.rand(6, 5) > 0.5).astype(float)
    if loss_name == "softmax_xent":
        y = np.eye(5)[RNG.randint(0, 5, 6)]
    f = nn.ACTIVATIONS[act][0]
    out = f(a)
    delta = nn.output_delta(loss_name, act, out, y)
    num = numeric_grad(lambda: nn.loss_sum(loss_name, f(a), y), a)
    assert close(delta, num)


def test_update_is_sgd_on_batch_sums():
    x, W = RNG.randn(3, 2), RNG.randn(2, 2)
    layer = nn.Dense(W.copy(), None, "identity")
    delta = RNG.randn(3, 2)
    layer.update(x, delta, 0.5)
    assert np.array_equal(layer.W, W - x.T.dot(delta) * 0.5)


@pytest.mark.parametrize("hidden,batch_norm", [(0, False), (7, False), (7, True)])
@pytest.mark.parametrize("normalize", ["none", "batch", "example"])
def test_generator_step_follows_its_squared_error_gradient(hidden, batch_norm, normalize):
    c, t = RNG.randn(8, 5), RNG.randn(8, 3)
    gen = nn.Generator(5, 3, lr=1e-3, dtype=np.float64, hidden=hidden,
                       rng=np.random.RandomState(1), batch_norm=batch_norm, normalize=normalize)
    for p in gen.params():          # move off the zero start so every path is exercised
        p += RNG.randn(*p.shape) * 0.1
    before = [p.copy() for p in gen.params()]

    def loss():
        return 0.5 * float(np.sum((gen.predict(c)[0] - t) ** 2))

    nums = [numeric_grad(loss, p) for p in gen.params()]
    g_hat, cache = gen.predict(c)
    sq = gen.update(cache, g_hat, t)
    assert sq == pytest.approx(2 * 0.5 * np.sum((g_hat - t) ** 2))
    for p0, p1, num in zip(before, gen.params(), nums):
        assert close((p0 - p1) / gen.lr, num, tol=1e-5)
    assert gen.steps == 1


def _labels(kind, rows, n):
    if kind == "one-hot":        # classes, one per row (one class left out: an empty group)
        return np.eye(n)[RNG.randint(0, n - 1, rows)]
    return (RNG.rand(rows, n) > 0.5).astype(float)          # bits: any number per row


@pytest.mark.parametrize("hidden", [0, 7])
@pytest.mark.parametrize("normalize", ["none", "example"])
@pytest.mark.parametrize("labels", ["one-hot", "bits"])
def test_per_label_generator_step_follows_its_squared_error_gradient(hidden, normalize, labels):
    h, y, t = RNG.randn(9, 5), _labels(labels, 9, 4), RNG.randn(9, 5)
    c = nn.context("hy", h, y)
    gen = nn.Generator(9, 5, lr=1e-3, dtype=np.float64, hidden=hidden, per_label=4,
                       rng=np.random.RandomState(1), normalize=normalize)
    assert gen.Wy.shape == (4, 5, 5) and "Wy" in gen.named_params()
    for p in gen.params():
        p += RNG.randn(*p.shape) * 0.1
    before = [p.copy() for p in gen.params()]

    def loss():
        return 0.5 * float(np.sum((gen.predict(c, y)[0] - t) ** 2))

    nums = [numeric_grad(loss, p) for p in gen.params()]
    g_hat, cache = gen.predict(c, y)
    gen.update(cache, g_hat, t)
    for p0, p1, num in zip(before, gen.params(), nums):
        assert close((p0 - p1) / gen.lr, num, tol=1e-5)


@pytest.mark.parametrize("labels", ["one-hot", "bits"])
def test_per_label_generator_is_the_linear_generator_over_h_y_and_their_outer_product(labels):
    h, y = RNG.randn(6, 3), _labels(labels, 6, 4)
    gen = nn.Generator(7, 2, lr=1e-3, dtype=np.float64, per_label=4)
    for p in gen.params():
        p += RNG.randn(*p.shape)
    dense = nn.Generator(7 + 3 * 4, 2, lr=1e-3, dtype=np.float64)
    dense.b2[:] = gen.b2
    dense.W2[:7] = gen.W2
    dense.W2[7:] = gen.Wy.transpose(1, 0, 2).reshape(3 * 4, 2)   # row i * 4 + k: h_i y_k
    outer = (h[:, :, None] * y[:, None, :]).reshape(6, -1)
    want, _ = dense.predict(np.concatenate([h, y, outer], axis=1))
    got, _ = gen.predict(nn.context("hy", h, y), y)
    assert np.allclose(got, want, atol=1e-12)


def test_per_label_generator_starts_at_zero_and_refuses_to_guess_without_labels():
    gen = nn.Generator(7, 2, lr=1e-3, dtype=np.float32, per_label=4)
    g, _ = gen.predict(np.ones((3, 7), np.float32), np.eye(4, dtype=np.float32)[:3])
    assert not g.any() and g.dtype == np.float32
    with pytest.raises(ValueError, match="needs the labels"):
        gen.predict(np.ones((3, 7), np.float32))


def test_generator_with_batch_norm_has_gamma_beta_and_no_hidden_bias():
    gen = nn.Generator(5, 3, lr=1e-3, dtype=np.float64, hidden=4, batch_norm=True)
    assert list(gen.named_params()) == ["W1", "gamma", "beta", "W2", "b2"]


@pytest.mark.parametrize("normalize,axis", [("batch", 0), ("example", 1)])
def test_context_normalisation_axis(normalize, axis):
    c = RNG.randn(6, 4) * 3 + 2
    out = nn.normalize_context(normalize, c)
    assert np.allclose(out.mean(axis=axis), 0) and np.allclose(out.std(axis=axis), 1, rtol=1e-4)
    assert nn.normalize_context("none", c) is c


def test_generator_refresh_recomputes_with_current_weights():
    c, t = RNG.randn(8, 5), RNG.randn(8, 3)
    gen = nn.Generator(5, 3, lr=1e-2, dtype=np.float64, hidden=4, batch_norm=True,
                       normalize="example", optimizer="adam")
    g0, cache = gen.predict(c)
    g1, _ = gen.refresh(cache)
    assert np.array_equal(g0, g1)            # nothing moved: the same numbers
    gen.update(cache, g0, t)
    g2, cache2 = gen.refresh(cache)
    assert np.array_equal(g2, gen.predict(c)[0]) and not np.array_equal(g2, g0)


def test_generator_adam_moves_every_parameter_by_about_lr():
    c, t = RNG.randn(8, 5), RNG.randn(8, 3)
    gen = nn.Generator(5, 3, lr=1e-3, dtype=np.float64, optimizer="adam")
    g, cache = gen.predict(c)
    gen.update(cache, g, t)
    assert np.allclose(np.abs(gen.W2), 1e-3, rtol=1e-3)   # first Adam step: lr * sign


def test_generator_starts_at_zero():
    gen = nn.Generator(6, 4, lr=0.1, dtype=np.float32, hidden=3)
    g, _ = gen.predict(np.ones((2, 6), np.float32))
    assert not g.any() and g.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_through_forward_and_update(dtype):
    x = RNG.randn(4, 3).astype(dtype)
    layer = nn.Dense(RNG.randn(3, 2).astype(dtype), np.zeros(2, dtype), "sigmoid")
    h = layer.forward(x)
    layer.update(x, layer.delta(h, h), 0.1)
    assert h.dtype == dtype and layer.W.dtype == dtype and layer.b.dtype == dtype


def test_context_shapes():
    h, y = np.zeros((4, 3)), np.ones((4, 2))
    assert nn.context("h", h, y).shape == (4, 3)
    assert nn.context("y", h, y).shape == (4, 2)
    assert nn.context("hy", h, y).shape == (4, 5)


def test_per_label_maps_at_their_own_rate_leave_the_shared_map_as_it_was():
    # Adam's first step moves every weight by about its rate (m_hat / sqrt(v_hat) = +-1), so
    # the per-label maps move a tenth as far when given a tenth of the rate
    h, y, t = RNG.randn(8, 5), _labels("one-hot", 8, 4), RNG.randn(8, 5)
    c = nn.context("hy", h, y)
    same = nn.Generator(9, 5, lr=1e-3, dtype=np.float64, per_label=4, optimizer="adam")
    slow = nn.Generator(9, 5, lr=1e-3, dtype=np.float64, per_label=4, optimizer="adam",
                        per_label_lr=1e-4)
    for gen in (same, slow):
        g_hat, cache = gen.predict(c, y)
        gen.update(cache, g_hat, t)
    assert np.array_equal(same.W2, slow.W2) and np.array_equal(same.b2, slow.b2)
    moved = same.Wy != 0
    assert moved.any() and np.array_equal(moved, slow.Wy != 0)
    assert np.allclose(slow.Wy[moved] / same.Wy[moved], 0.1, rtol=1e-4)
