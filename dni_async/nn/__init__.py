"""The math and nothing else: layers, generators, one stage's rules per mode, network building,
metrics. Nothing here knows about processes or sockets."""

from dni_async.nn.generator import CONTEXTS, Generator, context
from dni_async.nn.layers import (ACTIVATIONS, LOSSES, Dense, loss_sum, output_delta, relu,
                                 relu_deriv, sigmoid, sigmoid_deriv, softmax, tanh, tanh_deriv)

__all__ = ["ACTIVATIONS", "CONTEXTS", "LOSSES", "Dense", "Generator", "context", "loss_sum",
           "output_delta", "relu", "relu_deriv", "sigmoid", "sigmoid_deriv", "softmax", "tanh",
           "tanh_deriv"]
