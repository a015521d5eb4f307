"""The one place that decides how kernels are compiled: cached to disk, parallel where it pays."""
from numba import njit

jit = njit(cache=True, nogil=True)
pjit = njit(cache=True, nogil=True, parallel=True)
