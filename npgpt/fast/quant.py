"""Weight-only quantized products for decoding: few rows of x times a packed weight, float32 sums.

Weights are packed (out, in), one output channel per row, so each output channel reads one
contiguous row; the work is split over output channels (prange). NumPy they mirror:

    # bf16: w16 (out, in) uint16, the top half of float32 bit patterns
    w = (w16.astype(np.uint32) << 16).view(np.float32)     # (out, in)
    y = x @ w.T + b                                        # (N, out)

    # int8: q (out, in) int8, scale (out,) float32, symmetric per output channel; each row of x
    # quantized to 16 bits in blocks of 32 (npgpt/inference/quant.py, quantize_activations, q8_product)
    x16, d = quantize_activations(x)                       # (N, in) int16, (N, in/32) float32
    y[n, o] = scale[o] * sum_b d[n, b] * (x16[n, block b] . q[o, block b]) + b[o]

bf16 sums run in float32: up to DOT_ROWS rows of x as npgpt/fast/few_rows.py's dot products (16 lanes of
FMA chains, a fixed tree: an order fixed by K), except one row where side_by_side() is 4 (Intel CPUs),
and more rows, in Numba loops reassociated into SIMD lanes; float32 rows (decode_layout's) the same way.
The dot products ask for no rows ahead (no software prefetch) except at 5-8 rows of x, where rows of up to
2 KB are asked for into L2 four rows ahead (few_rows._dots_rows): measured on an AMD Zen 4 only, where long
rows stream faster without it; on Intel CPUs their 2-8 rows are unmeasured. int8 blocks are exact integer
dot products on the CPU's own instructions (vpdpwssd where it has VNNI, pmaddwd with AVX2:
npgpt/fast/_q8.py), scaled per block. A bf16 weight becomes a float32 in a register (a zero-extend, a
shift and a bit cast: npgpt/fast/_math.py and `weight` below, or the same three instructions in few_rows'
IR), so the kernel reads each packed weight once and does one multiply-add with it for each row of x.
Made for the N <= ~16 rows of decoding, where reading the weights from DRAM is the cost and packed
weights read 2x / 4x fewer bytes; for many rows (a long prompt) `dequantize_rows` unpacks a block of output channels into a
float32 scratch and BLAS does the product (see npgpt/inference/quant.py).
"""
import numpy as np
from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import overload

from . import settings
from ._jit import JIT_OPTIONS, REDUCTION_MATH, _renamed, pjit
from ._math import bits_to_float32, prefetch_row
from ._q8 import BLOCK, q8_dot, q8_dot4
from .few_rows import dots_chunk, dots_limit

CHUNK = 16          # output channels per parallel task (four float32 rows of buffer for several rows of x)
# float32 and bf16 products of up to DOT_ROWS rows of x run few_rows's dot products (dots_chunk: LLVM IR, the
# weight rows widened in registers), more rows the Numba loops below. GPT-2 124M's bf16 block weights on the
# Zen 4, GB/s against those loops, alternated: 1 row 30.4 vs 26.1, 2 rows 23.0 vs 14.6, 8 rows 10.6 vs 8.7
# (the LM head 42.4 vs 36.8, 31.7 vs 19.1, 10.8 vs 9.1).
DOT_ROWS = dots_limit()


_SIDE_BY_SIDE = None    # side_by_side()'s answer, found on first use
_AHEAD = None           # prefetch_ahead()'s answer when set here (benchmarks, tests); else found per row size:
_AHEAD_BY_ROW = {}


def side_by_side() -> int:
    """How many weight rows a product with one row of x (a decoded token) streams at once: 4 (each x[k]
    loaded once for four multiply-adds, the Numba loop _one_row) or 1 (one row after another: few_rows'
    dot products for float32 and bf16 rows; for bf16 on the Zen 4 1.11x the old one-row loop's GB/s, for
    float32 rows 29.9 against 31.3 in one run). Which is faster depends on the
    CPU's prefetchers, measured (docs/performance.md, "Decode against llama.cpp"): on an Intel Xeon
    (Sapphire Rapids) four rows read bf16 weights at 25 GB/s against 18 and int8 at 22 against 16 (2
    cores); on an AMD EPYC (Zen 4) one row at a time read GPT-2's int8 LM head from memory at 21-30 GB/s
    against 11-13, and bf16 at 23-29 against 16-17 (examples/bench_packed_rows.py). So 1 on AMD CPUs,
    4 on others; the environment variable NPGPT_PACKED_ROWS (1 or 4) decides instead. The sums are the
    same either way up to float32 rounding."""
    global _SIDE_BY_SIDE
    if _SIDE_BY_SIDE is None:
        _SIDE_BY_SIDE = settings.packed_rows()
    return _SIDE_BY_SIDE


