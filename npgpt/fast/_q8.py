"""The dot products of decoding's int8 weights with 16-bit integer activations, written as LLVM IR so
that they run on the CPU's own integer dot-product instructions.

Activations are quantized in blocks of 32 along K, each block with its own float32 scale (the layout
of GGUF's Q8_0, with 16-bit values: the activations' rounding error is 1/258 of 8-bit ones', far
below the weights'); the int8 weights keep their per-output-channel scale. For one row of x and one
weight row o, the NumPy it mirrors (npgpt/inference/quant.py, `q8_product`):

    x16, d = quantize_activations(x)               # x16 (K,) int16 in [-32767, 32767], d (K/32,) float32
    isum[b] = x16[32b:32b+32] @ q[o, 32b:32b+32]   # integers, |isum| <= 32 * 32767 * 127
    y[o]    = scale[o] * sum_b d[b] * isum[b]

`q8_dot(x16, d, n, q, o)` returns sum_b d[n, b] * isum[b] for row n of x16 (the caller applies scale[o]).
A whole block's 32 products are summed into 8 int32 lanes, lane j holding the products 2j, 2j+1, 16+2j
and 17+2j, in one of three ways, all exact (at most 4 * 32767 * 127 < 2^24, so a lane is also exact as
a float32):

    avx512-vnni / avx-vnni   vpdpwssd(vpdpwssd(0, x16[0:16], q[0:16]), x16[16:32], q[16:32])
    avx2                     pmaddwd(x16[0:16], q[0:16]) + pmaddwd(x16[16:32], q[16:32])
    portable                 sext to int32, multiply, add the four products of each lane (LLVM vectors)

with q sign-extended to 16 bits. Each block's 8 lanes are converted to float32 and fused-multiply-
added into 8 float accumulators with d[b] (blocks alternate between two accumulator sets, so that two
FMA chains run at once); at the end the sets are added and the 8 lanes summed as
((0+4)+(2+6)) + ((1+5)+(3+7)). A partial last block (K not a multiple of 32) is summed exactly in int64 and
added last, as float32(float64(isum) * float64(d[b])). Every path does the same float operations on the
same integers, so on one CPU the three give the same bits.

Which path is compiled follows the target Numba compiles for (its CPU features, so NUMBA_CPU_NAME /
NUMBA_CPU_FEATURES steer it, and Numba's cache keeps a build per target): `instructions()` says;
`q8_dot_using(path)` builds one path by name (the tests compare every path the CPU can run).
The kernels that call these (npgpt/fast/quant.py) are compiled again after an edit here: npgpt's disk
cache is stale when any kernel source changes (npgpt/fast/_jit.py). On a
Zen 4 (2 threads) a decoded token's int8 products read 26-28 GB/s (the LM head 34-37), against 19 (22)
converting each weight to float32 (docs/performance.md, "int8 weights times 16-bit activations").
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK = 32           # activations quantized in blocks of this many along K (as GGUF's Q8_0)
PATHS = ("avx512-vnni", "avx-vnni", "avx2", "portable")


def _target_features() -> set:
    """The CPU features Numba compiles for ('+avx2' etc. of its target machine), or the host's where this
    Numba does not say (its attribute is private)."""
    try:
        from numba.core.registry import cpu_target
        features = cpu_target.target_context.codegen()._tm_features
    except AttributeError:
        from numba import config
        features = config.CPU_FEATURES            # NUMBA_CPU_FEATURES, when set
    if features is None:
        import llvmlite.binding as ll
        return {name for name, on in ll.get_host_cpu_features().items() if on}
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def runnable(features=None) -> list:
    """The PATHS this target (or a set of feature names) can run, fastest first."""
    f = _target_features() if features is None else set(features)
    return [p for p, needs in zip(PATHS, ({"avx512vnni", "avx512vl"}, {"avxvnni"}, {"avx2"}, set())) if needs <= f]


def instructions(features=None) -> str:
    """Which of PATHS `q8_dot` is compiled to for this target (or for a set of feature names)."""
    return runnable(features)[0]


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _lanes(builder, path, x16, w):
    """<8 x i32>: lane j = the products of elements 2j, 2j+1, 16+2j, 17+2j of x16 and w, from two
    <32 x i16> (w sign-extended from int8)."""
    i16x16, i32x8 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.IntType(32), 8)
    if path == "portable":
        i32x32 = ir.VectorType(ir.IntType(32), 32)
        p = builder.mul(builder.sext(x16, i32x32), builder.sext(w, i32x32))      # 32 exact products
        part = [builder.shuffle_vector(p, p, ir.Constant(i32x8, [base + 2 * j + k for j in range(8)]))
                for base in (0, 16) for k in (0, 1)]
        return builder.add(builder.add(part[0], part[1]), builder.add(part[2], part[3]))
    take = [ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(h, h + 16))) for h in (0, 16)]
    halves = [[builder.shuffle_vector(v, v, t) for v in (x16, w)] for t in take]   # elements 0-15, 16-31
    if path == "avx2":
        madd = _declare(builder, "llvm.x86.avx2.pmadd.wd", i32x8, [i16x16, i16x16])
        return builder.add(builder.call(madd, halves[0]), builder.call(madd, halves[1]))
    dp = _declare(builder, "llvm.x86.avx512.vpdpwssd.256", i32x8, [i32x8] * 3)
    t = ir.Constant(i32x8, None)
    for xh, wh in halves:
        t = builder.call(dp, [t, builder.bitcast(xh, i32x8), builder.bitcast(wh, i32x8)])
    return t


def _is_c_array(t, dtype, ndim):
    return isinstance(t, types.Array) and t.dtype == dtype and t.ndim == ndim and t.layout == "C"


def _emit(context, builder, path, x_rows, d_rows, p_w, K):
    """The IR of sum_b d_r[b] * (x_r[block b] . w[block b]) for every row r of x_rows (i16* each, with
    their d_r: float*), the weight row p_w (i8*) loaded and widened once a block for all of them, over
    the K elements (the whole blocks, then a partial last one: _tail). Each row's operations are the same
    whatever the other rows: -> a float32 value per row."""
    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    i8x32, i16x32, i32x8, f32x8 = ir.VectorType(i8, 32), ir.VectorType(i16, 32), ir.VectorType(i32, 8), ir.VectorType(f32, 8)
    intp = K.type
    nblocks = builder.ashr(K, intp(5))
    fma = _declare(builder, "llvm.fma.v8f32", f32x8, [f32x8] * 3)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(f32x8, None)) for _ in range(2)] for _ in x_rows]

    def block(b, which):
        # accs[r][which] += float(lanes of row r's block b) * d_r[b], for every row r
        off = builder.shl(b, intp(5))
        w_ = builder.sext(builder.load(builder.bitcast(builder.gep(p_w, [off]), i8x32.as_pointer()), align=1), i16x32)
        for p_x, p_d, acc in zip(x_rows, d_rows, accs):
            x_ = builder.load(builder.bitcast(builder.gep(p_x, [off]), i16x32.as_pointer()), align=2)
            lanes = builder.sitofp(_lanes(builder, path, x_, w_), f32x8)
            db = builder.load(builder.gep(p_d, [b]))
            splat = builder.shuffle_vector(builder.insert_element(ir.Constant(f32x8, None), db, i32(0)),
                                           ir.Constant(f32x8, None), ir.Constant(i32x8, [0] * 8))
            builder.store(builder.call(fma, [lanes, splat, builder.load(acc[which])]), acc[which])

    pairs = builder.ashr(nblocks, intp(1))
    with cgutils.for_range(builder, pairs) as loop:                              # blocks 2i, 2i+1
        b0 = builder.shl(loop.index, intp(1))
        block(b0, 0)
        block(builder.add(b0, intp(1)), 1)
    with builder.if_then(builder.icmp_signed("<", builder.shl(pairs, intp(1)), nblocks)):
        block(builder.sub(nblocks, intp(1)), 0)                                   # an odd last block
    out = []
    for acc in accs:
        v = builder.fadd(builder.load(acc[0]), builder.load(acc[1]))
        for n in (4, 2, 1):                                                       # 8 lanes -> 1
            idx = ir.VectorType(i32, n)
            v = builder.fadd(builder.shuffle_vector(v, v, ir.Constant(idx, list(range(n)))),
                             builder.shuffle_vector(v, v, ir.Constant(idx, list(range(n, 2 * n)))))
        out.append(builder.extract_element(v, i32(0)))
    return [builder.fadd(whole, part) for whole, part in zip(out, _tail(builder, x_rows, d_rows, p_w, K))]


def _tail(builder, x_rows, d_rows, p_w, K):
    """The IR of each row's partial last block (its K % 32 elements k0..K-1), as the NumPy
        t = sum_k int64(x16[k]) * int64(w[k])                  # exact
        float32(float64(t) * float64(d[k0 // 32]))
    and float32 0 where K has no partial block. In the IR rather than a Numba function called for each
    weight row: that call, returning 0 for GPT-2's 768-wide rows, made their products 1.75x slower
    from cache (1.4x with the call made only where a tail exists)."""
    i64, f32, f64 = ir.IntType(64), ir.FloatType(), ir.DoubleType()
    intp = K.type
    k0 = builder.and_(K, intp(-BLOCK))                                           # K - K % 32
    sums = [cgutils.alloca_once_value(builder, i64(0)) for _ in x_rows]
    with cgutils.for_range_slice(builder, k0, K, intp(1)) as (k, _):
        w = builder.sext(builder.load(builder.gep(p_w, [k])), i64)
        for p_x, t in zip(x_rows, sums):
            xk = builder.sext(builder.load(builder.gep(p_x, [k])), i64)
            builder.store(builder.add(builder.load(t), builder.mul(xk, w)), t)
    parts = [cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0)) for _ in x_rows]
    with builder.if_then(builder.icmp_signed("<", k0, K)):
        for p_d, t, part in zip(d_rows, sums, parts):
            db = builder.fpext(builder.load(builder.gep(p_d, [builder.ashr(k0, intp(5))])), f64)
            builder.store(builder.fptrunc(builder.fmul(builder.sitofp(builder.load(t), f64), db), f32), part)
    return [builder.load(part) for part in parts]


def _row_pointer(context, builder, arrty, arr, index, intp):
    return cgutils.get_item_pointer(context, builder, arrty, arr, index + [intp(0)] * (arrty.ndim - len(index)))


def _typer(path, x16, d, n, q, o):
    if not (_is_c_array(x16, types.int16, 2) and _is_c_array(d, types.float32, 2) and _is_c_array(q, types.int8, 2)
            and isinstance(n, types.Integer) and isinstance(o, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a_x, a_d, a_q = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 3))
        first = context.cast(builder, args[2], sig.args[2], types.intp)
        row = context.cast(builder, args[4], sig.args[4], types.intp)
        K = builder.extract_value(a_x.shape, 1)
        intp = K.type
        p_w = builder.bitcast(_row_pointer(context, builder, sig.args[3], a_q, [row], intp), ir.IntType(8).as_pointer())
        p_x = builder.bitcast(_row_pointer(context, builder, sig.args[0], a_x, [first], intp), ir.IntType(16).as_pointer())
        p_d = _row_pointer(context, builder, sig.args[1], a_d, [first], intp)
        return _emit(context, builder, path, [p_x], [p_d], p_w, K)[0]
    return types.float32(x16, d, n, q, o), codegen


def _typer4(path, x16, d, n, q, o):
    if not (_is_c_array(x16, types.int16, 2) and _is_c_array(d, types.float32, 2) and _is_c_array(q, types.int8, 2)
            and isinstance(n, types.Integer) and isinstance(o, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a_x, a_d, a_q = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 3))
        first = context.cast(builder, args[2], sig.args[2], types.intp)
        row = context.cast(builder, args[4], sig.args[4], types.intp)
        K = builder.extract_value(a_x.shape, 1)
        intp = K.type
        p_w = builder.bitcast(_row_pointer(context, builder, sig.args[3], a_q, [row], intp), ir.IntType(8).as_pointer())
        rows = [builder.add(first, intp(r)) for r in range(4)]
        x_rows = [builder.bitcast(_row_pointer(context, builder, sig.args[0], a_x, [r], intp), ir.IntType(16).as_pointer())
                  for r in rows]
        d_rows = [_row_pointer(context, builder, sig.args[1], a_d, [r], intp) for r in rows]
        out = _emit(context, builder, path, x_rows, d_rows, p_w, K)
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(types.float32, 4)(x16, d, n, q, o), codegen


@intrinsic
def q8_dot(typingctx, x16, d, n, q, o):
    """float32 sum_b d[n, b] * (x16[n, block b] . q[o, block b]) over the blocks of K (the last may be
    partial); x16 (N, K) int16, d (N, K/32 rounded up) float32, q (O, K) int8, all C-contiguous. Rows are
    addressed by index, not passed as views: a view made per weight row costs two atomic reference-count
    updates on the array it shows, and with two threads that cache line moved between the cores on every
    row (a product of 768-wide rows read half the bytes per second it reads without)."""
    return _typer(instructions(), x16, d, n, q, o)


@intrinsic
def q8_dot4(typingctx, x16, d, n, q, o):
    """(q8_dot(x16, d, n + r, q, o) for r = 0..3): rows n..n+3 of x16 (N, K) int16 and d (N, K/32
    rounded up) against weight row o, each weight block read and widened once for the four; every row's
    value the same bits as q8_dot's for it alone."""
    return _typer4(instructions(), x16, d, n, q, o)


def q8_dot_using(path: str):
    """q8_dot compiled to one of PATHS whatever the target prefers (for tests; the path must be runnable)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")

    @intrinsic
    def q8_dot_path(typingctx, x16, d, n, q, o):
        return _typer(path, x16, d, n, q, o)
    return q8_dot_path


def q8_dot4_using(path: str):
    """q8_dot4 compiled to one of PATHS (for tests)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")

    @intrinsic
    def q8_dot4_path(typingctx, x16, d, n, q, o):
        return _typer4(path, x16, d, n, q, o)
    return q8_dot4_path
