"""GELU (tanh approximation) kernels. They mirror npgpt/layers/gelu.py:

    t  = tanh(s * (x + 0.044715 x^3))
    y  = 0.5 x (1 + t)
    dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2))

Elementwise over the flattened array, one thread per chunk.
"""
import math

import numpy as np
from numba import prange

from ._jit import pjit

S = math.sqrt(2.0 / math.pi)
K = 0.044715


@pjit
def _forward(x, y):
    for i in prange(x.size):
        xi = x[i]
        t = np.tanh(S * (xi + K * xi * xi * xi))
        y[i] = 0.5 * xi * (1.0 + t)


@pjit
def _backward(dy, x, dx):
    for i in prange(x.size):
        xi = x[i]
        t = np.tanh(S * (xi + K * xi * xi * xi))
        dx[i] = dy[i] * (0.5 * (1.0 + t) + 0.5 * xi * (1.0 - t * t) * S * (1.0 + 3.0 * K * xi * xi))


def gelu_forward(x):
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _forward(x.size, x.reshape(-1), y.reshape(-1))
    return y


def gelu_backward(dy, x):
    dy, x = np.ascontiguousarray(dy), np.ascontiguousarray(x)
    dx = np.empty_like(dy)
    _backward(x.size, dy.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx
