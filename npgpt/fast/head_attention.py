"""Causal attention for short sequences, one head per task. It mirrors npgpt/layers/attention.py
(CausalSelfAttention.attend and the attention part of its backward) line for line:

    s  = q @ k^T                                   (T, T) per (batch row, head)
    a  = softmax(scale * s), key j masked out (a = 0) for query i when j > i
    y  = a @ v                                     (T, hs)
    # backward, from dy:
    da = dy @ v^T;  dv = a^T @ dy
    ds = scale * a * (da - rowsum(da * a))
    dq = ds @ k;    dk = ds^T @ q

The readable layer runs these as NumPy products over (B, NH) stacks of small matrices: each stack is
B * NH BLAS calls one after the other on one core (at nanoGPT's CPU shape, 48 products of 64 x 64 x 32
a call). Here the (batch row, head) pairs are split over the cores (prange); each task copies its
head's q, k, v into contiguous arrays and multiplies with np.dot (SciPy's BLAS, single-threaded:
npgpt/fast/flash_attention.single_threaded_tile_blas). Like the readable path, and unlike the fused
kernel (flash_attention.py), the (B, NH, T, T) probabilities are kept for backward: below the fused
kernel's crossover length they are small, and keeping them saves recomputing the exps.

No dropout: the layer takes this kernel only when attention dropout is inactive.
"""
import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp_sum_, max_of
from .flash_attention import single_threaded_tile_blas


@pjit(reductions=True)
def _forward(q, k, v, scale, y, a):
    """q, k, v, y (B, NH, T, hs) any strides; a (B, NH, T, T) C-contiguous receives the probabilities."""
    B, NH, T, hs = q.shape
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        Q = np.ascontiguousarray(q[b, h])
        K = np.ascontiguousarray(k[b, h])
        V = np.ascontiguousarray(v[b, h])
        A = a[b, h]
        A[:, :] = np.dot(Q, K.T)                       # s = q @ k^T
        for i in range(T):                              # a = causal softmax(scale * s), row by row
            row = A[i]
            n = i + 1                                   # keys 0..i are visible
            for j in range(n):
                row[j] *= scale
            inv = 1.0 / exp_sum_(row[:n], max_of(row, 0, n))
            for j in range(n):
                row[j] *= inv
            for j in range(n, T):
                row[j] = 0.0
        y[b, h] = np.dot(A, V)                          # y = a @ v


@pjit(reductions=True)
def _backward(q, k, v, a, dy, scale, dq, dk, dv):
    """Writes dq, dk, dv (B, NH, T, hs) (any strides) from dy and the forward's probabilities a."""
    B, NH, T, hs = q.shape
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        Q = np.ascontiguousarray(q[b, h])
        K = np.ascontiguousarray(k[b, h])
        V = np.ascontiguousarray(v[b, h])
        dY = np.ascontiguousarray(dy[b, h])
        A = a[b, h]
        dS = np.dot(dY, V.T)                            # da = dy @ v^T
        dv[b, h] = np.dot(A.T, dY)                      # dv = a^T @ dy
        for i in range(T):                              # ds = scale * a * (da - rowsum(da * a))
            dot = 0.0
            for j in range(i + 1):
                dot += dS[i, j] * A[i, j]
            for j in range(i + 1):
                dS[i, j] = scale * A[i, j] * (dS[i, j] - dot)
            for j in range(i + 1, T):
                dS[i, j] = 0.0
        dq[b, h] = np.dot(dS, K)                        # dq = ds @ k
        dk[b, h] = np.dot(dS.T, Q)                      # dk = ds^T @ q


def _work(q):
    B, NH, T, hs = q.shape
    return B * NH * T * T * hs // 8                     # ~ the products' multiply-adds, in elements' worth


def head_attention_forward(q, k, v, scale, out=None):
    """(y, a): y = causal softmax(scale * q k^T) v for q, k, v (B, NH, T, hs) (views of any strides, one
    dtype), written into `out` when given (e.g. the (B, NH, T, hs) view of the (B, T, C) buffer the heads
    are re-assembled in), and a (B, NH, T, T) the probabilities, for head_attention_backward."""
    B, NH, T, hs = q.shape
    single_threaded_tile_blas()
    y = np.empty(q.shape, q.dtype) if out is None else out
    a = np.empty((B, NH, T, T), q.dtype)
    _forward(_work(q), q, k, v, q.dtype.type(scale), y, a)
    return y, a


def head_attention_backward(q, k, v, a, dy, scale, dq, dk, dv):
    """Writes dq, dk, dv (B, NH, T, hs) (e.g. views of the fused qkv projection's gradient) from dy."""
    single_threaded_tile_blas()
    _backward(2 * _work(q), q, k, v, a, dy, q.dtype.type(scale), dq, dk, dv)
