"""Which implementation runs the hot non-GEMM parts: the readable NumPy reference or Numba kernels.

Select with the environment variable NPGPT_KERNELS=numpy|numba (default numba), or at run time
with `set_backend(...)` / `with use_backend(...):`. Every layer keeps its NumPy version; the
Numba kernels in this package each open with the NumPy lines they mirror and are tested against them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

BACKENDS = ("numpy", "numba")
_backend = None


def _check(name):
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r} (NPGPT_KERNELS)")
    return name


def get_backend() -> str:
    global _backend
    if _backend is None:
        _backend = _check(os.environ.get("NPGPT_KERNELS", "numba").strip().lower() or "numba")
    return _backend


def set_backend(name: str) -> None:
    global _backend
    _backend = _check(name)


@contextmanager
def use_backend(name: str):
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def use_numba() -> bool:
    return get_backend() == "numba"
