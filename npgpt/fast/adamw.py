"""Fused AdamW update and the squared-norm reduction used by gradient clipping.
They mirror npgpt/optim.py:

    g = c g                       (c: the clipping factor, 1 without clipping; g itself is not written)
    p *= 1 - lr * wd
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    ||g||^2 = vdot(g, g);   g *= c   (clipping)

One read and one write of p, g, m, v per element instead of NumPy's ~10 passes. The update's
arithmetic is in p's dtype, as in the NumPy reference (NumPy keeps Python scalars weak) and in
PyTorch's float32 AdamW; in float64 it ran ~10% slower, its sqrt and division at half the SIMD width.
"""
import math

import numpy as np
from numba import prange

from ._jit import pjit


@pjit
def _adamw(p, g, m, v, c, decay, b1, a1, b2, a2, step, rbc2, eps):   # scalars in p's dtype; a1 = 1 - b1, a2 = 1 - b2
    for i in prange(p.size):
        gi = g[i] * c                    # rounds as clipping's g *= c does
        mi = b1 * m[i] + a1 * gi
        vi = b2 * v[i] + a2 * (gi * gi)
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
    # every scalar in p's dtype, as NumPy's and PyTorch's float32 AdamW (there too 1 - lr * wd rounds to 1
    # in float32 when lr * wd < 3e-8: no decay on such a step); 1 / sqrt(bc2) multiplies where the
    # reference divides by sqrt(bc2) (one division per element fewer; they differ by an ulp)
    f = p.dtype.type
    _adamw(p.size, flat(p, "p"), flat(g, "g"), flat(m, "m"), flat(v, "v"), g.dtype.type(grad_scale),
           f(1.0 - lr * wd), f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(lr / bc1), f(1.0 / math.sqrt(bc2)), f(eps))


def sum_of_squares(g):
    return float(_sum_of_squares(g.size, flat(g, "g")))


def scale_(g, c):
    """g *= c in place, on every core (NumPy's in-place multiply runs on one)."""
    _scale(g.size, flat(g, "g"), g.dtype.type(c))
