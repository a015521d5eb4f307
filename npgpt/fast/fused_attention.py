"""Which attention core the layer runs: the fused kernel (flash_attention.py), the per-head kernel
(head_attention.py) or its readable core; and how the fused kernel fills a KV cache.

The readable core (npgpt/layers/attention.py: `attend` and `backward`) holds the (B, NH, T, T)
probabilities between forward and backward; it is the reference, and the only path with
NPGPT_KERNELS=numpy. The fused kernel keeps one logsumexp per query row and recomputes the
probabilities block by block in backward. A layer takes it when

    - the Numba backend is on and SciPy is there (Numba's np.dot calls SciPy's BLAS),
    - attention dropout is inactive (p = 0, or eval mode: the kernel has no dropout), and
    - T >= FLASH_MIN_T, the measured crossover (docs/performance.md, "Fused attention crossover"),
      which the environment variable NPGPT_FLASH_MIN_T overrides at import, or the layer's own
      threshold when it sets one (0 = always fused, a huge value = never).

Below that length, with the Numba backend, SciPy and no attention dropout, the layer runs the per-head
kernel: the readable core's products, its (batch row, head) pairs split over the cores.
"""
from __future__ import annotations

import os

from . import flash_attention_available, use_numba

FLASH_MIN_T = int(os.environ.get("NPGPT_FLASH_MIN_T", "128"))


def core(T: int, dropout_active: bool, min_T: int | None = None) -> str:
    """The core a forward over T positions takes: "fused", "heads" or "readable" (min_T: the layer's
    own threshold for the fused kernel)."""
    if not use_numba() or dropout_active or not flash_attention_available():
        return "readable"
    return "fused" if T >= (FLASH_MIN_T if min_T is None else min_T) else "heads"


def prefill(q, k, v, scale, y_heads, layer_cache) -> None:
    """A prompt into an empty KV cache: y_heads = attention(q, k, v) (the (B, NH, T, hs) view of the layer's
    (B, T, C) output), and k, v stored in layer_cache (npgpt.inference.kvcache.LayerKV). The kernel copies
    k and v into contiguous per-head arrays anyway: given the cache's own buffers, those copies are the
    cache; a cache of another dtype or layout is filled by its store()."""
    from . import flash_attention_forward
    kv = layer_cache.buffers(q.dtype)
    flash_attention_forward(q, k, v, scale, out=y_heads, kv_out=kv)
    if kv is None:
        layer_cache.store(k, v)
