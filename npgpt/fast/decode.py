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

decode_block (below) runs a whole block of a packed-weight model for one new token a row in one call:
this attention, the products and the LayerNorm, GELU and residual lines around them.
"""
import numpy as np
from numba import njit, prange

from ._jit import JIT_OPTIONS, REDUCTION_MATH, _renamed, pjit
from ._math import exp_sum_, max_of
from . import gelu, layernorm
from .quant import activations, chunks, prefetch_ahead, product_chunk, side_by_side, uses_dots

layernorm_rows = layernorm._forward.serial      # the serial builds of those kernels, called from _block
gelu_rows = gelu._forward.serial


# A function of its own, called (not inlined) from _forward and _block: inlined code takes the caller's
# fastmath flags, and without reassociation the dot over the keys ran one element at a time (the block
# call at 900 cached tokens took 1.09x the modules' time; 0.95x once called).
@njit(fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def _attend(qkv, k_cache, v_cache, pos, scale, y, bh):
    # batch row b = bh // NH, head h = bh % NH: the lines of the module docstring
    B, NH, _, hs = k_cache.shape
    C = NH * hs
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


@pjit(reductions=True)
def _forward(qkv, k_cache, v_cache, pos, scale, y):
    """qkv (B, 3C); k_cache, v_cache (B, NH, n_ctx, hs); pos (B,) int64; y (B, C), written."""
    B, NH = k_cache.shape[:2]
    # np.int64(bh): prange's index is unsigned in the parallel build and signed in the serial one, and
    # _attend would be compiled once for each (so are the other kernels' callees that take the index)
    for bh in prange(B * NH):
        _attend(qkv, k_cache, v_cache, pos, scale, y, np.int64(bh))


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


# ----------------------------------------------------------------------------- a whole block, one call
# decode_block runs one transformer block for one new token a row, with packed weights (bf16, int8 or
# float32 rows), as a single compiled call. It mirrors Block.forward_cached at T = 1
# (npgpt/layers/block.py) through the code that path runs (the products' chunks of npgpt/fast/quant.py, the attention above, the
# LayerNorm and GELU kernels), so its values are theirs up to float32 rounding (where sums are
# reassociated, the two builds may add in another order):
#
#     h = ln_1(x)
#     qkv = h @ W_attn^T + b_attn                   # (B, 3C)
#     y = attention of qkv over the cache           # (B, C), k and v appended
#     x = x + (y @ W_proj^T + b_proj)
#     h = ln_2(x)
#     f = gelu(h @ W_fc^T + b_fc)                   # (B, 4C)
#     x = x + (f @ W_mproj^T + b_mproj)
#
# What it saves is what lies between the kernels: through the modules a decoded token of GPT-2 124M runs
# a dozen Python calls a block (modules, wrappers, checks, temporaries). It is one parallel function with
# its own prange loops rather than a serial one calling the parallel kernels: Numba's disk cache of a
# function that calls parallel functions crashed when loaded.
#
# The four products run in one loop over p, the same prange loop for each: Numba compiles every prange
# loop as a function of its own that carries a copy of all it calls (a product's chunk code is ~0.7 MB of
# LLVM IR for float32 rows), so with the four written out the block took 16-29 s to compile, most of a
# first `npgpt generate`'s wait; with one loop, 5-7 s. The same operations in the same order.
#
# And the block is built twice, its float32 / bf16 products taking few_rows's dot products (dots) or the
# Numba loops (quant.float_chunk, quant.uses_dots: up to DOT_ROWS rows, or more), each build carrying one of
# the two: a process compiles only the build its batches run. A first fp32 `npgpt generate` compiled for 21.3 s
# with both, 12.6 s with one (2026-12-07). int8 products are the same in both: BLOCKS[True] runs them.

def _block_of(dots: bool):
    def _block(x, g1, b1, g2, b2, eps, wa, sa, ba, wp, sp, bp, wf, sf, bf, wm, sm, bm,
               k_cache, v_cache, pos, scale, gelu_s, gelu_k, one, sbs, ahead_a, ahead_p, ahead_f, ahead_m):
        B, C = x.shape                                     # x (B, C), updated in place
        NH = k_cache.shape[1]
        h = np.empty((B, C), x.dtype)                      # ln_1(x), later ln_2(x)
        xhat, rstd = np.empty((B, C), x.dtype), np.empty(B, x.dtype)
        qkv = np.empty((B, wa.shape[0]), x.dtype)          # (B, 3C)
        y = np.empty((B, C), x.dtype)                      # the attention's output
        a = np.empty((B, C), x.dtype)                      # a residual branch's output
        f = np.empty((B, wf.shape[0]), x.dtype)            # (B, 4C)
        g = np.empty_like(f)
        # the block's four products in order, p: outs[p] = ins[p] @ ws[p]^T + bs[p] (ss[p]: int8's scales)
        #   p = 0: qkv = h @ W_attn^T + b_attn         then y = attention of qkv, k and v appended
        #   p = 1: a = y @ W_proj^T + b_proj           then x = x + a, h = ln_2(x)
        #   p = 2: f = h @ W_fc^T + b_fc               then g = gelu(f)
        #   p = 3: a = g @ W_mproj^T + b_mproj         then x = x + a
        ins, outs = (h, y, h, g), (qkv, a, f, a)
        ws, ss, bs = (wa, wp, wf, wm), (sa, sp, sf, sm), (ba, bp, bf, bm)
        ahead = (ahead_a, ahead_p, ahead_f, ahead_m)
        layernorm_rows(x, g1, b1, eps, h, xhat, rstd)      # h = ln_1(x)
        for p in range(4):
            xa, xb = activations(ins[p], ws[p])
            for c in prange(chunks(ws[p])):
                product_chunk(xa, xb, ws[p], ss[p], bs[p], outs[p], np.int64(c), sbs, ahead[p], dots)
            if p == 0:
                for bh in prange(B * NH):                  # y = attention, k and v appended
                    _attend(qkv, k_cache, v_cache, pos, scale, y, np.int64(bh))
            elif p == 2:
                gelu_rows(f.reshape(-1), g.reshape(-1), gelu_s, gelu_k, one)   # g = gelu(f)
            else:
                for n in range(B):
                    for k in range(C):
                        x[n, k] = x[n, k] + a[n, k]        # x = x + a
                if p == 1:
                    layernorm_rows(x, g2, b2, eps, h, xhat, rstd)   # h = ln_2(x)

    return njit(parallel=True, **JIT_OPTIONS)(_renamed(_block, "_dots" if dots else "_loops"))


BLOCKS = {dots: _block_of(dots) for dots in (True, False)}


def block_kernel(rows: int, side_by_side: int, int8: bool):
    """The build of the block kernel a batch of `rows` rows runs (BLOCKS, quant.uses_dots)."""
    return BLOCKS[int8 or uses_dots(rows, side_by_side)]


def decode_block(x, ln_1, ln_2, eps, attn, proj, fc, mproj, k_cache, v_cache, pos, scale):
    """One block for one new token a row, in place on x (B, C) float32 C-contiguous. ln_1, ln_2: (gain,
    bias); attn, proj, fc, mproj: (packed, scale | None, bias) of c_attn, attn.c_proj, mlp.c_fc,
    mlp.c_proj, all bf16 (uint16), all float32 rows (out, in) or all int8 (with their scales),
    C-contiguous; k_cache, v_cache (B, NH, n_ctx, hs) float32 and pos (B,) as decode_attention's.
    Block.forward_cached's values."""
    run_block(x, block_constants(ln_1, ln_2, eps, attn, proj, fc, mproj, scale, x.dtype), k_cache, v_cache,
              np.ascontiguousarray(pos, dtype=np.int64))


