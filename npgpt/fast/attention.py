"""Causal softmax kernels for attention scores. They mirror npgpt/layers/attention.py:

    a  = softmax(scale * s) over j, with s[i, j] masked (a = 0) where j > i + (Tk - Tq)
    ds = scale * a * (da - sum_j da * a)

Both work in place on the (B, NH, Tq, Tk) score array (prange over rows); only the unmasked
prefix j <= i + (Tk - Tq) of each row is touched, the rest is set to 0. The exp is the vectorised one of
npgpt/fast/_math.py (exp_sum_).
"""
import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp_sum_, max_of


@pjit(reductions=True)
def _forward(s, scale):                       # s (R, Tq, Tk), in place
    R, Tq, Tk = s.shape
    off = Tk - Tq
    for r in prange(R * Tq):
        row = s[r // Tq, r % Tq]              # a 1-D row: LLVM vectorises loops over it, not over s[b, i, j]
        n = r % Tq + off + 1                  # keys 0 .. n-1 are visible (key 0 always)
        for j in range(n):
            row[j] *= scale
        inv = 1.0 / exp_sum_(row[:n], max_of(row, 0, n))   # exp(z - max z) in place, and its sum
        for j in range(n):
            row[j] *= inv
        for j in range(n, Tk):
            row[j] = 0.0


@pjit(reductions=True)
def _backward(da, a, scale):                  # da, a (R, Tq, Tk); da becomes ds
    R, Tq, Tk = a.shape
    off = Tk - Tq
    for r in prange(R * Tq):
        dar, ar = da[r // Tq, r % Tq], a[r // Tq, r % Tq]
        n = r % Tq + off + 1
        dot = 0.0
        for j in range(n):
            dot += dar[j] * ar[j]
        for j in range(n):
            dar[j] = scale * ar[j] * (dar[j] - dot)
        for j in range(n, Tk):
            dar[j] = 0.0


def causal_softmax_forward(s, scale):
    """In place over s (..., Tq, Tk) when it is contiguous; returns the probabilities."""
    s = np.ascontiguousarray(s)
    _forward(s.size, s.reshape(-1, s.shape[-2], s.shape[-1]), s.dtype.type(scale))
    return s


def causal_softmax_backward(da, a, scale):
    """In place over da; returns ds (the gradient with respect to the unscaled scores s)."""
    da = np.ascontiguousarray(da)
    a = np.ascontiguousarray(a)
    Tq, Tk = a.shape[-2:]
    _backward(a.size, da.reshape(-1, Tq, Tk), a.reshape(-1, Tq, Tk), scale)
    return da
