"""Helpers the kernels call inside their loops: a bit cast, an exp that LLVM can vectorise, a row
maximum over eight independent chains (max_of), an in-place exp with its sum (exp_sum_), and a
software prefetch of a matrix row (prefetch_row, or prefetch_row_to_l2 into the outer caches only).

Numba hands `np.exp` on a float32 to libm one element at a time (it has no SVML here), so a
loop of exps runs at scalar speed. `exp(x)` below is the textbook way to compute it with only
multiply, add, floor and integer shifts, all of which vectorise to SIMD:

    exp(x) = 2^n * exp(r),   n = round(x / ln 2),   r = x - n ln 2   (|r| <= ln 2 / 2)
    exp(r) ~ 1 + r + r^2/2! + ... + r^7/7!            (Taylor; the r^8/8! left out is < 6e-9)
    2^n    = the float whose exponent bits are n + 127  (split as 2^n1 * 2^n2 so that every
             n from -149 to 128 works: results that underflow to denormals or overflow to inf
             come out as IEEE says)

n ln 2 is subtracted in two parts (LN2_HI has few significant bits, so n * LN2_HI is exact).
Multiply-adds may be fused ('contract'): Horner's rule then runs as 7 FMAs, each rounded once,
~1.5x faster (0.79 -> 0.54 ns an element on a Zen 3 core). Error against the correctly rounded
result over the whole float32 range: at most 0.9 ulp with FMA, 1.2 ulp without (tested in
tests/test_kernels.py against 1.2). exp(-inf) = 0, exp(inf) = inf, exp(nan) = nan. float64 inputs go
to Numba's np.exp (libm's exp, within 1 ulp of the correctly rounded value; tested) unchanged, so
float64 gradient checks see the function to float64 precision.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._jit import JIT_OPTIONS, REDUCTION_MATH, jit


@intrinsic
def bits_to_float32(typingctx, i):
    """The float32 whose bit pattern is the low 32 bits of integer i (a free register cast)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if i.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif i.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32)) if not i.signed else builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(i), codegen


LOG2E = np.float32(1.0 / math.log(2.0))
LN2_HI = np.float32(0.693359375)                       # 355 / 512: 9 significant bits
LN2_LO = np.float32(math.log(2.0) - 0.693359375)
C2, C3, C4, C5, C6, C7 = (np.float32(1.0 / math.factorial(k)) for k in range(2, 8))
F1 = np.float32(1.0)


def _prefetch_row_typer(a, i, locality):
    """prefetch_row's typing and IR: one llvm.prefetch (a read, of data) per 64-byte line of row i of a,
    with LLVM's locality 3 (into every cache level, L1 included) or 1 (the outer levels: L2 on x86)."""
    if not (isinstance(a, types.Array) and a.ndim == 2 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        from numba.core import cgutils
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        row = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [row, context.get_constant(types.intp, 0)])
        base = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [base.type, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        row_bytes = builder.mul(builder.extract_value(ary.shape, 1),     # K elements x their size, from a[i, 0]
                                context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))))
        step = ir.Constant(row_bytes.type, 64)
        with cgutils.for_range_slice(builder, ir.Constant(row_bytes.type, 0), row_bytes, step) as (offset, _):
            builder.call(fn, [builder.gep(base, [offset]), i32(0), i32(locality), i32(1)])   # read, data
        return context.get_dummy_value()
    return types.void(a, i), codegen


@intrinsic
def prefetch_row(typingctx, a, i):
    """Ask the CPU to start loading row i of the 2-D array a (C order: its K elements from a[i, 0]) into its caches (one
    llvm.prefetch per 64-byte line; a hint: no effect on any value, and nothing where the CPU has no
    prefetch instruction). Decoding's packed products stream their weights from memory one row at a
    time; the hardware prefetcher alone kept 11 GB/s of int8 weights coming on 2 cores, and asking for
    the row 2-4 rows ahead 19-20 GB/s (examples/profile_decode.py, docs/performance.md)."""
    return _prefetch_row_typer(a, i, 3)


@intrinsic
def prefetch_row_to_l2(typingctx, a, i):
    """prefetch_row into the outer caches only (x86's prefetcht2), leaving L1 to what the loop reads now:
    for a kernel whose other operands live in L1 (few_rows' four weight rows against 5-8 rows of x)."""
    return _prefetch_row_typer(a, i, 1)


def exp(x):
    """exp(x); inside a Numba kernel, a vectorisable version for float32 (see the module docstring)."""
    return np.exp(x)


@overload(exp, jit_options={"fastmath": {"contract"}})   # fused multiply-adds; no reassociation (it would undo the two-part n ln 2)
def _exp(x):
    if x != types.float32:
        return lambda x: np.exp(x)

    def exp_float32(x):
        xc = min(max(x, np.float32(-104.0)), np.float32(88.8))    # exp(-104) rounds to 0, exp(88.8) to inf
        n = np.floor(xc * LOG2E + np.float32(0.5))                # round(x / ln 2)
        r = (xc - n * LN2_HI) - n * LN2_LO                        # x - n ln 2, |r| <= ln 2 / 2
        p = F1 + r * (F1 + r * (C2 + r * (C3 + r * (C4 + r * (C5 + r * (C6 + r * C7))))))   # exp(r)
        ni = np.int32(n)
        n1 = ni >> 1                                              # 2^n = 2^n1 * 2^n2, each a normal float
        n2 = ni - n1
        y = p * bits_to_float32((n1 + 127) << 23) * bits_to_float32((n2 + 127) << 23)
        return y if x == x else x                                 # nan stays nan
    return exp_float32


@jit
def max_of(a, lo, hi):
    """max(a[lo:hi]) of a 1-D array (hi > lo), for use inside kernels.

    LLVM does not vectorise a float max reduction (NaN rules keep it from reordering the
    comparisons), so `m = max(m, a[i])` runs one compare per cycle or slower, each waiting on the last.
    Eight partial maxima over interleaved elements are eight independent chains the core overlaps:
    0.32 -> 0.22 ns an element over a 50257-wide row, one core. The maximum is the same
    whatever the order (NaNs aside, which the callers' exp turns into NaN anyway)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[lo]
    end = hi - (hi - lo) % 8
    for i in range(lo, end, 8):
        m0 = max(m0, a[i])
        m1 = max(m1, a[i + 1])
        m2 = max(m2, a[i + 2])
        m3 = max(m3, a[i + 3])
        m4 = max(m4, a[i + 4])
        m5 = max(m5, a[i + 5])
        m6 = max(m6, a[i + 6])
        m7 = max(m7, a[i + 7])
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(end, hi):
        m = max(m, a[i])
    return m


@njit(fastmath=REDUCTION_MATH, **JIT_OPTIONS)
def exp_sum_(e, mx):
    """e <- exp(e - mx) in place, for use inside kernels; returns sum(e) in e's dtype.

    Written as a loop over one 1-D array, as LLVM vectorises it. The same loop inlined in a kernel as
    s[r, c] = exp(s[r, c] - mx) over a row of a 2-D array, with bounds computed per row, ran one element
    at a time: ~4 ns an element instead of ~0.7 (one core, blocks of 256 of a 50257-wide row)."""
    s = e.dtype.type(0)
    for i in range(e.size):
        x = exp(e[i] - mx)
        e[i] = x
        s += x
    return s
