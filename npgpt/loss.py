"""Cross-entropy over the vocabulary, fused with its gradient.

    p = softmax(logits) over V,   loss = sum over non-ignored positions of -log p[target] / n
    dloss/dlogits = (p - onehot(target)) / n   (0 at ignored positions)

n is the count of non-ignored positions (the mean), or a given `normalizer`: gradient accumulation
over micro-batches passes the whole batch's count, so every target weighs the same whatever
micro-batch it falls in, and the micro-batches' losses and gradients add up to the full batch's.
"""
from __future__ import annotations

import numpy as np

from . import fast

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


def cross_entropy(logits, targets, ignore_index: int = IGNORE_INDEX, out=None, normalizer=None):
    """Returns (loss, dlogits): mean cross-entropy over non-ignored positions and its gradient.

    logits (..., V) float; targets (...) int with `ignore_index` at positions to skip.
    If every position is ignored the loss is 0 and dlogits is all zeros.
    out: an array to write dlogits into; `out=logits` reuses the logits' memory (training loops
    that no longer need the logits save a (B, T, V) array).
    normalizer: divide the summed loss (and the gradient) by this instead of by this call's count of
    non-ignored positions, e.g. the count of the whole batch a micro-batch belongs to.
    """
    logits, targets = _validate(logits, targets, ignore_index)
    if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype or not out.flags.c_contiguous):
        raise ValueError(f"cross_entropy: out must be a C-contiguous {logits.dtype} array of shape {logits.shape}")
    if normalizer is not None and not (np.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"cross_entropy: normalizer must be a finite number > 0, got {normalizer!r}")
    if fast.use_numba():
        return fast.cross_entropy_forward_backward(logits, targets, ignore_index, out=out, normalizer=normalizer)
    loss, dlogits = cross_entropy_numpy(logits, targets, ignore_index, normalizer)
    if out is None:
        return loss, dlogits
    out[...] = dlogits
    return loss, out


def cross_entropy_numpy(logits, targets, ignore_index: int = IGNORE_INDEX, normalizer=None):
    V = logits.shape[-1]
    z = logits.reshape(-1, V)                                         # (N, V)
    t = targets.reshape(-1)                                           # (N,)
    valid = t != ignore_index                                         # (N,)
    n = max(int(valid.sum()), 1) if normalizer is None else normalizer
    m = z.max(axis=-1, keepdims=True)                                 # (N, 1) for a stable exp
    e = np.exp(z - m)                                                 # (N, V)
    sumexp = e.sum(axis=-1, keepdims=True)                            # (N, 1)
    rows = np.arange(len(t))
    tt = np.where(valid, t, 0)
    # -log p[target] = logsumexp(z) - z[target] = log(sumexp) + m - z[target]
    nll = (np.log(sumexp[:, 0]) + m[:, 0] - z[rows, tt]) * valid      # (N,)
    loss = nll.sum() / n
    # dloss/dz = (softmax(z) - onehot(target)) / n on valid rows, 0 elsewhere
    dz = e / sumexp
    dz[rows, tt] -= 1.0
    dz *= (valid / n).astype(z.dtype)[:, None]
    return logits.dtype.type(loss), dz.reshape(logits.shape)
