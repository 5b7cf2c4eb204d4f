"""Batch norm: finite-difference gradients, running statistics for evaluation."""

import numpy as np
import pytest

from dni_async import nn
from dni_async.nn.norm import BatchNorm
from test_nn import close, numeric_grad

RNG = np.random.RandomState(5)


def bn_with_params(dim=4):
    bn = BatchNorm(dim, np.float64)
    bn.gamma[...] = RNG.rand(dim) + 0.5
    bn.beta[...] = RNG.randn(dim)
    return bn


def test_training_output_has_the_batch_statistics_beta_and_gamma():
    bn = bn_with_params()
    z, _ = bn.forward_train(RNG.randn(50, 4) * 3 + 2)
    assert np.allclose(z.mean(axis=0), bn.beta)
    assert np.allclose(z.std(axis=0), bn.gamma, rtol=1e-5)


def test_backward_matches_finite_differences():
    bn = bn_with_params()
    a = RNG.randn(6, 4) * 2 + 1
    r = RNG.randn(6, 4)     # L = sum(r * z)

    def loss():
        return float(np.sum(r * bn.forward_train(a)[0]))

    _, cache = bn.forward_train(a)
    da, dgamma, dbeta = bn.backward(r, cache)
    assert close(da, numeric_grad(loss, a))
    assert close(dgamma, numeric_grad(loss, bn.gamma))
    assert close(dbeta, numeric_grad(loss, bn.beta))


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_normalised_dense_layer_matches_finite_differences(act):
    x = RNG.randn(7, 5)
    layer = nn.Dense(RNG.randn(5, 4) * 0.5, None, act, norm=bn_with_params())
    r = RNG.randn(7, 4)

    def loss():
        return float(np.sum(r * layer.forward_train(x)[0]))

    h, cache = layer.forward_train(x)
    delta, norm_grads = layer.through_norm(layer.delta(h, r), cache)
    gW, _ = layer.gradients(x, delta)
    assert close(gW, numeric_grad(loss, layer.W))
    assert close(norm_grads["gamma"], numeric_grad(loss, layer.norm.gamma))
    assert close(norm_grads["beta"], numeric_grad(loss, layer.norm.beta))
    assert close(layer.grad_input(delta), numeric_grad(loss, x))
    assert set(layer.named_params()) == {"W", "gamma", "beta"}


def test_running_statistics_move_in_training_and_serve_evaluation():
    bn = bn_with_params(3)
    a = RNG.randn(20, 3) * 2 + 5
    bn.forward_train(a)
    assert np.allclose(bn.running_mean, 0.1 * a.mean(axis=0))
    assert np.allclose(bn.running_var, 0.9 + 0.1 * a.var(axis=0))
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    z = bn.forward_eval(a)
    assert np.array_equal(bn.running_mean, mean) and np.array_equal(bn.running_var, var)
    want = bn.gamma * (a - mean) / np.sqrt(var + bn.eps) + bn.beta
    assert np.allclose(z, want)
    for _ in range(200):                      # the same batch again and again: converges
        train_z, _ = bn.forward_train(a)
    assert np.allclose(bn.forward_eval(a), train_z, atol=1e-6)


def test_backward_with_the_forward_pass_gamma_after_an_update():
    bn = bn_with_params()
    a, r = RNG.randn(6, 4), RNG.randn(6, 4)
    _, cache = bn.forward_train(a)
    want = bn.backward(r, cache)[0]
    gamma = bn.gamma.copy()
    bn.gamma += 1.0
    assert np.array_equal(bn.backward(r, cache, gamma=gamma)[0], want)


def test_untracked_norm_uses_batch_statistics_everywhere():
    bn = BatchNorm(3, np.float32, track_running=False)
    a = RNG.randn(8, 3).astype(np.float32)
    assert bn.buffers() == {}
    assert np.array_equal(bn.forward_eval(a), bn.forward_train(a)[0])
    assert bn.forward_eval(a).dtype == np.float32
