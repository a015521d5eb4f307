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

A training forward (slope=True) also writes d = dgelu/dx, what multiplies dy above, while it has
the sigmoids at hand, and the layer keeps d instead of x (in x's memory when the MLP hands over its
GEMM output). The backward is then dx = dy * d, one multiply an element instead of the exp and the
division again; the same operations in the same order as before, so the same gradients to the bit.
The multiply writes into dy (the MLP hands over c_proj's fresh dx); it is bound by memory.
"""
import math

import numpy as np
from numba import prange

from ._jit import jit, pjit
from ._math import exp

S = math.sqrt(2.0 / math.pi)
K = 0.044715


@jit
def _sigmoids(x, s, k, one):
    """sigmoid(2u), sigmoid(-2u) for u = s (x + 0.044715 x^3), both from e = exp(-2|u|)."""
    u = s * (x + k * x * x * x)                          # u = s (x + 0.044715 x^3)
    a = abs(u)
    e = exp(-(a + a))                                    # exp(-2|u|)
    inv = one / (one + e)                                # one division (a vector division costs ~10 multiplies)
    return (inv, e * inv) if u >= 0 else (e * inv, inv)


@jit
def _slope(x, sp, sm, s, one, k3):
    """dgelu/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx = sigmoid(2u) + 2 x sigmoid(2u) sigmoid(-2u) du/dx."""
    return sp + (x + x) * sp * sm * (s * (one + k3 * x * x))   # du/dx = s (1 + 3 * 0.044715 x^2)


@pjit
def _forward(x, y, s, k, one):                          # inference: y only
    for i in prange(x.size):
        xi = x[i]
        y[i] = xi * _sigmoids(xi, s, k, one)[0]         # y = 0.5 x (1 + t) = x sigmoid(2u)


@pjit
def _forward_slope(x, y, d, s, k, one, k3):             # training: y and d = dgelu/dx
    for i in prange(x.size):
        xi = x[i]
        sp, sm = _sigmoids(xi, s, k, one)
        y[i] = xi * sp
        d[i] = _slope(xi, sp, sm, s, one, k3)


@pjit
def _bias_forward(a, bias, y, s, k, one, k3, slope):   # a, y (N, M); bias (M,)
    N, M = a.shape
    for n in prange(N):
        an, yn = a[n], y[n]                                 # rows as 1-D arrays (vectorised loops)
        for j in range(M):
            an[j] += bias[j]                                # a += b (the row stays in L1 for the next loop)
        if slope:
            for j in range(M):
                xi = an[j]
                sp, sm = _sigmoids(xi, s, k, one)
                yn[j] = xi * sp                             # y = gelu(a)
                an[j] = _slope(xi, sp, sm, s, one, k3)      # a <- dgelu/da
        else:
            for j in range(M):
                xi = an[j]
                yn[j] = xi * _sigmoids(xi, s, k, one)[0]


@pjit
def _backward(dy, d, dx):                                   # dx may be dy itself
    for i in prange(dy.size):
        dx[i] = dy[i] * d[i]                                # dx = dy * dgelu/dx (d from the forward)


def _constants(dtype):
    t = np.dtype(dtype).type                                # so float32 stays float32 in the loops
    return t(S), t(K), t(1.0)


def gelu_forward(x, slope: bool = False):
    """gelu(x); with slope, (gelu(x), dgelu/dx): what a training forward keeps for its backward."""
    shape = x.shape
    x = np.ascontiguousarray(x).reshape(-1)
    y = np.empty_like(x)
    if not slope:
        _forward(x.size, x, y, *_constants(x.dtype))
        return y.reshape(shape)
    d = np.empty_like(x)
    _forward_slope(x.size, x, y, d, *_constants(x.dtype), x.dtype.type(3 * K))
    return y.reshape(shape), d.reshape(shape)


def bias_gelu_forward(a, b, slope: bool = False):
    """a += b in place (a (..., M) a GEMM's output, C-contiguous; b (M,)), and returns gelu(a). With slope,
    a then holds dgelu/da instead (the backward's factor, in the GEMM output's memory)."""
    if not a.flags.c_contiguous or b.shape != a.shape[-1:]:
        raise ValueError(f"bias_gelu_forward: a must be C-contiguous (..., M) and b (M,), got {a.shape} and {b.shape}")
    a2 = a.reshape(-1, a.shape[-1])
    y = np.empty_like(a2)
    _bias_forward(a2.size, a2, b, y, *_constants(a.dtype), a.dtype.type(3 * K), slope)
    return y.reshape(a.shape)


def gelu_backward(dy, d, out=None):
    """dx = dy * d, with d = dgelu/dx as gelu_forward(x, slope=True) or bias_gelu_forward(..., slope=True) left
    it (and leaves it, for another backward of the same forward); into `out` (C-contiguous, dy's shape; may be
    dy itself) or a new array."""
    if dy.shape != d.shape or not d.flags.c_contiguous or (out is not None and (out.shape != dy.shape
                                                                              or not out.flags.c_contiguous)):
        raise ValueError(f"gelu_backward: dy {dy.shape}, the saved slope {d.shape} and out "
                         f"{None if out is None else out.shape} must be one shape (slope and out C-contiguous)")
    dy1 = np.ascontiguousarray(dy).reshape(-1)
    dx = np.empty_like(dy1) if out is None else out.reshape(-1)
    _backward(dy1.size, dy1, d.reshape(-1), dx)
    return dx.reshape(dy.shape)
