"""The bias add after a linear layer's GEMM. It mirrors npgpt/layers/linear.py:

    y += b          y (N, out) the GEMM's output, b (out,)

NumPy's broadcast add is slower than a plain Numba loop even on one core: 750 against 394 us for
a prefill's (1024, 3072) MLP activations (~1.7 ms a layer for NumPy over the four linears at
T=1024). From PARALLEL_MIN_ELEMENTS up the rows are also split over the cores (prange); below it
one add an element is so little work that waking the kernel threads (asleep while OpenBLAS ran
the GEMM) costs more than it saves.
"""
from numba import prange

from ._jit import pjit

PARALLEL_MIN_ELEMENTS = 1 << 21


@pjit
def _add_bias_(y, b):
    N, M = y.shape
    for n in prange(N):
        for j in range(M):
            y[n, j] += b[j]


def add_bias_(y, b):
    """y += b in place for y (N, out) and b (out,); returns y."""
    if y.ndim != 2 or b.shape != (y.shape[1],):
        raise ValueError(f"add_bias_: y must be (N, out) and b (out,), got {y.shape} and {b.shape}")
    _add_bias_(y.size if y.size >= PARALLEL_MIN_ELEMENTS else 0, y, b)
    return y