def prefetch_ahead(w) -> int:
    """How many rows of weight w (out, in) ahead of the one it reads a product asks the CPU to start
    loading (prefetch_row), 0 for none: settings.prefetch_rows for w's row size (where the figures are),
    found once per row size. Passed to the kernels at run time."""
    row_bytes = w.shape[1] * w.itemsize
    if _AHEAD is not None:                      # set directly (benchmarks, tests)
        return _AHEAD
    if row_bytes not in _AHEAD_BY_ROW:
        _AHEAD_BY_ROW[row_bytes] = settings.prefetch_rows(row_bytes)
    return _AHEAD_BY_ROW[row_bytes]


def unpack_row(w, o, row):
    """row (K,) float32 <- packed weight row o of w (out, K): f32(w16) for bf16 bits (uint16), a copy for
    float32. A Numba helper for the kernels (here and in npgpt/serve/kernels.py); int8 rows go through
    the integer kernels below instead."""
    row[:] = (w[o].astype(np.uint32) << np.uint32(16)).view(np.float32) if w.dtype == np.uint16 else w[o]


def weight(w, o, k):
    """float32 of packed weight w[o, k]: f32(w16) for bf16 bits (uint16), itself for float32. A Numba
    helper (one element of unpack_row)."""
    if w.dtype == np.uint16:
        return (np.array(w[o, k], np.uint32) << np.uint32(16)).view(np.float32)[()]
    return np.float32(w[o, k])


@overload(weight)
def _weight(w, o, k):
    if w.dtype == types.uint16:
        return lambda w, o, k: bits_to_float32(np.uint32(w[o, k]) << np.uint32(16))
    if w.dtype == types.float32:
        return lambda w, o, k: w[o, k]


@overload(unpack_row)
def _unpack_row(w, o, row):
    if w.dtype in (types.uint16, types.float32):
        def unpack(w, o, row):
            for k in range(row.shape[0]):
                row[k] = weight(w, o, k)
        return unpack


