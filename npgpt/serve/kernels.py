"""Batch-invariant kernels: one decoding step for several sequences at once, where each row's
arithmetic is fixed by that row alone, never by how many rows share the step or which.

A BLAS GEMM of M rows may split, order and fuse its sums differently for every M, so a sequence
decoded beside others can round differently from the same sequence decoded alone, and greedy
text can drift. These kernels read each weight once per step for all rows (what makes batching
pay) but compute every output from its own row by a sequence of operations that depends only on
the layer's shape:

    in_out_matmul    y[a] = x[a] @ w + b, w (in, out) as Linear keeps it: decoding's few-row float32 product
                     (npgpt/fast/few_rows.py), in which every y[a, n] is its own chain of fused
                     multiply-adds over k = 0, 1, ..., K-1 in order, whatever the rows, the tile or the
                     threads, then + b[n]. Each weight is read once for every four rows.
    out_in_matmul    y[a, o] = s[o] * (x[a] . w[o]) + b[o], w (out, in): float rows (the tied LM head,
                     decode_layout's Linears), bf16 bits or int8 with per-row scales s (QuantLinear).
                     float32 and bf16 rows run decoding's few-row dot products (npgpt/fast/few_rows.py,
                     few_rows_matmul_t: 16 lanes of FMA chains, a fixed tree, the tail in order, whatever
                     the rows; bf16 widened exactly in registers). Other float rows (float64) take each
                     x[a]'s dot product with w[o] through the one compiled `_dot`, whose sum is
                     reassociated into SIMD lanes in an order fixed by K alone. int8 rows
                     run decoding's own kernel (npgpt/fast/quant.py): each x[a] quantized in blocks of
                     32, exact integer block sums, per-block scaling in a fixed order, so each row is
                     already the same operations whatever the batch, and equal to `npgpt generate`'s.
    attend_rows      per (row, head): softmax(q . k_t / sqrt(hs)) over that row's own L keys, then the
                     weighted sum of its values, t = 0 .. L-1 in order: the sums depend on L alone,
                     never on the longest row of the step (as a padded, masked batch's would).

Each kernel splits its work over output columns or (row, head) pairs, never inside a sum, so a serial
or a parallel build (few_rows' kernels pick by size) gives the same values. NumPy they mirror, for one row a:

    y[a] = x[a] @ w + b                     # in_out_matmul
    y[a] = (x[a] @ w.T) * s + b             # out_in_matmul, w unpacked (bf16)
    y[a] = q8_product(x[a], w, s) + b       # out_in_matmul, int8 (npgpt/inference/quant.py)
    p = softmax(q[a, h] @ K[r, h, :L].T * scale); out[a, h] = p @ V[r, h, :L]    # attend_rows
"""
import numpy as np
from numba import njit, prange

from ..fast._jit import JIT_OPTIONS, REDUCTION_MATH
from ..fast._math import exp, prefetch_row
from ..fast.few_rows import few_rows_matmul, few_rows_matmul_t
from ..fast.quant import packed_matmul, prefetch_ahead

CHUNK = 16          # output rows a task of _out_in_float takes (other float rows: float64)


@njit(fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def _dot(x, w):
    # x . w, reassociated into SIMD lanes in an order fixed by len(x)
    acc = x[0] * w[0]
    for k in range(1, x.shape[0]):
        acc += x[k] * w[k]
    return acc


@njit(parallel=True, fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def _out_in_float(x, w, b, y, ahead):
    # y[a, o] = x[a] . w[o] + b[o]
    A = x.shape[0]
    O = w.shape[0]
    for c in prange((O + CHUNK - 1) // CHUNK):
        for o in range(c * CHUNK, min(O, (c + 1) * CHUNK)):
            if ahead and o + ahead < O:
                prefetch_row(w, o + ahead)          # a hint (no effect on any value): the row to come
            for a in range(A):
                y[a, o] = _dot(x[a], w[o]) + b[o]


@njit(parallel=True, fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def _attend(q, K, V, rows, lengths, scale, out):
    # out[a, h] = softmax_t(scale * q[a, h] . K[r, h, t]) @ V[r, h, :L], r = rows[a], L = lengths[a]
    A, NH, hs = q.shape
    for i in prange(A * NH):
        a = i // NH
        h = i - a * NH
        r = rows[a]
        L = lengths[a]
        s = np.empty(L, dtype=out.dtype)
        for t in range(L):
            s[t] = _dot(q[a, h], K[r, h, t]) * scale
        m = s[0]
        for t in range(1, L):
            m = max(m, s[t])
        total = s[0] * 0
        for t in range(L):
            s[t] = exp(s[t] - m)
            total += s[t]
        acc = np.zeros(hs, dtype=out.dtype)
        for t in range(L):
            p = s[t]
            for d in range(hs):
                acc[d] += p * V[r, h, t, d]
        for d in range(hs):
            out[a, h, d] = acc[d] / total


def in_out_matmul(x, w, b):
    """y (A, out) = x (A, in) @ w (in, out) + b (out,), each row by the same fixed arithmetic."""
    x = np.ascontiguousarray(x, dtype=w.dtype)
    if w.dtype != np.float32 or not w.flags.c_contiguous:     # e.g. a float64 model: each row alone
        y = np.empty((len(x), w.shape[1]), w.dtype)
        for a in range(len(x)):
            y[a] = x[a] @ w + b                                  # a GEMV of one row, whatever the batch
        return y
    y = few_rows_matmul(x, w)
    y += b
    return y


def out_in_matmul(x, w, scale=None, b=None):
    """y (A, out) = x (A, in) @ W^T (* scale) + b for w (out, in): float, bf16 bits (uint16) or int8
    (with scale (out,)); each row by the same fixed arithmetic."""
    dtype = np.float32 if w.dtype in (np.uint16, np.int8) else w.dtype
    x = np.ascontiguousarray(x, dtype=dtype)
    if w.dtype in (np.uint16, np.float32):
        w = np.ascontiguousarray(w)                             # the dot products read C-ordered rows
    y = np.empty((x.shape[0], w.shape[0]), dtype=dtype)
    b = np.zeros(w.shape[0], dtype) if b is None else b
    if w.dtype == np.int8:
        packed_matmul(x, w, scale, b, out=y)
    elif w.dtype in (np.float32, np.uint16):
        few_rows_matmul_t(x, w, out=y)                           # 16 lanes, a fixed tree: an order fixed by K
        y += b
    else:
        _out_in_float(x, w, b, y, prefetch_ahead(w))
    return y


def attend_rows(q, k_cache, v_cache, rows, lengths):
    """q (A, NH, hs): one query per row; k_cache, v_cache (B, NH, n_ctx, hs); row a attends to the
    first lengths[a] keys of cache row rows[a] -> (A, NH, hs)."""
    q = np.ascontiguousarray(q)
    out = np.empty(q.shape, dtype=q.dtype)
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    _attend(q, k_cache, v_cache, np.asarray(rows, np.int64), np.asarray(lengths, np.int64), scale, out)
    return out
