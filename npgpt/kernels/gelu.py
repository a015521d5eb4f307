"""GELU (tanh approximation) kernels. They mirror npgpt/layers/gelu.py:

    t  = tanh(s * (x + 0.044715 x^3))
    y  = 0.5 x (1 + t)
    dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2))

Three passes: Numba computes the tanh argument, NumPy's SIMD tanh (~0.6 ns an element; the
scalar libm tanh Numba would call costs ~15 ns) turns it into t in place, Numba finishes.
"""
import math

import numpy as np
from numba import prange

from ._jit import pjit, ufunc_inplace

S = math.sqrt(2.0 / math.pi)
K = 0.044715


@pjit
def _tanh_arg(x, u):                          # u = s (x + 0.044715 x^3)
    for i in prange(x.size):
        xi = x[i]
        u[i] = S * (xi + K * xi * xi * xi)


@pjit
def _forward_finish(x, t):                    # t <- y = 0.5 x (1 + t)
    for i in prange(x.size):
        t[i] = 0.5 * x[i] * (1.0 + t[i])


@pjit
def _backward_finish(dy, x, t):               # t <- dx
    for i in prange(x.size):
        xi, ti = x[i], t[i]
        t[i] = dy[i] * (0.5 * (1.0 + ti) + 0.5 * xi * (1.0 - ti * ti) * S * (1.0 + 3.0 * K * xi * xi))


def gelu_forward(x):
    shape = x.shape
    x = np.ascontiguousarray(x).reshape(-1)
    y = np.empty_like(x)
    _tanh_arg(x.size, x, y)
    ufunc_inplace(np.tanh, y)
    _forward_finish(x.size, x, y)
    return y.reshape(shape)


def gelu_backward(dy, x):
    shape = dy.shape
    dy, x = np.ascontiguousarray(dy).reshape(-1), np.ascontiguousarray(x).reshape(-1)
    dx = np.empty_like(dy)
    _tanh_arg(x.size, x, dx)
    ufunc_inplace(np.tanh, dx)
    _backward_finish(x.size, dy, x, dx)
    return dx.reshape(shape)
