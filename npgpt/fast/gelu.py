"""GELU (tanh approximation) kernels. They mirror npgpt/layers/gelu.py:

    u  = s (x + 0.044715 x^3),  s = sqrt(2 / pi)
    t  = tanh(u)
    y  = 0.5 x (1 + t)
    dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2))

through the identities 0.5 (1 + tanh u) = sigmoid(2u) and 1 - tanh^2 u = 4 sigmoid(2u) sigmoid(-2u):

    y  = x sigmoid(2u)
    dx = dy * (sigmoid(2u) + 2 x sigmoid(2u) sigmoid(-2u) du/dx)

with both sigmoids taken from e = exp(-2|u|) <= 1 (sigmoid(2|u|) = 1 / (1 + e), sigmoid(-2|u|) =
e / (1 + e)), so nothing overflows or cancels. One pass over the elements; the exp is the
vectorised one of npgpt/fast/_math.py (NumPy's tanh is SIMD only on AVX-512 CPUs: on AVX2 it
costs ~3.5 ns an element, more than the rest of a train step's GELU together).

bias_gelu_forward folds the MLP's c_fc bias into the same pass (npgpt/layers/mlp.py):

    a += b;  y = gelu(a)          a (N, 4C) the GEMM's output, b (4C,): a becomes GELU's input

one read and two writes an element instead of the bias add's read and write and then GELU's.
"""
import math

import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp

S = math.sqrt(2.0 / math.pi)
K = 0.044715


@pjit
def _forward(x, y, s, k, one):
    for i in prange(x.size):
        xi = x[i]
        u = s * (xi + k * xi * xi * xi)                     # u = s (x + 0.044715 x^3)
        a = abs(u)
        e = exp(-(a + a))                                   # exp(-2|u|)
        inv = one / (one + e)                               # one division (a vector division costs ~10 multiplies)
        sig = inv if u >= 0 else e * inv                    # sigmoid(2u) = 0.5 (1 + tanh u)
        y[i] = xi * sig                                     # y = 0.5 x (1 + t)


@pjit
def _bias_forward(a, bias, y, s, k, one):           # a, y (N, M); bias (M,)
    N, M = a.shape
    for n in prange(N):
        an, yn = a[n], y[n]                                 # rows as 1-D arrays (vectorised loops)
        for j in range(M):
            an[j] += bias[j]                                # a += b (the row stays in L1 for the next loop)
        for j in range(M):
            xi = an[j]                                      # then as _forward: y = gelu(a)
            u = s * (xi + k * xi * xi * xi)
            au = abs(u)
            e = exp(-(au + au))
            inv = one / (one + e)
            sig = inv if u >= 0 else e * inv
            yn[j] = xi * sig


@pjit
def _backward(dy, x, dx, s, k, one, k3):
    for i in prange(x.size):
        xi = x[i]
        u = s * (xi + k * xi * xi * xi)
        a = abs(u)
        e = exp(-(a + a))
        inv = one / (one + e)
        sp, sm = (inv, e * inv) if u >= 0 else (e * inv, inv)   # sigmoid(2u), sigmoid(-2u)
        du = s * (one + k3 * xi * xi)                        # du/dx, k3 = 3 * 0.044715
        # dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx)
        dx[i] = dy[i] * (sp + (xi + xi) * sp * sm * du)


def _constants(dtype):
    t = np.dtype(dtype).type                                # so float32 stays float32 in the loops
    return t(S), t(K), t(1.0)


def gelu_forward(x):
    shape = x.shape
    x = np.ascontiguousarray(x).reshape(-1)
    y = np.empty_like(x)
    _forward(x.size, x, y, *_constants(x.dtype))
    return y.reshape(shape)


def bias_gelu_forward(a, b):
    """a += b in place (a (..., M) a GEMM's output, C-contiguous; b (M,)), and returns gelu(a)."""
    if not a.flags.c_contiguous or b.shape != a.shape[-1:]:
        raise ValueError(f"bias_gelu_forward: a must be C-contiguous (..., M) and b (M,), got {a.shape} and {b.shape}")
    a2 = a.reshape(-1, a.shape[-1])
    y = np.empty_like(a2)
    _bias_forward(a2.size, a2, b, y, *_constants(a.dtype))
    return y.reshape(a.shape)


def gelu_backward(dy, x):
    shape = dy.shape
    dy, x = np.ascontiguousarray(dy).reshape(-1), np.ascontiguousarray(x).reshape(-1)
    dx = np.empty_like(dy)
    _backward(x.size, dy, x, dx, *_constants(x.dtype), x.dtype.type(3 * K))
    return dx.reshape(shape)
