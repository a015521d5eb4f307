"""Causal softmax kernels for attention scores. They mirror npgpt/layers/attention.py:

    a  = softmax(scale * s) over j, with s[i, j] masked (a = 0) where j > i + (Tk - Tq)
    ds = scale * a * (da - sum_j da * a)

Both work in place on the (B, NH, Tq, Tk) score array (prange over rows); only the unmasked
prefix j <= i + (Tk - Tq) of each row is touched, the rest is set to 0. The exp is the vectorised one of
npgpt/fast/_math.py.
"""
import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp


@pjit(reductions=True)
def _forward(s, scale):                       # s (R, Tq, Tk), in place
    R, Tq, Tk = s.shape
    off = Tk - Tq
    for r in prange(R * Tq):
        b, i = r // Tq, r % Tq
        last = i + off                        # keys 0..last are visible
        mx = s[b, i, 0] * scale               # key 0 is always visible (scale has s's dtype)
        for j in range(1, last + 1):
            v = s[b, i, j] * scale
            if v > mx:
                mx = v
        total = 0.0
        for j in range(last + 1):
            e = exp(s[b, i, j] * scale - mx)
            s[b, i, j] = e
            total += e
        inv = 1.0 / total
        for j in range(last + 1):
            s[b, i, j] *= inv
        for j in range(last + 1, Tk):
            s[b, i, j] = 0.0


@pjit(reductions=True)
def _backward(da, a, scale):                  # da, a (R, Tq, Tk); da becomes ds
    R, Tq, Tk = a.shape
    off = Tk - Tq
    for r in prange(R * Tq):
        b, i = r // Tq, r % Tq
        last = i + off
        dot = 0.0
        for j in range(last + 1):
            dot += da[b, i, j] * a[b, i, j]
        for j in range(last + 1):
            da[b, i, j] = scale * a[b, i, j] * (da[b, i, j] - dot)
        for j in range(last + 1, Tk):
            da[b, i, j] = 0.0


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