@njit(fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def _dot4(x, w, o):
    # x (K,) . w[o + r] for r = 0..3: four weight rows streamed side by side, each x[k] loaded once for
    # four multiply-adds (one row at a time reads 15.9-16.9 GB/s of bf16 on 2 cores, four 21-22)
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for k in range(x.shape[0]):
        xk = x[k]
        a0 += xk * weight(w, o, k)
        a1 += xk * weight(w, o + 1, k)
        a2 += xk * weight(w, o + 2, k)
        a3 += xk * weight(w, o + 3, k)
    return a0, a1, a2, a3


@njit(fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def _dot1(x, w, o):
    # x (K,) . w[o]
    acc = np.float32(0.0)
    for k in range(x.shape[0]):
        acc += x[k] * weight(w, o, k)
    return acc


@njit(**JIT_OPTIONS)
def _one_row(x, w, b, y, O, lo, hi, side_by_side, ahead):
    # y[o] = x . w[o] + b[o] for o in lo..hi-1: four rows at a time
    # (side_by_side 4), then the rest (or all of them, side_by_side 1) one at a time; the rows `ahead`
    # rows on asked for (0: not)
    o = lo
    while side_by_side == 4 and o + 4 <= hi:
        if ahead and o + ahead + 4 <= O:
            for r in range(4):
                prefetch_row(w, o + ahead + r)      # a hint: the rows to come start loading now
        a = _dot4(x, w, o)
        for r in range(4):
            y[o + r] = a[r] + b[o + r]
        o += 4
    while o < hi:
        if ahead and o + ahead < O:
            prefetch_row(w, o + ahead)
        a = _dot1(x, w, o)
        y[o] = a + b[o]
        o += 1


@njit(fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def _dot4x4(x, n, rows):
    # x[n + i] . rows[r] for i, r = 0..3 (the 16 sums, i-major): each loaded x[., k] and rows[., k] serves
    # four multiply-adds (for 8 rows of x, then int8: 16.6 against 18.5 ms for a token's weights, one unpacked
    # row against four rows of x at a time)
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for k in range(x.shape[1]):
        w0, w1, w2, w3 = rows[0, k], rows[1, k], rows[2, k], rows[3, k]
        x0, x1, x2, x3 = x[n, k], x[n + 1, k], x[n + 2, k], x[n + 3, k]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
        a20 += x2 * w0
        a21 += x2 * w1
        a22 += x2 * w2
        a23 += x2 * w3
        a30 += x3 * w0
        a31 += x3 * w1
        a32 += x3 * w2
        a33 += x3 * w3
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(**JIT_OPTIONS)
def _few_rows(x, w, b, y, O, lo, hi, ahead):
    # y[n, o] = x[n] . w[o] + b[o] for every row n of x and o in lo..hi-1:
    # four weight rows unpacked at a time, then taken against four rows of x at a time
    N, K = x.shape
    rows = np.empty((4, K), np.float32)
    o = lo
    while o + 4 <= hi:
        if ahead and o + ahead + 4 <= O:
            for r in range(4):
                prefetch_row(w, o + ahead + r)
        for r in range(4):
            unpack_row(w, o + r, rows[r])
        n = 0
        while n + 4 <= N:
            a = _dot4x4(x, n, rows)
            for i in range(4):
                for r in range(4):
                    s = a[4 * i + r]
                    y[n + i, o + r] = s + b[o + r]
            n += 4
        while n < N:
            a4 = _dot4(x[n], rows, 0)
            for r in range(4):
                y[n, o + r] = a4[r] + b[o + r]
            n += 1
        o += 4
    while o < hi:                                   # the chunk's last rows, one at a time
        for n in range(N):
            a1 = _dot1(x[n], w, o)
            y[n, o] = a1 + b[o]
        o += 1


@njit(**JIT_OPTIONS)
def _chunk(x, w, b, y, c, side_by_side, ahead):
    # y[n, o] = sum_k x[n, k] * weight(w, o, k) + b[o] for the output channels of chunk c
    N = x.shape[0]
    O = w.shape[0]
    lo, hi = c * CHUNK, min(O, (c + 1) * CHUNK)
    if N == 1:                                      # one row of x: unpack on the fly, in registers
        _one_row(x[0], w, b, y[0], O, lo, hi, side_by_side, ahead)
    else:                                           # several rows: each weight row unpacked once
        _few_rows(x, w, b, y, O, lo, hi, ahead)


@njit(**JIT_OPTIONS)
def _dots(x, w, b, y, c):
    # chunk c of y = x @ W^T + b for float32 or bf16 rows w: few_rows's dot products
    dots_chunk(x, w, b, y, c * CHUNK, min(w.shape[0], (c + 1) * CHUNK))


def uses_dots(rows: int, side_by_side: int) -> bool:
    """Whether a float32 or bf16 product of `rows` rows of x takes few_rows's dot products (_dots) rather
    than the Numba loops (_chunk): up to DOT_ROWS rows, except one row where side_by_side() says 4 (Intel:
    the four-rows loop measured faster there; the dot products were measured on the Zen 4 alone)."""
    return rows <= DOT_ROWS and not (rows == 1 and side_by_side == 4)


def float_chunk(x, w, b, y, c, side_by_side, ahead, dots):
    """Chunk c of y = x @ W^T + b for float32 or bf16 rows w: _dots when `dots`, else _chunk. `dots` is a
    constant where the caller is compiled (a closure's, chosen by uses_dots before the call), so that a
    build carries one of the two and not both: each is ~0.7 MB of LLVM IR in every prange loop calling
    it: with both, a first `npgpt generate` compiled for 21.3 s, with one 12.6 s (docs/performance.md,
    "Cold start")."""


@overload(float_chunk, inline="always", prefer_literal=True)
def _float_chunk(x, w, b, y, c, side_by_side, ahead, dots):
    if not isinstance(dots, types.BooleanLiteral):
        raise TypingError("float_chunk: dots must be a compile-time constant (a closure's or a global bool)")
    if dots.literal_value:
        return lambda x, w, b, y, c, side_by_side, ahead, dots: _dots(x, w, b, y, c)
    return lambda x, w, b, y, c, side_by_side, ahead, dots: _chunk(x, w, b, y, c, side_by_side, ahead)


def _matmul_of(dots: bool):
    """The float32 / bf16 product kernel with the dot products or the loops compiled in (float_chunk)."""
    def _matmul(x, w, b, y, side_by_side, ahead):
        # y[n, o] = sum_k x[n, k] * weight(w, o, k) + b[o]   (w bf16 bits or float32)
        for c in prange((w.shape[0] + CHUNK - 1) // CHUNK):
            float_chunk(x, w, b, y, np.int64(c), side_by_side, ahead, dots)   # np.int64: as decode._forward's
    return pjit(reductions=True)(_renamed(_matmul, "_dots" if dots else "_loops"))


_MATMUL = {dots: _matmul_of(dots) for dots in (True, False)}


@njit(**JIT_OPTIONS)                # no fastmath: the same IEEE operations as the NumPy lines
def _quantize_q8(x, x16, d):
    # per row n and block b of 32 along K (the last may be shorter):
    #   d[n, b] = max |x[n, block]| / 32767,  x16 = rint(x * (1 / d))
    # the whole blocks with their size a constant (LLVM then unrolls and vectorises each: 3x faster than
    # one loop over every block with its bounds computed), a partial last block after them
    N, K = x.shape
    for n in range(N):
        bits = x[n].view(np.uint32)
        for b in range(K // BLOCK):
            _quantize_block(x, bits, x16, d, n, b, BLOCK)
        if K % BLOCK:
            _quantize_block(x, bits, x16, d, n, K // BLOCK, K % BLOCK)


@njit(inline="always", **JIT_OPTIONS)
def _quantize_block(x, bits, x16, d, n, b, size):
    # block b of row n, its `size` elements from b * BLOCK on (bits: row n's float32 bit patterns).
    # The maximum is taken over the bit patterns of |x| (an integer maximum, which vectorises): they
    # order as the values do, and a NaN's lies above inf's, so a block holding a NaN gets d = NaN and
    # one holding an inf d = inf, and its outputs come out NaN. Zeros where d is 0 or not finite, or so
    # small that 1 / d overflows
    lo = b * BLOCK
    m = np.uint32(0)
    for k in range(size):
        m = max(m, bits[lo + k] & np.uint32(0x7FFFFFFF))
    db = bits_to_float32(m) / np.float32(32767.0)
    inv = np.float32(1.0) / db if db > 0 else np.float32(0.0)
    d[n, b] = db
    if db > 0 and db < np.inf and inv < np.inf:
        for k in range(size):
            x16[n, lo + k] = np.int16(np.rint(x[n, lo + k] * inv))
    else:                                   # an all-zero, non-finite or vanishing block: zeros
        for k in range(size):
            x16[n, lo + k] = 0


@njit(inline="always", **JIT_OPTIONS)   # no fastmath: each y[n, o] the same operations whatever N and threads
def _q8_chunk(x16, d, q, scale, b, y, c, ahead):
    # y[n, o] = scale[o] * sum_b d[n, b] * (x16[n, block b] . q[o, block b]) + b[o] for the output channels
    # o of chunk c: each weight row read once (from memory), then taken against four rows of x at a time
    # (from L1), then the rest; q8_dot4 gives each row the same bits as q8_dot alone, so y[n] never depends
    # on the other rows. Rows of x16 are passed by index, never as views (see q8_dot)
    N = x16.shape[0]
    O = q.shape[0]
    for o in range(c * CHUNK, min(O, (c + 1) * CHUNK)):
        if ahead and o + ahead < O:
            prefetch_row(q, o + ahead)
        N4 = N - N % 4                       # for-loops, not a counter shared by two while-loops: inlined,
        for n in range(0, N4, 4):            # that counter tripped Numba's SSA check (a warning on stderr)
            s4 = q8_dot4(x16, d, n, q, o)
            for r in range(4):
                y[n + r, o] = s4[r] * scale[o] + b[o]
        for n in range(N4, N):
            y[n, o] = q8_dot(x16, d, n, q, o) * scale[o] + b[o]


@pjit
def _matmul_q8(x, q, scale, b, y, ahead):
    # y = x @ (q * scale)^T + b with x quantized first: the chunks of _q8_chunk over the cores
    N, K = x.shape
    x16 = np.empty((N, K), np.int16)           # allocated here, not returned by a helper (a build that took
    d = np.empty((N, (K + BLOCK - 1) // BLOCK), np.float32)     # them from one ran 8 rows ~1.4x slower)
    _quantize_q8(x, x16, d)
    for c in prange((q.shape[0] + CHUNK - 1) // CHUNK):
        _q8_chunk(x16, d, q, scale, b, y, c, ahead)


# The same products taken apart for a kernel with its own parallel loops (npgpt/fast/decode.py,
# decode_block): x prepared once (int8: quantized), then each chunk of CHUNK output channels.
#     xa, xb = activations(x, w)
#     for c in prange(chunks(w)): product_chunk(xa, xb, w, scale, b, y, c, side_by_side, ahead, dots)

def activations(x, w):
    """int8 w: (x16, d), x quantized; bf16 or float32 w: (x, x)."""


@njit(**JIT_OPTIONS)
def chunks(w):
    """How many chunks of output channels w's product has."""
    return (w.shape[0] + CHUNK - 1) // CHUNK


def product_chunk(xa, xb, w, scale, b, y, c, side_by_side, ahead, dots):
    """Chunk c of y = x @ W^T + b, from activations(x, w); float32 and bf16 rows as float_chunk (dots: a
    compile-time constant), int8 rows by _q8_chunk."""


@overload(activations, inline="always")     # x16 and d allocated in the caller itself (see _matmul_q8)
def _activations(x, w):
    if w.dtype == types.int8:
        def impl(x, w):
            N, K = x.shape
            x16 = np.empty((N, K), np.int16)
            d = np.empty((N, (K + BLOCK - 1) // BLOCK), np.float32)
            _quantize_q8(x, x16, d)
            return x16, d
        return impl
    return lambda x, w: (x, x)


@overload(product_chunk, inline="always", prefer_literal=True)
def _product_chunk(xa, xb, w, scale, b, y, c, side_by_side, ahead, dots):
    if w.dtype == types.int8:
        return lambda xa, xb, w, scale, b, y, c, side_by_side, ahead, dots: _q8_chunk(xa, xb, w, scale, b, y, c,
                                                                                     ahead)
    return lambda xa, xb, w, scale, b, y, c, side_by_side, ahead, dots: float_chunk(xa, w, b, y, c, side_by_side,
                                                                                   ahead, dots)


def quantize_q8(x):
    """(x16 (N, K) int16, d (N, ceil(K/32)) float32): x (N, K) float32 quantized in blocks of 32 along K,
    as npgpt.inference.quant.quantize_activations (the NumPy it mirrors)."""
    N, K = x.shape
    x16 = np.empty((N, K), np.int16)
    d = np.empty((N, -(-K // BLOCK)), np.float32)
    _quantize_q8(x, x16, d)
    return x16, d


@pjit
def _bf16_rows(w16, rows, out):
    # out[i] = f32(w16[rows[i]])
    for i in prange(rows.size):
        unpack_row(w16, rows[i], out[i])


@pjit
def _int8_rows(q, scale, rows, out):
    # out[i] = q[rows[i]] * scale[rows[i]]
    K = q.shape[1]
    for i in prange(rows.size):
        r = rows[i]
        s = scale[r]
        for k in range(K):
            out[i, k] = np.float32(q[r, k]) * s


def packed_matmul(x, packed, scale, bias, out=None):
    """y (N, out) = x (N, in) @ W^T + bias for a packed W (out, in): uint16 bf16 bits (scale None)
    or int8 with per-output-channel float32 scales, x then quantized to 16 bits in blocks of 32 (each y[n] depends
    on x[n] alone, by the same operations whatever N). bias (out,) float32 or None. A float32 W (out, in)
    (scale None) runs the same loops on its float32 rows: for a few rows x (a batch of decoded
    tokens) against the tied LM head's (V, C) weight, where BLAS's GEMM of so few rows is slow."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    packed = np.ascontiguousarray(packed)       # the kernels read C-ordered rows (no copy if they are)
    N, K = x.shape
    O = packed.shape[0]
    if out is not None and (out.shape != (N, O) or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"packed_matmul: out must be a C-ordered float32 array of shape {(N, O)}")
    y = np.empty((N, O), np.float32) if out is None else out
    b = np.zeros(O, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    work = N * O * K
    if packed.dtype == np.int8:
        scale = np.ones(O, np.float32) if scale is None else np.ascontiguousarray(scale, dtype=np.float32)
        _matmul_q8(work, x, packed, scale, b, y, prefetch_ahead(packed))
    else:
        sbs = side_by_side()
        _MATMUL[uses_dots(N, sbs)](work, x, packed, b, y, sbs, prefetch_ahead(packed))
    return y


def dequantize_rows(packed, scale, rows, out=None):
    """float32 (len(rows), in): the packed rows `rows` (output channels, or wte token rows) unpacked."""
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    K = packed.shape[1]
    out = np.empty((rows.size, K), np.float32) if out is None else out
    if packed.dtype == np.uint16:
        _bf16_rows(rows.size * K, packed, rows, out)
    else:
        _int8_rows(rows.size * K, packed, scale, rows, out)
    return out