def block_constants(ln_1, ln_2, eps, attn, proj, fc, mproj, scale, dtype=np.float32):
    """decode_block's arguments other than x, the caches and pos (weights, constants, the kernels'
    choices), which stay the same token after token: a plan prepares them once (npgpt/inference/fused.py)
    and run_block takes them. Preparing them on every call cost ~10 us a block (0.12 ms of a 5.2 ms int8
    token of GPT-2 124M)."""
    ones = None
    weights = []
    for w, s, b in (attn, proj, fc, mproj):
        if s is None:                                  # bf16, float32 rows: no scales (a typed placeholder)
            ones = np.ones(1, np.float32) if ones is None else ones
            s = ones
        weights += [w, s, b]
    dtype = np.dtype(dtype)
    sbs = side_by_side()
    before = (*ln_1, *ln_2, float(eps), *weights)
    after = (dtype.type(scale), *gelu._constants(dtype), sbs,
             *(prefetch_ahead(w) for w, _, _ in (attn, proj, fc, mproj)))
    return before, after, (sbs, all(w.dtype == np.int8 for w, _, _ in (attn, proj, fc, mproj)))


def run_block(x, constants, k_cache, v_cache, pos):
    """decode_block with the constants block_constants prepared; pos (B,) int64 C-contiguous."""
    before, after, (sbs, int8) = constants
    block_kernel(x.shape[0], sbs, int8)(x, *before, k_cache, v_cache, pos, *after)
