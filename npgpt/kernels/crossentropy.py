"""Fused softmax cross-entropy kernel. It mirrors npgpt/loss.py:cross_entropy_numpy:

    m = max_v z;  e = exp(z - m);  sumexp = sum_v e
    nll = log(sumexp) + m - z[target]                  (0 where target == ignore_index)
    loss = sum(nll) / n;  dz = (e / sumexp - onehot(target)) / n   (0 on ignored rows)

One row per iteration (prange). dz may be the logits array itself (out=logits): each row
reads z[target] and the max before overwriting the row.
"""
import numpy as np
from numba import prange

from ._jit import pjit


@pjit(reductions=True)
def _forward_backward(z, t, ignore_index, inv_n, dz, nll):   # z, dz (N, V); t, nll (N,)
    N, V = z.shape
    for n in prange(N):
        tn = t[n]
        if tn == ignore_index:
            nll[n] = 0.0
            for v in range(V):
                dz[n, v] = 0.0
            continue
        zt = z[n, tn]
        m = z[n, 0]
        for v in range(1, V):
            if z[n, v] > m:
                m = z[n, v]
        total = 0.0
        for v in range(V):
            e = np.exp(z[n, v] - m)
            dz[n, v] = e
            total += e
        nll[n] = np.log(total) + m - zt
        scale = inv_n / total
        for v in range(V):
            dz[n, v] *= scale
        dz[n, tn] -= inv_n


def cross_entropy_forward_backward(logits, targets, ignore_index, out=None):
    V = logits.shape[-1]
    z = np.ascontiguousarray(logits).reshape(-1, V)
    t = np.ascontiguousarray(targets).reshape(-1).astype(np.int64, copy=False)
    n = int(np.count_nonzero(t != ignore_index))
    dz = np.empty_like(z) if out is None else out.reshape(-1, V)
    nll = np.empty(len(t), dtype=np.float64)
    _forward_backward(z.size, z, t, ignore_index, 1.0 / max(n, 1), dz, nll)
    loss = nll.sum() / max(n, 1)
    return logits.dtype.type(loss), dz.reshape(logits.shape)
