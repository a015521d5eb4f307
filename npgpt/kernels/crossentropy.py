"""Fused softmax cross-entropy. It mirrors npgpt/loss.py:cross_entropy_numpy:

    m = max_v z;  e = exp(z - m);  sumexp = sum_v e
    nll = log(sumexp) + m - z[target]                  (0 where target == ignore_index)
    loss = sum(nll) / n;  dz = (e / sumexp - onehot(target)) / n   (0 on ignored rows)
    (n: the count of non-ignored rows, or the caller's normalizer)

Two passes over the (N, V) logits: the first finds each row's max, then writes e = exp(z - m) and
sums it (the vectorised exp of npgpt/kernels/_math.py); the second scales each row into dz.
dz may be the logits array itself (out=logits): pass 1 reads each row before overwriting it.
"""
import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp


@pjit(reductions=True)
def _exp_rows(z, t, ignore_index, dz, zt, m, total):   # dz = exp(z - max_v z), total = its row sum; zt = z[target]
    N, V = z.shape
    for n in prange(N):
        if t[n] == ignore_index:
            zt[n] = 0.0
            m[n] = 0.0
            total[n] = 1.0
            for v in range(V):
                dz[n, v] = 0.0                     # ignored rows get no gradient
            continue
        zt[n] = z[n, t[n]]
        mx = z[n, 0]
        for v in range(1, V):
            mx = max(mx, z[n, v])
        m[n] = mx
        acc = 0.0
        for v in range(V):
            e = exp(z[n, v] - mx)
            dz[n, v] = e
            acc += e
        total[n] = acc


@pjit(reductions=True)
def _normalise(e, t, ignore_index, inv_n, zt, m, total, nll):   # e = exp(z - m) -> dz; nll per row
    N, V = e.shape
    for n in prange(N):
        if t[n] == ignore_index:
            nll[n] = 0.0
            continue
        nll[n] = np.log(total[n]) + m[n] - zt[n]
        scale = e.dtype.type(inv_n / total[n])
        for v in range(V):
            e[n, v] *= scale
        e[n, t[n]] -= inv_n


def cross_entropy_forward_backward(logits, targets, ignore_index, out=None, normalizer=None):
    V = logits.shape[-1]
    z = np.ascontiguousarray(logits).reshape(-1, V)
    t = np.ascontiguousarray(targets).reshape(-1).astype(np.int64, copy=False)
    N = len(t)
    n = max(int(np.count_nonzero(t != ignore_index)), 1) if normalizer is None else normalizer
    dz = np.empty_like(z) if out is None else out.reshape(-1, V)
    zt, m, total, nll = np.empty(N), np.empty(N), np.empty(N), np.empty(N)   # float64 per-row scalars
    _exp_rows(z.size, z, t, ignore_index, dz, zt, m, total)
    _normalise(z.size, dz, t, ignore_index, 1.0 / n, zt, m, total, nll)
    loss = nll.sum() / n
    return logits.dtype.type(loss), dz.reshape(logits.shape)
