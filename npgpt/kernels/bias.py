"""The bias add after a linear layer's GEMM. It mirrors npgpt/layers/linear.py:

    y += b          y (N, out) the GEMM's output, b (out,)

NumPy's broadcast add runs on one core: for a prefill's (1024, 3072) MLP activations that is a
few milliseconds a layer. Here the rows are split over the cores (prange), in place, once y is
large enough: one add an element is so little work that below PARALLEL_MIN_ELEMENTS waking the
kernel threads (asleep while OpenBLAS ran the GEMM) costs more than it saves, and one core adds.
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
    """y += b in place for y (N, out) C-contiguous and b (out,); returns y."""
    _add_bias_(y.size if y.size >= PARALLEL_MIN_ELEMENTS else 0, y, b)
    return y
