"""How kernels are compiled: cached to disk, and, for loops over rows or elements, twice.

`pjit` compiles a kernel written with `prange` both serially (prange runs as range) and in
parallel, and picks per call: a parallel region costs a thread wake-up on every launch, a
waste for the tiny arrays of decoding and gradient checks, and a stall whenever another
process holds a core. Call `kernel(work, *args)` where `work` is the number of elements touched.
"""
import types

from .settings import quiet_kernel_threads

quiet_kernel_threads()   # before Numba loads libgomp (see npgpt/fast/settings.py)

from numba import njit  # noqa: E402

# Below ~262k elements one thread finishes before the others are awake: waking the kernels' sleeping
# OpenMP threads right after a GEMM costs ~50-100 us on 2 cores. Measured there (examples/profile_ops.py,
# docs/performance.md "Every op on every core"): at 98k elements (nanoGPT's CPU shape) LayerNorm's
# kernels ran 0.7x as fast on 2 threads as on 1, GELU's 1.2-1.5x; from ~200k up both gain.
PARALLEL_MIN_WORK = 1 << 18

# error_model="numpy": a float division by zero gives inf/nan as in NumPy instead of raising
# ZeroDivisionError. Parallel builds use it anyway; in a serial build the Python model's check
# on every division keeps LLVM from vectorising the loop (GELU's serial loop ran ~10x slower).
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")     # every kernel's, serial or parallel
jit = njit(**JIT_OPTIONS)


def _renamed(fn, suffix):
    """A copy of fn under another qualified name, so Numba caches the two builds separately."""
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    g.__module__ = fn.__module__
    return g


# Floating-point sums are sequential unless reassociation is allowed: with it LLVM keeps several
# partial sums in SIMD lanes (accumulating in float64 keeps the result as accurate as NumPy's
# pairwise sums). No 'nnan'/'ninf': the masked softmax relies on -inf.
REDUCTION_MATH = {"reassoc", "contract"}


class _SerialOrParallel:
    def __init__(self, fn, fastmath):
        self.py_func = fn
        opts = dict(JIT_OPTIONS, fastmath=fastmath)
        self.serial = njit(**opts)(_renamed(fn, "_serial"))
        self.parallel = njit(parallel=True, **opts)(_renamed(fn, "_parallel"))
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, work, *args):
        return (self.parallel if work >= PARALLEL_MIN_WORK else self.serial)(*args)


def pjit(fn=None, *, reductions: bool = False):
    """@pjit or @pjit(reductions=True) (allow reassociating sums, see REDUCTION_MATH)."""
    fastmath = REDUCTION_MATH if reductions else False
    if fn is None:
        return lambda f: _SerialOrParallel(f, fastmath)
    return _SerialOrParallel(fn, fastmath)

