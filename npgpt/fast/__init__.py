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


def _check(name, what="kernel backend"):
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    global _backend
    if _backend is None:
        _backend = _check(os.environ.get("NPGPT_KERNELS", "numba").strip().lower() or "numba",
                          "the environment variable NPGPT_KERNELS")
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


_has_scipy = None


def flash_attention_available() -> bool:
    """The fused attention kernel multiplies its tiles with np.dot, which Numba runs through SciPy's
    BLAS: without SciPy installed the layers keep the materialised path."""
    global _has_scipy
    if _has_scipy is None:
        import importlib.util
        _has_scipy = importlib.util.find_spec("scipy") is not None
    return _has_scipy


# Kernel name -> module. Imported on first use, so the NumPy path never imports Numba and a
# program compiles (or loads from Numba's cache) only the kernels it calls.
_KERNELS = {
    "layernorm_forward": "layernorm", "layernorm_backward": "layernorm",
    "gelu_forward": "gelu", "gelu_backward": "gelu", "bias_gelu_forward": "gelu",
    "causal_softmax_forward": "attention", "causal_softmax_backward": "attention",
    "flash_attention_forward": "flash_attention", "flash_attention_backward": "flash_attention",
    "head_attention_forward": "head_attention", "head_attention_backward": "head_attention",
    "decode_attention": "decode", "decode_block": "decode", "block_constants": "decode", "run_block": "decode",
    "cross_entropy_forward_backward": "crossentropy", "token_nll": "crossentropy",
    "embedding_backward": "embedding",
    "adamw_update": "adamw", "sum_of_squares": "adamw", "scale_": "adamw",
    "add_bias_": "bias",
    "few_rows_matmul": "few_rows", "few_rows_matmul_t": "few_rows", "rows_limit": "few_rows", "dots_limit": "few_rows",
}


def __getattr__(name):
    if name in _KERNELS:
        import importlib
        fn = getattr(importlib.import_module(f"{__name__}.{_KERNELS[name]}"), name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
