"""Fused softmax cross-entropy. It mirrors npgpt/loss.py:cross_entropy_numpy:

    m = max_v z;  e = exp(z - m);  sumexp = sum_v e
    nll = log(sumexp) + m - z[target]                  (0 where target == ignore_index)
    loss = sum(nll) / n;  dz = (e / sumexp - onehot(target)) / n   (0 on ignored rows)
    (n: the count of non-ignored rows, or the caller's normalizer)

One pass over the (N, V) logits from memory, a row at a time (prange over rows): the row is copied
into dz (unless dz is the logits array itself, out=logits), and while it sits in cache its max is
found (max_of), e = exp(z - m) written and summed (the vectorised exp of npgpt/fast/_math.py;
blocks of SUM_BLOCK terms in the logits' dtype, the block sums in float64), and e scaled into dz.

token_nll is the forward alone, for evaluation (npgpt/eval/score.py:token_nll_numpy, which it mirrors):

    best = argmax_v z  (the first maximum);  m = z[best]
    nll = log(sum_v exp(z - m)) + m - z[target];  hit = best == target
"""
import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp_sum_, max_of

SUM_BLOCK = 256      # terms of a row summed in the logits' dtype (at full SIMD width) before going to float64


@pjit(reductions=True)
def _rows(z, t, ignore_index, inv_n, dz, same, nll):   # dz (N, V) <- dlogits; nll (N,) float64
    N, V = z.shape
    for n in prange(N):
        e = dz[n]                                   # (V,) this row's output
        if t[n] == ignore_index:
            nll[n] = 0.0
            e[:] = 0.0                              # ignored rows get no gradient
            continue
        zt = z[n, t[n]]                             # read before the row is overwritten (same)
        if not same:
            e[:] = z[n]                             # the row, then in cache for the passes below
        mx = max_of(e, 0, V)                        # m = max_v z
        total = 0.0
        for v0 in range(0, V, SUM_BLOCK):           # e = exp(z - m); sumexp in float64 over blocks
            total += exp_sum_(e[v0:min(v0 + SUM_BLOCK, V)], mx)
        nll[n] = np.log(total) + mx - zt            # nll = log(sumexp) + m - z[target]
        scale = e.dtype.type(inv_n / total)
        for v in range(V):
            e[v] *= scale                           # dz = e / sumexp / n ...
        e[t[n]] -= inv_n                            # ... - onehot(target) / n


def cross_entropy_forward_backward(logits, targets, ignore_index, out=None, normalizer=None):
    V = logits.shape[-1]
    z = np.ascontiguousarray(logits).reshape(-1, V)
    t = np.ascontiguousarray(targets).reshape(-1).astype(np.int64, copy=False)
    N = len(t)
    n = max(int(np.count_nonzero(t != ignore_index)), 1) if normalizer is None else normalizer
    dz = np.empty_like(z) if out is None else out.reshape(-1, V)
    same = dz.ctypes.data == z.ctypes.data
    if not same and np.shares_memory(dz, z):
        raise ValueError("cross_entropy: out overlaps the logits without being them (pass out=logits or a separate array)")
    nll = np.empty(N)
    _rows(z.size, z, t, ignore_index, 1.0 / n, dz, same, nll)
    loss = nll.sum() / n
    return logits.dtype.type(loss), dz.reshape(logits.shape)


@pjit(reductions=True)
def _token_rows(z, t, nll, hit):                    # z (N, V) is overwritten with exp(z - m)
    N, V = z.shape
    for n in prange(N):
        e = z[n]                                    # (V,)
        mx = max_of(e, 0, V)                        # m = max_v z
        best = 0
        for v in range(V):                          # the first maximum, as argmax (or the first NaN)
            if e[v] == mx or e[v] != e[v]:
                best = v
                break
        zt = e[t[n]]
        total = 0.0
        for v0 in range(0, V, SUM_BLOCK):           # e = exp(z - m); sumexp in float64 over blocks
            total += exp_sum_(e[v0:min(v0 + SUM_BLOCK, V)], mx)
        nll[n] = np.log(total) + mx - zt            # nll = log(sumexp) + m - z[target]
        hit[n] = best == t[n]


def token_nll(logits, targets):
    """-log softmax(logits)[target] (float64) and argmax == target for each row of logits (N, V), which are
    overwritten (with exp(z - max)); one pass a row, rows over the cores."""
    z = logits if logits.flags.c_contiguous else np.ascontiguousarray(logits)
    t = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)
    nll, hit = np.empty(len(t)), np.empty(len(t), dtype=np.bool_)
    _token_rows(z.size, z, t, nll, hit)
    return nll, hit
