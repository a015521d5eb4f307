"""float32 products of a few rows against Linear's (in, out) weights, for decoding batches of 2 to 8 rows.

The NumPy line they mirror (npgpt/layers/linear.py, Linear.forward_without_bias, which routes them here):

    y = x @ w                                      # x (N, in), w (in, out) -> y (N, out)

BLAS runs a product of a few rows as a GEMM: it copies (packs) a panel of w before multiplying it, so
the weight crosses memory about twice; with 2-8 rows of GPT-2 124M's block weights OpenBLAS read
10-14 GB/s on the Zen 4 where one row (a GEMV, no packing) reads 28-30. Here every 64 columns of w
are one tile: for k = 0..K-1 the tile's row w[k, j0:j0+64] is loaded once (four 16-float vectors)
and multiplied into up to four rows of x held in 16 vector accumulators in registers. The weight is
read once for every four rows, straight from w, with no copy: K_CHUNK rows of a tile at a time (64 KB,
which stays in cache while the next four rows use it; the partial sums wait in y, float32 as in the
registers, so the chain of roundings is the same), each
tile row prefetched AHEAD rows before it is needed (a tile's 256 bytes a row, rows 3-12 KB apart, are
a pattern the hardware prefetchers follow late).

    y[n, j] = fma(x[n, K-1], w[K-1, j], ... fma(x[n, 1], w[1, j], fma(x[n, 0], w[0, j], 0)))

Each y[n, j] is summed over k in order, one FMA a term, whatever N, the tile it falls in or the
threads: a row's values are the same bits in any batch (as serve's batch-invariant step needs).
Columns past the last whole tile (out not a multiple of 64) are the same FMA chain, one column at a time.
The tiles are LLVM IR through Numba intrinsics (npgpt/fast/_q8.py does the same for int8): Numba cannot
keep a 4 x 64 block of accumulators in registers or tell LLVM that y does not overlap w, and its own
loops here ran one element at a time (1-9 GB/s).
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import JIT_OPTIONS, njit

LANES = 16                  # floats in one LLVM vector (a zmm register; two ymm where AVX-512 is absent)
VECTORS = 4                 # vectors across a tile: 64 columns
COLS = LANES * VECTORS
AHEAD = 8                   # the tile's row of w this many rows ahead is prefetched (Zen 4, B=8: 1.2x the rate without)
K_CHUNK = 256              # rows of w a tile takes at a time: 64 KB of it, kept in cache while every four rows of x use it


def _is_c_f32(t, ndim):
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == ndim and t.layout == "C"


def _tile(R, resume):
    """An intrinsic tile(x, w, y, n, j0, k0, k1): for the rows n..n+R-1 and the columns j0..j0+COLS-1,
    y = x[:, k0:k1] @ w[k0:k1] added in order to the partial sums already in y if `resume`, else from 0
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
            vec = ir.VectorType(ir.FloatType(), LANES)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                 f"llvm.fma.v{LANES}f32")
            y_vec = [[builder.bitcast(builder.gep(a_y.data, [builder.add(builder.mul(builder.add(n_, intp(r)), O),
                                                                        builder.add(j_, intp(LANES * u)))]),
                                      vec.as_pointer()) for u in range(VECTORS)] for r in range(R)]
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")
            acc = [[cgutils.alloca_once_value(builder, builder.load(p, align=4) if resume else ir.Constant(vec, None))
                    for p in row] for row in y_vec]                             # (R, VECTORS)
            x_rows = [builder.gep(a_x.data, [builder.mul(builder.add(n_, intp(r)), K)]) for r in range(R)]
            with cgutils.for_range(builder, builder.sub(k1_, k0_)) as loop:    # k = k0 .. k1-1, in order
                k = builder.add(k0_, loop.index)
                w_k = builder.gep(a_w.data, [builder.add(builder.mul(k, O), j_)])          # &w[k, j0]
                if AHEAD:                                                       # the tile's row AHEAD rows on
                    w_ahead = builder.bitcast(builder.gep(w_k, [builder.mul(intp(AHEAD), O)]), ir.IntType(8).as_pointer())
                    for line in range(0, 4 * COLS, 64):
                        builder.call(prefetch, [builder.gep(w_ahead, [intp(line)]), i32(0), i32(3), i32(1)])
                w_v = [builder.load(builder.bitcast(builder.gep(w_k, [intp(LANES * u)]), vec.as_pointer()),
                                    align=4) for u in range(VECTORS)]
                for r in range(R):
                    x_nk = builder.load(builder.gep(x_rows[r], [k]))                        # x[n + r, k]
                    splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, None), x_nk, i32(0)),
                                                   ir.Constant(vec, None), ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
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
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fn, args)
    return types.float32(a, b, c), codegen


_start4, _start2, _start1 = _tile(4, False), _tile(2, False), _tile(1, False)
_resume4, _resume2, _resume1 = _tile(4, True), _tile(2, True), _tile(1, True)


@njit(inline="always", **JIT_OPTIONS)
def _rows(x, w, y, j0, k0, k1):
    # every row n: y[n, j0:j0+COLS] (+)= x[n, k0:k1] @ w[k0:k1, j0:j0+COLS], four rows at a time
    N = x.shape[0]
    n = 0
    while n + 4 <= N:
        if k0 == 0:
            _start4(x, w, y, n, j0, k0, k1)
        else:
            _resume4(x, w, y, n, j0, k0, k1)
        n += 4
    if n + 2 <= N:
        if k0 == 0:
            _start2(x, w, y, n, j0, k0, k1)
        else:
            _resume2(x, w, y, n, j0, k0, k1)
        n += 2
    if n < N:
        if k0 == 0:
            _start1(x, w, y, n, j0, k0, k1)
        else:
            _resume1(x, w, y, n, j0, k0, k1)


@njit(parallel=True, **JIT_OPTIONS)
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


def few_rows_matmul(x, w, out=None):
    """x @ w for float32 x (N, in) and w (in, out), both C-contiguous -> (N, out) float32."""
    if out is None:
        out = np.empty((x.shape[0], w.shape[1]), np.float32)
    if x.shape[1] == 0:
        out[...] = 0                                            # an empty sum
    else:
        _few_rows_matmul(x, w, out)
    return out
