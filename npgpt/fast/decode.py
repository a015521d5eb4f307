"""Attention for one new token a row (decoding), its key and value appended to the KV cache in the same
call. It mirrors CausalSelfAttention.forward_cached (npgpt/layers/attention.py) at T = 1, per batch
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


def decode_attention(qkv, k_cache, v_cache, pos, scale, out=None, threads_awake=False):
    """y (B, C): each row's new token attending to its cached keys and itself, after its k and v (from
    qkv (B, 3C), the fused projection) are written into k_cache, v_cache (B, NH, n_ctx, hs) at pos[b].
    threads_awake: the kernel threads ran the call before this one (and still spin): split the heads
    over them whatever the size."""
    B, NH, _, hs = k_cache.shape
    y = np.empty((B, NH * hs), qkv.dtype) if out is None else out
    # pjit's work: the cache elements read, over 16. Measured on 2 cores (Sapphire Rapids), serial
    # against parallel with the kernel threads asleep: 22 vs 104 us at B=1, 161 keys (cache warm); 221
    # vs 214 at 1001 keys (from L3); 922 vs 590 at B=8, 501 keys: the cores split the work only from a few
    # million elements. Inside a decode the cache comes from DRAM (~85 us a layer at B=1, ~100 keys): with
    # the threads awake after an int8 product, both cores' loads in flight made int8 decode 0.92x (0.89-0.94)
    # the time of the serial kernel's; after a BLAS product (fp32) 1.10x (paired, 6 rounds each).
    work = 2 * B * NH * (int(pos.max()) + 1) * hs // 16
    if threads_awake and B * NH > 1:
        work = 1 << 62
    _forward(work, qkv, k_cache, v_cache, np.ascontiguousarray(pos, dtype=np.int64), qkv.dtype.type(scale), y)
    return y
