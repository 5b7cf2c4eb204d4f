"""The seed post's own synthetic-gradient script, as it ran, with a real accuracy beside its loss.

    dni-async experiment seed-post-dni

Kept apart from the package's math on purpose: it reproduces the post's mistakes (every layer
on synthetic gradients, updates added with +=, generators initialised like the layers), so
that the tutorial can show its printed figure falling to about zero while it guesses at chance.
"""

from __future__ import annotations

import numpy as np


def seed_post_dni(iterations: int = 1000, every: int = 100, log=print, stop_early: bool = True):
    """The 2017 post's synthetic-gradient script as it ran, with a real accuracy printed beside
    its figure.

    As the post ran it (docs/tutorial.md, section 5.1): 12-bit binary addition, 1000 examples in one
    batch of 1000, layers 24 -> 64 -> 32 -> 12 of sigmoids without biases, every layer - the
    last one too - updated from its own linear synthetic gradient generator (weights
    randn * 0.2 - 0.1, like the layers), learning rate 0.0001, and every update *added*
    (`+=`), the layers' and the generators' alike: gradient ascent as written. The printed
    figure is sum |(out - y) * out * (1 - out)|, and the loop stops once it is below 0.1.
    Numpy's global generator is seeded with 1; the data is drawn first, then each layer's
    weights followed by its generator's.

    Returns the rows printed: (epoch, figure, bit accuracy, exact accuracy, saturated share).
    """
    state = np.random.get_state()
    try:
        with np.errstate(over="ignore"):   # saturating sigmoids overflow exp(); harmless here
            return _seed_post_dni(iterations, every, log, stop_early)
    finally:
        np.random.set_state(state)


def _seed_post_dni(iterations, every, log, stop_early):
    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    def sigmoid_out2deriv(out):
        return out * (1 - out)

    def generate_dataset(output_dim=8, num_examples=1000):
        def int2vec(x, dim=output_dim):
            out = np.zeros(dim)
            binrep = np.array(list(np.binary_repr(x))).astype("int")
            out[-len(binrep):] = binrep
            return out
        x_left_int = (np.random.rand(num_examples) * 2 ** (output_dim - 1)).astype("int")
        x_right_int = (np.random.rand(num_examples) * 2 ** (output_dim - 1)).astype("int")
        y_int = x_left_int + x_right_int
        x = [np.concatenate((int2vec(x_left_int[i]), int2vec(x_right_int[i])))
             for i in range(len(x_left_int))]
        y = [int2vec(y_int[i]) for i in range(len(y_int))]
        return np.array(x), np.array(y)

    class DNI(object):
        def __init__(self, input_dim, output_dim, nonlin, nonlin_deriv, alpha=0.1):
            self.weights = (np.random.randn(input_dim, output_dim) * 0.2) - 0.1
            self.nonlin = nonlin
            self.nonlin_deriv = nonlin_deriv
            self.weights_synthetic_grads = (np.random.randn(output_dim, output_dim) * 0.2) - 0.1
            self.alpha = alpha

        def forward_and_synthetic_update(self, input):
            self.input = input
            self.output = self.nonlin(self.input.dot(self.weights))
            self.synthetic_gradient = self.output.dot(self.weights_synthetic_grads)
            self.weight_synthetic_gradient = self.synthetic_gradient * self.nonlin_deriv(self.output)
            self.weights += self.input.T.dot(self.weight_synthetic_gradient) * self.alpha
            return self.weight_synthetic_gradient.dot(self.weights.T), self.output

        def update_synthetic_weights(self, true_gradient):
            self.synthetic_gradient_delta = self.synthetic_gradient - true_gradient
            self.weights_synthetic_grads += self.output.T.dot(self.synthetic_gradient_delta) * self.alpha

    np.random.seed(1)
    num_examples, output_dim = 1000, 12
    x, y = generate_dataset(num_examples=num_examples, output_dim=output_dim)
    batch_size, alpha = 1000, 0.0001
    input_dim, layer_1_dim, layer_2_dim, output_dim = len(x[0]), 64, 32, len(y[0])
    layer_1 = DNI(input_dim, layer_1_dim, sigmoid, sigmoid_out2deriv, alpha)
    layer_2 = DNI(layer_1_dim, layer_2_dim, sigmoid, sigmoid_out2deriv, alpha)
    layer_3 = DNI(layer_2_dim, output_dim, sigmoid, sigmoid_out2deriv, alpha)

    def accuracy():
        out = layer_3.nonlin(layer_2.nonlin(layer_1.nonlin(x.dot(layer_1.weights))
                                            .dot(layer_2.weights)).dot(layer_3.weights))
        right = (out > 0.5) == (y > 0.5)
        saturated = float(np.mean((out < 0.01) | (out > 0.99)))
        return float(right.mean()), float(right.all(axis=1).mean()), saturated

    rows = []
    if log:
        log("epoch  the post's figure  bit accuracy  exact accuracy  outputs saturated")
    for it in range(iterations):
        error = 0
        for batch_i in range(int(len(x) / batch_size)):
            batch_x = x[(batch_i * batch_size):(batch_i + 1) * batch_size]
            batch_y = y[(batch_i * batch_size):(batch_i + 1) * batch_size]
            _, layer_1_out = layer_1.forward_and_synthetic_update(batch_x)
            layer_1_delta, layer_2_out = layer_2.forward_and_synthetic_update(layer_1_out)
            layer_2_delta, layer_3_out = layer_3.forward_and_synthetic_update(layer_2_out)
            layer_3_delta = layer_3_out - batch_y
            layer_3.update_synthetic_weights(layer_3_delta)
            layer_2.update_synthetic_weights(layer_2_delta)
            layer_1.update_synthetic_weights(layer_1_delta)
            error += np.sum(np.abs(layer_3_delta * layer_3_out * (1 - layer_3_out)))
        done = stop_early and error < 0.1
        if it % every == every - 1 or it == 0 or done or it == iterations - 1:
            bit, exact, sat = accuracy()
            rows.append((it + 1, float(error), bit, exact, sat))
            if log:
                log(f"{it + 1:>5}  {error:>17.6g}  {bit:>12.4f}  {exact:>14.4f}  {sat:>17.1%}"
                    + ("   (figure < 0.1: the post's loop stops here)" if done else ""))
        if done:
            break
    return rows
