"""The math and nothing else: layers, normalisation, optimizers, generators, one stage's rules
per mode, network building, metrics. Nothing here knows about processes or sockets."""

from dni_async.nn.generator import (CONTEXTS, NORMALIZE, Generator, context, context_dim,
                                    normalize_context)
from dni_async.nn.layers import (ACTIVATIONS, LOSSES, Dense, loss_sum, output_delta, relu,
                                 relu_deriv, sigmoid, sigmoid_deriv, softmax, tanh, tanh_deriv)
from dni_async.nn.norm import BatchNorm
from dni_async.nn.optim import OPTIMIZERS, SGD, Adam

__all__ = ["ACTIVATIONS", "CONTEXTS", "LOSSES", "NORMALIZE", "OPTIMIZERS", "Adam", "BatchNorm",
           "Dense", "Generator", "SGD", "context", "context_dim", "loss_sum", "normalize_context",
           "output_delta", "relu", "relu_deriv", "sigmoid", "sigmoid_deriv", "softmax", "tanh",
           "tanh_deriv"]
