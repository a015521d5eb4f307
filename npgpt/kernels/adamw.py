"""Fused AdamW update and the squared-norm reduction used by gradient clipping.
They mirror npgpt/optim.py:

    g = c g                       (c: the clipping factor, 1 without clipping; g itself is not written)
    p *= 1 - lr * wd
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    ||g||^2 = vdot(g, g);   g *= c   (clipping)

One read and one write of p, g, m, v per element instead of NumPy's ~10 passes.
"""
import math

import numpy as np
from numba import prange

from ._jit import pjit


@pjit
def _adamw(p, g, m, v, lr, b1, b2, eps, wd, bc1, bc2, c):
    decay = 1.0 - lr * wd
    step = lr / bc1
    rbc2 = 1.0 / math.sqrt(bc2)
    for i in prange(p.size):
        gi = g[i] * c                    # c has g's dtype: the product rounds as clipping's g *= c does
        mi = b1 * m[i] + (1.0 - b1) * gi
        vi = b2 * v[i] + (1.0 - b2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step * mi / (np.sqrt(vi) * rbc2 + eps)


@pjit(reductions=True)
def _sum_of_squares(g):
    total = 0.0
    for i in prange(g.size):
        gi = np.float64(g[i])            # square and sum in float64
        total += gi * gi
    return total


@pjit
def _scale(g, c):
    for i in prange(g.size):
        g[i] *= c


def flat(a, name):
    """a.reshape(-1) as a view: refuses an array that is not C-contiguous, whose reshape would be a copy
    (an update written into it would be lost)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous array (np.ascontiguousarray), got strides {a.strides}")
    return a.reshape(-1)


def adamw_update(p, g, m, v, lr, b1, b2, eps, wd, bc1, bc2, grad_scale=1.0):
    _adamw(p.size, flat(p, "p"), flat(g, "g"), flat(m, "m"), flat(v, "v"), lr, b1, b2, eps, wd, bc1, bc2,
           g.dtype.type(grad_scale))


def sum_of_squares(g):
    return float(_sum_of_squares(g.size, flat(g, "g")))


def scale_(g, c):
    """g *= c in place, on every core (NumPy's in-place multiply runs on one)."""
    _scale(g.size, flat(g, "g"), g.dtype.type(c))
