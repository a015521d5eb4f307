"""Cross-entropy over the vocabulary, fused with its gradient.

    p = softmax(logits) over V,   loss = mean over non-ignored positions of -log p[target]
    dloss/dlogits = (p - onehot(target)) / n   (0 at ignored positions)
"""
from __future__ import annotations

import numpy as np

from . import kernels

IGNORE_INDEX = -100


def _validate(logits, targets, ignore_index):
    logits = np.asarray(logits)
    targets = np.asarray(targets)
    if logits.ndim < 2:
        raise ValueError(f"cross_entropy: logits must be (..., V), got shape {logits.shape}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {targets.shape} does not match logits {logits.shape[:-1]}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"cross_entropy: targets must be integers, got {targets.dtype}")
    V = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"cross_entropy: target id {targets[bad].flat[0]} out of range [0, {V}) "
                         f"(use {ignore_index} to ignore a position)")
    return logits, targets


def cross_entropy(logits, targets, ignore_index: int = IGNORE_INDEX, out=None):
    """Returns (loss, dlogits): mean cross-entropy over non-ignored positions and its gradient.

    logits (..., V) float; targets (...) int with `ignore_index` at positions to skip.
    If every position is ignored the loss is 0 and dlogits is all zeros.
    out: an array to write dlogits into; `out=logits` reuses the logits' memory (training loops
    that no longer need the logits save a (B, T, V) array).
    """
    logits, targets = _validate(logits, targets, ignore_index)
    if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype or not out.flags.c_contiguous):
        raise ValueError(f"cross_entropy: out must be a C-contiguous {logits.dtype} array of shape {logits.shape}")
    if kernels.use_numba():
        return kernels.cross_entropy_forward_backward(logits, targets, ignore_index, out=out)
    loss, dlogits = cross_entropy_numpy(logits, targets, ignore_index)
    if out is None:
        return loss, dlogits
    out[...] = dlogits
    return loss, out


def cross_entropy_numpy(logits, targets, ignore_index: int = IGNORE_INDEX):
    V = logits.shape[-1]
    z = logits.reshape(-1, V)                                         # (N, V)
    t = targets.reshape(-1)                                           # (N,)
    valid = t != ignore_index                                         # (N,)
    n = int(valid.sum())
    m = z.max(axis=-1, keepdims=True)                                 # (N, 1) for a stable exp
    e = np.exp(z - m)                                                 # (N, V)
    sumexp = e.sum(axis=-1, keepdims=True)                            # (N, 1)
    rows = np.arange(len(t))
    tt = np.where(valid, t, 0)
    # -log p[target] = logsumexp(z) - z[target] = log(sumexp) + m - z[target]
    nll = (np.log(sumexp[:, 0]) + m[:, 0] - z[rows, tt]) * valid      # (N,)
    loss = nll.sum() / max(n, 1)
    # dloss/dz = (softmax(z) - onehot(target)) / n on valid rows, 0 elsewhere
    dz = e / sumexp
    dz[rows, tt] -= 1.0
    dz *= (valid / max(n, 1)).astype(z.dtype)[:, None]
    return logits.dtype.type(loss), dz.reshape(logits.shape)
