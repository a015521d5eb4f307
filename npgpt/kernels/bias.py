"""The bias add after a linear layer's GEMM. It mirrors npgpt/layers/linear.py:

    y += b          y (N, out) the GEMM's output, b (out,)

NumPy's broadcast add runs on one core: for a prefill's (1024, 3072) MLP activations that is a
few milliseconds a layer. Here the rows are split over the cores (prange), in place.
"""
from numba import prange

from ._jit import pjit


@pjit
def _add_bias_(y, b):
    N, M = y.shape
    for n in prange(N):
        for j in range(M):
            y[n, j] += b[j]


def add_bias_(y, b):
    """y += b in place for y (N, out) C-contiguous and b (out,); returns y."""
    _add_bias_(y.size, y, b)
    return y
