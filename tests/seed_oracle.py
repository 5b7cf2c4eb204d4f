"""The seed post's backprop network, written as the post wrote it: the independent oracle.

Kept deliberately close to the 2017 tutorial's own script (data, the Layer class, the loop),
sharing no code with dni_async, so that `reference --preset seed --mode backprop` is checked
against the post itself rather than against a second copy of our own math.
"""

import numpy as np


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


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def sigmoid_out2deriv(out):
    return out * (1 - out)


class Layer(object):
    def __init__(self, input_dim, output_dim, nonlin, nonlin_deriv):
        self.weights = (np.random.randn(input_dim, output_dim) * 0.2) - 0.1
        self.nonlin = nonlin
        self.nonlin_deriv = nonlin_deriv

    def forward(self, input):
        self.input = input
        self.output = self.nonlin(self.input.dot(self.weights))
        return self.output

    def backward(self, output_delta):
        self.weight_output_delta = output_delta * self.nonlin_deriv(self.output)
        return self.weight_output_delta.dot(self.weights.T)

    def update(self, alpha=0.1):
        self.weights -= self.input.T.dot(self.weight_output_delta) * alpha


def run(iterations):
    """Returns the per-epoch figure the post printed and the final weights."""
    np.random.seed(1)
    num_examples, output_dim = 1000, 12
    x, y = generate_dataset(num_examples=num_examples, output_dim=output_dim)
    batch_size, alpha = 10, 0.1
    input_dim, layer_1_dim, layer_2_dim, output_dim = len(x[0]), 128, 64, len(y[0])
    layer_1 = Layer(input_dim, layer_1_dim, sigmoid, sigmoid_out2deriv)
    layer_2 = Layer(layer_1_dim, layer_2_dim, sigmoid, sigmoid_out2deriv)
    layer_3 = Layer(layer_2_dim, output_dim, sigmoid, sigmoid_out2deriv)
    errors = []
    for _ in range(iterations):
        error = 0
        for batch_i in range(int(len(x) / batch_size)):
            batch_x = x[(batch_i * batch_size):(batch_i + 1) * batch_size]
            batch_y = y[(batch_i * batch_size):(batch_i + 1) * batch_size]
            layer_1_out = layer_1.forward(batch_x)
            layer_2_out = layer_2.forward(layer_1_out)
            layer_3_out = layer_3.forward(layer_2_out)
            layer_3_delta = layer_3_out - batch_y
            layer_2_delta = layer_3.backward(layer_3_delta)
            layer_1_delta = layer_2.backward(layer_2_delta)
            layer_1.backward(layer_1_delta)
            layer_1.update()
            layer_2.update()
            layer_3.update()
            error += np.sum(np.abs(layer_3.weight_output_delta))
        errors.append(error)
    return errors, [layer_1.weights, layer_2.weights, layer_3.weights], (x, y)
