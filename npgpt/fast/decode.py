"""Kernels for decoding one token at a time: the attention of a new token (decode_attention) and a
Linear layer's product for one row (decode_linear).

decode_attention: attention for one new token a row, its key and value appended to the KV cache in the
same call. It mirrors CausalSelfAttention.forward_cached (npgpt/layers/attention.py) at T = 1, per batch
row b whose cache held L = pos[b] positions before this token:

    q, k, v = qkv[b].reshape(3, NH, hs)             # the new token's projections
    k_cache[b, :, L] = k;  v_cache[b, :, L] = v      # LayerKV.store: appended after the cached ones
    s = q[:, None, :] @ k_cache[b, :, :L + 1].transpose(0, 2, 1)     # (NH, 1, L + 1)
    a = softmax(scale * s)                            # causal_softmax: every cached key is visible
    y[b] = (a @ v_cache[b, :, :L + 1]).reshape(C)     # (NH, 1, hs) -> (C,), the heads re-assembled

The readable path runs this as a dozen NumPy calls a layer (split the heads, copy into the cache,
two stacked products over NH heads, the softmax kernel, re-assemble the heads): ~0.1 ms a layer at
B=1, most of it the calls' own cost, against a few microseconds of arithmetic. Here it is one call;
rows may hold different lengths (each row attends its own L + 1 keys, no mask needed). The (batch
row, head) pairs are split over the cores only when the cache is long and the batch wide.
"""
import numba
import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp_sum_, max_of


@pjit(reductions=True)
def _forward(qkv, k_cache, v_cache, pos, scale, y):
    """qkv (B, 3C); k_cache, v_cache (B, NH, n_ctx, hs); pos (B,) int64; y (B, C), written."""
    B, NH, _, hs = k_cache.shape
    C = NH * hs
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        L = pos[b]
        q = np.empty(hs, qkv.dtype)                        # plain indices into whole arrays, not slices of
        acc = np.empty(hs, qkv.dtype)                      # them: LLVM vectorises these loops (~4x faster)
        for i in range(hs):
            q[i] = qkv[b, h * hs + i]
            k_cache[b, h, L, i] = qkv[b, C + h * hs + i]          # k_cache[b, :, L] = k
            v_cache[b, h, L, i] = qkv[b, 2 * C + h * hs + i]      # v_cache[b, :, L] = v
        s = np.empty(L + 1, qkv.dtype)
        for j in range(L + 1):                             # s = scale * q @ k_cache[b, h, :L + 1]^T
            dot = qkv.dtype.type(0)
            for i in range(hs):
                dot += q[i] * k_cache[b, h, j, i]
            s[j] = dot * scale
        inv = 1.0 / exp_sum_(s, max_of(s, 0, L + 1))      # a = softmax(s) = exp(s - max) / sum
        acc[:] = 0.0
        for j in range(L + 1):                             # y = a @ v_cache[b, h, :L + 1]
            for i in range(hs):
                acc[i] += s[j] * v_cache[b, h, j, i]
        for i in range(hs):
            y[b, h * hs + i] = acc[i] * inv


def decode_attention(qkv, k_cache, v_cache, pos, scale, out=None):
    """y (B, C): each row's new token attending to its cached keys and itself, after its k and v (from
    qkv (B, 3C), the fused projection) are written into k_cache, v_cache (B, NH, n_ctx, hs) at pos[b]."""
    B, NH, _, hs = k_cache.shape
    y = np.empty((B, NH * hs), qkv.dtype) if out is None else out
    # pjit's work: the cache elements read, over 16. Measured on 2 cores (Sapphire Rapids), serial
    # against parallel: 22 vs 104 us at B=1, 161 keys; 221 vs 214 at 1001 keys (the cache streams from
    # L3); 922 vs 590 at B=8, 501 keys. So the cores split the work only from a few million elements.
    work = 2 * B * NH * (int(pos.max()) + 1) * hs // 16
    _forward(work, qkv, k_cache, v_cache, np.ascontiguousarray(pos, dtype=np.int64), qkv.dtype.type(scale), y)
    return y


@pjit(reductions=True)
def _linear(x, w, b, part, y):
    """y (O,) = x (K,) @ w (K, O) + b: task p sums the rows of its block k0..k1-1 of w into part[p] (O,),
    four rows a pass (each part[p, o] loaded and stored once for four multiply-adds); then
    y = b + sum_p part[p]."""
    K, O = w.shape
    P = part.shape[0]
    for p in prange(P):
        acc = part[p]
        acc[:] = 0.0
        k, k1 = p * K // P, (p + 1) * K // P
        while k + 4 <= k1:
            x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
            for o in range(O):
                acc[o] += x0 * w[k, o] + x1 * w[k + 1, o] + x2 * w[k + 2, o] + x3 * w[k + 3, o]
            k += 4
        while k < k1:
            xk = x[k]
            for o in range(O):
                acc[o] += xk * w[k, o]
            k += 1
    for o in range(O):
        s = b[o]
        for p in range(P):
            s += part[p, o]
        y[o] = s


def decode_linear(x, w, b, out=None):
    """y (O,) = x (K,) @ w (K, O) + b (O,) for one row x and a weight stored (in, out), as Linear keeps it.

    Mirrors `y = x @ w + b` (npgpt/layers/linear.py) for a decoded token. w's rows are split into one
    contiguous block per thread, each summed into its own (O,) partial and the partials added at the
    end ("split-K"): every thread streams its block of w from memory front to back. On 2 cores
    (Sapphire Rapids) the 48 block matrices of GPT-2 124M, one row each, read 33-35 GB/s this way
    against 28-31 GB/s through OpenBLAS's matrix-vector product in the same runs."""
    K, O = w.shape
    dtype = np.result_type(x, w)
    y = np.empty(O, dtype) if out is None else out
    part = np.empty((numba.get_num_threads(), O), dtype)
    _linear(K * O, x, w, b, part, y)
    return y
