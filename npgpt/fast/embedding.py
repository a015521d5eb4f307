"""Embedding backward (scatter-add). It mirrors npgpt/layers/embedding.py:

    np.add.at(dw, idx.reshape(-1), dout.reshape(-1, C))     # dw[idx[n]] += dout[n]

Serial over rows (two rows may hit the same token), vectorised over channels.
"""
import numpy as np

from ._jit import jit


@jit
def _scatter_add(idx, dout, dw):              # idx (N,), dout (N, C), dw (V, C)
    N, C = dout.shape
    for n in range(N):
        i = idx[n]
        for c in range(C):
            dw[i, c] += dout[n, c]


def embedding_backward(idx, dout, dw):
    C = dout.shape[-1]
    _scatter_add(np.ascontiguousarray(idx).reshape(-1), np.ascontiguousarray(dout).reshape(-1, C), dw)
