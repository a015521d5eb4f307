"""float32 products of a few rows (decoded tokens), both weight layouts, without BLAS.

The NumPy lines they mirror (npgpt/layers/linear.py, Linear.forward_without_bias, and
npgpt/layers/embedding.py, TiedLMHead.forward, whose decoded rows reach them, the head's through
npgpt/fast/quant.py's packed-row products):

    y = x @ w                                      # few_rows_matmul:   x (N, in), w (in, out) -> (N, out)
    y = x @ w.T                                    # few_rows_matmul_t: x (N, in), w (out, in) -> (N, out)

few_rows_matmul, for Linear's 2-8 rows (2-4 without AVX-512: rows_limit):

BLAS runs a product of a few rows as a GEMM: it copies (packs) a panel of w before multiplying it, so
the weight crosses memory about twice; with 2-8 rows of GPT-2 124M's block weights OpenBLAS read
10-14 GB/s on the Zen 4 where one row (a GEMV, no packing) reads 24-30. Here every 64 columns of w
are one tile: for k = 0..K-1 the tile's row w[k, j0:j0+64] is loaded once (four 16-float vectors)
and multiplied into up to four rows of x held in 16 vector accumulators (in registers with AVX-512;
AVX2's 16 ymm registers cannot hold them all: see VECTORS). The weight is read once for every four
rows, straight from w, with no copy: K_CHUNK rows of a tile at a time (64 KB, which stays in cache
while the next four rows use it; the partial sums wait in y, float32 as in the registers, so the chain
of roundings is the same), each tile row prefetched AHEAD rows before it is needed (a tile's 256 bytes
a row, rows 3-12 KB apart, are a pattern the hardware prefetchers follow late).

    y[n, j] = fma(x[n, K-1], w[K-1, j], ... fma(x[n, 1], w[1, j], fma(x[n, 0], w[0, j], 0)))

Each y[n, j] is summed over k in order, one FMA a term, whatever N, the tile it falls in or the
threads: the kernel gives a row the same bits in any batch (serve's batch-invariant step uses it at every
width; decoding routes only 2-8 rows here, so decoding as a whole is not batch-invariant).
Columns past the last whole tile (out not a multiple of 64) are the same FMA chain, one column at a time.
The tiles are LLVM IR through Numba intrinsics (npgpt/fast/_q8.py does the same for int8): Numba cannot
keep a 4 x 64 block of accumulators in registers or tell LLVM that y does not overlap w, and its own
loops here ran one element at a time (1-9 GB/s).

few_rows_matmul_t, for rows of w (out, in), float32 or bf16 bits (widened exactly in registers): serve's
batch-invariant step at every width, and through dots_chunk the packed-row products of 1-8 rows of x (1-4
without AVX-512: dots_limit) in npgpt/fast/quant.py: the tied LM head's, decode_layout's float32 Linears'
and the packed bf16 ones. w's rows are read one after another (one stream from memory),
each loaded 16 floats at a time into a register and multiplied into up to four rows of x, one vector
accumulator each (with AVX-512 and 5-8 rows of x, four rows of w at a time: 16 accumulators); then each
accumulator's 16 lanes are added in a fixed tree and the last in % 16 terms follow by FMA. The order
depends on `in` alone, never on N or on how many rows of w are taken together. GPT-2's 154 MB wte read
1.3-2.5x faster than by BLAS's GEMV (one row) and 1.3-1.6x faster than by fast.quant's four-row kernel at
2-4 rows (Zen 4, fifth session), and at 5 and 8 rows 1.14x (0.85-1.22) and 1.19x (1.14-1.36) with four
rows of w at a time (sixth session; docs/performance.md).
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import JIT_OPTIONS, njit, pjit
from ._math import prefetch_row_to_l2
from ._q8 import _declare, _is_c_array, _target_features

LANES = 16                  # floats in one LLVM vector: a zmm register, or two ymm where AVX-512 is absent
# Vectors across a tile: 4 x 4 accumulators fill half of AVX-512's 32 registers. Without AVX-512 they spill
# (32 ymm of AVX2's 16), yet 4 x 4 read as fast as 4 x 1 at 2-4 rows there (docs/performance.md). A tile's
# width never changes a value: each output is the same chain whatever the tile it falls in.
VECTORS = 4
COLS = LANES * VECTORS      # columns of a tile
TILE_BYTES = 4 * COLS       # bytes of a tile's row of w
AHEAD = 8                   # the tile's row of w this many rows ahead is prefetched (Zen 4, B=8: 1.2x the rate without)
K_CHUNK = 256              # rows of w a tile takes at a time: 64 KB of it, kept in cache while every four rows of x use it


# The widest batch Linear gives few_rows_matmul on the target Numba compiles for (its features, as _q8's
# path): 8 rows with AVX-512; 4 without, where at 8 rows BLAS's GEMM read 15.4-16.6 GB/s against the
# tiles' 10.8-11.4 (a Zen 4 held to AVX2). Read once: asking Numba costs 16 us, and Linear asks every call.
_ROWS_LIMIT = 8 if "avx512f" in _target_features() else 4


def rows_limit() -> int:
    """The widest batch Linear gives few_rows_matmul on this target (see _ROWS_LIMIT)."""
    return _ROWS_LIMIT


def dots_limit() -> int:
    """The widest batch few_rows_matmul_t beats fast.quant's row kernel at on this target: 8 rows with
    AVX-512 (four rows of w at a time: WIDE), else 4 (at 5-8 rows one row of w at a time ran 0.84-0.95x it)."""
    return 8 if WIDE else 4


def _is_c_f32(t, ndim):
    return _is_c_array(t, types.float32, ndim)


def _splat(builder, value, vec):
    """<LANES x float> with every lane `value`."""
    i32 = ir.IntType(32)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(vec, None), value, i32(0)),
                                  ir.Constant(vec, None), ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))


def _tile(R):
    """An intrinsic tile(x, w, y, n, j0, k0, k1): for the rows n..n+R-1 and the columns j0..j0+COLS-1,
    y = x[:, k0:k1] @ w[k0:k1], added in order to the partial sums already in y where k0 > 0, else from 0
    (all float32, C-contiguous; the caller keeps n + R <= N and j0 + COLS <= out)."""
    @intrinsic
    def tile(typingctx, x, w, y, n, j0, k0, k1):
        if not (_is_c_f32(x, 2) and _is_c_f32(w, 2) and _is_c_f32(y, 2)
                and all(isinstance(i, types.Integer) for i in (n, j0, k0, k1))):
            return None

        def codegen(context, builder, sig, args):
            a_x, a_w, a_y = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(3))
            n_, j_, k0_, k1_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in range(3, 7))
            K, O = builder.extract_value(a_x.shape, 1), builder.extract_value(a_w.shape, 1)
            intp, i32 = K.type, ir.IntType(32)
            vec, i8p = ir.VectorType(ir.FloatType(), LANES), ir.IntType(8).as_pointer()
            fma = _declare(builder, f"llvm.fma.v{LANES}f32", vec, [vec] * 3)
            prefetch = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), [i8p, i32, i32, i32])   # as _math's

            def y_vector(r, u):                                                 # &y[n + r, j0 + LANES u]
                y_row = builder.gep(a_y.data, [builder.add(builder.mul(builder.add(n_, intp(r)), O), j_)])
                return builder.bitcast(builder.gep(y_row, [intp(LANES * u)]), vec.as_pointer())
            y_vec = [[y_vector(r, u) for u in range(VECTORS)] for r in range(R)]
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in row] for row in y_vec]
            with builder.if_then(builder.icmp_signed(">", k0_, intp(0))):      # resume: acc = y's partial sums
                for row_acc, row_y in zip(acc, y_vec):
                    for a, p in zip(row_acc, row_y):
                        builder.store(builder.load(p, align=4), a)
            x_rows = [builder.gep(a_x.data, [builder.mul(builder.add(n_, intp(r)), K)]) for r in range(R)]
            with cgutils.for_range(builder, builder.sub(k1_, k0_)) as loop:    # k = k0 .. k1-1, in order
                k = builder.add(k0_, loop.index)
                w_k = builder.gep(a_w.data, [builder.add(builder.mul(k, O), j_)])          # &w[k, j0]
                if AHEAD:                                                       # the tile's row AHEAD rows on (its
                    w_ahead = builder.bitcast(builder.gep(w_k, [builder.mul(intp(AHEAD), O)]), i8p)   # lines, + 1
                    for line in range(0, TILE_BYTES + 64, 64):                  # where it starts mid-line)
                        builder.call(prefetch, [builder.gep(w_ahead, [intp(line)]), i32(0), i32(3), i32(1)])
                w_v = [builder.load(builder.bitcast(builder.gep(w_k, [intp(LANES * u)]), vec.as_pointer()),
                                    align=4) for u in range(VECTORS)]
                for r in range(R):
                    splat = _splat(builder, builder.load(builder.gep(x_rows[r], [k])), vec)   # x[n + r, k]
                    for u in range(VECTORS):                                    # acc += x[n + r, k] * w[k, cols]
                        builder.store(builder.call(fma, [splat, w_v[u], builder.load(acc[r][u])]), acc[r][u])
            for r in range(R):
                for u in range(VECTORS):
                    builder.store(builder.load(acc[r][u]), y_vec[r][u], align=4)
            return context.get_dummy_value()
        return types.void(x, w, y, n, j0, k0, k1), codegen
    return tile


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c for float32 scalars, rounded once (llvm.fma: the CPU's FMA, or a correctly rounded call)."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        return builder.call(_declare(builder, "llvm.fma.f32", f32, [f32] * 3), args)
    return types.float32(a, b, c), codegen


_tile4, _tile2, _tile1 = _tile(4), _tile(2), _tile(1)


@njit(inline="always", **JIT_OPTIONS)
def _rows(x, w, y, j0, k0, k1):
    # every row n: y[n, j0:j0+COLS] (+)= x[n, k0:k1] @ w[k0:k1, j0:j0+COLS], four rows at a time
    N = x.shape[0]
    n = 0
    while n + 4 <= N:
        _tile4(x, w, y, n, j0, k0, k1)
        n += 4
    if n + 2 <= N:
        _tile2(x, w, y, n, j0, k0, k1)
        n += 2
    if n < N:
        _tile1(x, w, y, n, j0, k0, k1)


@pjit
def _few_rows_matmul(x, w, y):
    N, K = x.shape
    O = w.shape[1]
    whole = O // COLS
    for b in prange(whole + (O % COLS > 0)):                   # one tile of columns at a time
        j0 = b * COLS
        if b < whole:
            for k0 in range(0, K, K_CHUNK):                     # w[k0:k0+K_CHUNK, tile] stays in cache for all rows
                _rows(x, w, y, j0, k0, min(K, k0 + K_CHUNK))
        else:                                                   # the last columns, fewer than a tile
            for n in range(N):
                for j in range(j0, O):
                    s = np.float32(0.0)
                    for k in range(K):
                        s = _fma(x[n, k], w[k, j], s)
                    y[n, j] = s


def _dots(R, WR=1):
    """An intrinsic dots(x, w, y, n, o): y[n + r, o + q] = x[n + r] . w[o + q] for r < R, q < WR, w (out, in):
    each dot in 16 lanes (lane l sums the terms k = l, l + 16, ... with one FMA each, in order), the lanes
    added in a fixed tree (the halves, 16 -> 8 -> 4 -> 2 -> 1), then the last in % 16 terms by FMA in order:
    the same operations for a dot whatever R and WR. Each loaded vector of a weight row serves the R rows
    of x, each of x the WR weight rows (R x WR accumulators)."""
    @intrinsic
    def dots(typingctx, x, w, y, n, o):
        bf16 = _is_c_array(w, types.uint16, 2)
        if not (_is_c_f32(x, 2) and (_is_c_f32(w, 2) or bf16) and _is_c_f32(y, 2)
                and isinstance(n, types.Integer) and isinstance(o, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            a_x, a_w, a_y = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(3))
            n_, o_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (3, 4))

            def widen(v, t):                                                    # bf16 bits -> float32
                if not bf16:
                    return v
                i32t = ir.VectorType(ir.IntType(32), LANES) if t is vec else ir.IntType(32)
                sh = ir.Constant(i32t, [16] * LANES) if t is vec else ir.Constant(i32t, 16)
                return builder.bitcast(builder.shl(builder.zext(v, i32t), sh), t)
            K, V = builder.extract_value(a_x.shape, 1), builder.extract_value(a_w.shape, 0)
            intp, i32, f32 = K.type, ir.IntType(32), ir.FloatType()
            vec = ir.VectorType(f32, LANES)
            wvec = ir.VectorType(ir.IntType(16), LANES) if bf16 else vec
            fma_v = _declare(builder, f"llvm.fma.v{LANES}f32", vec, [vec] * 3)
            fma_s = _declare(builder, "llvm.fma.f32", f32, [f32] * 3)
            w_rows = [builder.gep(a_w.data, [builder.mul(builder.add(o_, intp(q)), K)]) for q in range(WR)]  # &w[o + q, 0]
            x_rows = [builder.gep(a_x.data, [builder.mul(builder.add(n_, intp(r)), K)]) for r in range(R)]
            pairs = [(r, q) for r in range(R) for q in range(WR)]
            acc = {p: cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for p in pairs}
            whole = builder.ashr(K, intp(4))                                    # K // LANES vectors
            with cgutils.for_range(builder, whole) as loop:
                off = builder.shl(loop.index, intp(4))

                def load(row, t=vec):
                    return builder.load(builder.bitcast(builder.gep(row, [off]), t.as_pointer()), align=2 if bf16 and t is wvec else 4)
                w_v = [widen(load(w_rows[q], wvec), vec) for q in range(WR)]
                for r in range(R):                                              # acc[r, q] += x[n + r, block] * w[o + q, block]
                    x_v = load(x_rows[r])
                    for q in range(WR):
                        a = acc[r, q]
                        builder.store(builder.call(fma_v, [x_v, w_v[q], builder.load(a)]), a)
            sums = {}
            for p in pairs:
                v = builder.load(acc[p])
                for half in (8, 4, 2, 1):                                       # lane l += lane l + half
                    idx = ir.VectorType(i32, half)
                    lo = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(half))))
                    v = builder.fadd(lo, builder.shuffle_vector(v, v, ir.Constant(idx, list(range(half, 2 * half)))))
                sums[p] = cgutils.alloca_once_value(builder, builder.extract_element(v, i32(0)))
            start = builder.shl(whole, intp(4))
            with cgutils.for_range(builder, builder.sub(K, start)) as loop:    # the last K % LANES terms
                k = builder.add(start, loop.index)
                w_k = [widen(builder.load(builder.gep(w_rows[q], [k])), f32) for q in range(WR)]
                for r in range(R):
                    x_k = builder.load(builder.gep(x_rows[r], [k]))
                    for q in range(WR):
                        builder.store(builder.call(fma_s, [x_k, w_k[q], builder.load(sums[r, q])]), sums[r, q])
            for r, q in pairs:                                                  # y[n + r, o + q]
                y_no = builder.gep(a_y.data, [builder.add(builder.mul(builder.add(n_, intp(r)), V), builder.add(o_, intp(q)))])
                builder.store(builder.load(sums[r, q]), y_no)
            return context.get_dummy_value()
        return types.void(x, w, y, n, o), codegen
    return dots


_dots4, _dots2, _dots1 = _dots(4), _dots(2), _dots(1)
_dots4x4, _dots2x4, _dots1x4 = _dots(4, 4), _dots(2, 4), _dots(1, 4)
OUT_CHUNK = 64              # rows of w (out, in) a task of few_rows_matmul_t takes, one after another
# Five rows of x or more take four rows of w at a time (16 accumulators, each vector loaded once for four
# multiply-adds): GPT-2 124M's block weights at 8 rows, 18.8-19.0 GB/s against 13.1 one row of w at a time
# (Zen 4). Not at 1-4 rows (one row: 23.4 GB/s, where fast.quant's row kernel read 27.1 in the same run) nor
# without AVX-512 (16 + 5 vectors spill AVX2's registers). The sums are the same either way: each dot is
# its own chain. (The two loops below differ only in their intrinsics, which Numba cannot pass as values.)
WIDE = _ROWS_LIMIT == 8
# In that WIDE loop, where a row of w is at most PREFETCH_ROW_BYTES, each group of four rows o..o+3 first asks
# for rows o+AHEAD..o+AHEAD+3 into L2 (prefetch_row_to_l2; not into L1, which holds the rows of x; the last
# group of a chunk asks for the next chunk's first rows): bound by arithmetic at 5-8 rows, the loop left the
# hardware prefetcher behind. Measured on the Zen 4 alone, from memory, medians of 6 alternated pairs, at 6
# and 8 rows of x: bf16 3072 x 768 (1.5 KB rows) 1.28x, 1.26x the GB/s in one run, 1.30x, 1.31x in another
# (4, 8 or 16 rows ahead alike; into L1 as well, slower than none); float32 3072 x 768 (3 KB rows) 1.05x,
# 1.02x, within the noise; longer rows lost (bf16 768 x 3072 0.97x, float32 0.87x, 0.91x). Hence the limit
# between the 1.5 KB rows that gain and the 3 KB ones that do not clearly.
AHEAD = 4
PREFETCH_ROW_BYTES = 2048


@njit(**JIT_OPTIONS)
def _dots_rows(x, w, y, o, hi):
    # y[:, o:hi] = x @ w[o:hi].T: w's rows in order (one stream), four at a time where WIDE and N > 4
    N, K = x.shape
    O = w.shape[0]
    ahead = AHEAD if K * w.itemsize <= PREFETCH_ROW_BYTES else O       # O rows ahead: none asked for
    while WIDE and N > 4 and o + 4 <= hi:              # four rows of w at a time against every row of x
        for r in range(o + ahead, min(o + ahead + 4, O)):
            prefetch_row_to_l2(w, r)                   # a hint (no effect on any value): the rows to come
        n = 0
        while n + 4 <= N:
            _dots4x4(x, w, y, n, o)
            n += 4
        if n + 2 <= N:
            _dots2x4(x, w, y, n, o)
            n += 2
        if n < N:
            _dots1x4(x, w, y, n, o)
        o += 4
    for o in range(o, hi):
        n = 0
        while n + 4 <= N:                               # the row of w read again from L1 for the next four
            _dots4(x, w, y, n, o)
            n += 4
        if n + 2 <= N:
            _dots2(x, w, y, n, o)
            n += 2
        if n < N:
            _dots1(x, w, y, n, o)


@njit(**JIT_OPTIONS)
def dots_chunk(x, w, b, y, o, hi):
    """y[:, o:hi] = x @ w[o:hi].T + b[o:hi], each output one dot as few_rows_matmul_t's, then its bias: a
    chunk of output channels for a kernel with its own parallel loop (npgpt/fast/quant.py)."""
    _dots_rows(x, w, y, o, hi)
    for n in range(x.shape[0]):
        for j in range(o, hi):
            y[n, j] += b[j]


@pjit
def _few_rows_matmul_t(x, w, y):
    V = w.shape[0]
    for c in prange((V + OUT_CHUNK - 1) // OUT_CHUNK):
        _dots_rows(x, w, y, c * OUT_CHUNK, min(V, (c + 1) * OUT_CHUNK))


def _checked(x, w, K_w, O, out, name, w_dtypes=(np.float32,)):
    """The kernels index raw memory: x (N, K) must be C-ordered float32, w C-ordered of one of w_dtypes
    with w's K_w = K, and out (N, O), C-ordered float32 and overlapping neither. -> out (new if None)."""
    for a, what, dtypes in ((x, "x", (np.float32,)), (w, "w", w_dtypes)):
        if a.dtype not in dtypes or a.ndim != 2 or not a.flags.c_contiguous:
            kinds = " or ".join("bf16 bits (uint16)" if d == np.uint16 else np.dtype(d).name for d in dtypes)
            raise ValueError(f"{name}: {what} must be a C-ordered 2-D {kinds} array, got {a.dtype} {a.shape}")
    if x.shape[1] != K_w:
        raise ValueError(f"{name}: x {x.shape} and w {w.shape} do not match")
    if out is None:
        return np.empty((x.shape[0], O), np.float32)
    if (out.shape != (x.shape[0], O) or out.dtype != np.float32 or not out.flags.c_contiguous
            or np.may_share_memory(out, x) or np.may_share_memory(out, w)):   # bounds: exact for C order
        raise ValueError(f"{name}: out must be a new C-ordered float32 array of shape {(x.shape[0], O)}")
    return out


def few_rows_matmul_t(x, w, out=None):
    """x @ w.T for float32 x (N, in) and w (out, in), float32 (the tied LM head's wte) or bf16 bits (uint16,
    widened exactly in registers: the sums of its float32 values), both C-contiguous -> (N, out) float32."""
    out = _checked(x, w, w.shape[1], w.shape[0], out, "few_rows_matmul_t", (np.float32, np.uint16))
    _few_rows_matmul_t(w.size, x, w, out)                      # the parallel build from 2^18 weights on
    return out


def few_rows_matmul(x, w, out=None):
    """x @ w for float32 x (N, in) and w (in, out), both C-contiguous -> (N, out) float32."""
    out = _checked(x, w, w.shape[0], w.shape[1], out, "few_rows_matmul")
    if x.shape[1] == 0:
        out[...] = 0                                            # an empty sum
    else:
        _few_rows_matmul(w.size, x, w, out)                    # the parallel build from 2^18 weights on
    return out
