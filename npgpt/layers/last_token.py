"""A classification head on each row's last real token (batches padded on the right):

    x      = hidden[b, lengths[b] - 1]     for each row b             (B, C)
    logits = x @ w + b                                                (B, K)   K classes

With causal attention the hidden state at position t has seen tokens 0..t, so the last *real*
token is the one that has read the whole text; position -1 of a short, padded row has read its
padding too.
"""
from __future__ import annotations

import numpy as np

from .linear import Linear


def last_positions(lengths, B: int, T: int):
    """lengths (B,) -> the index of each row's last real token, lengths - 1, checked to be in [0, T)."""
    lengths = np.asarray(lengths).reshape(-1)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be B={B} integers, got {lengths.dtype} {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > T:
        raise ValueError(f"lengths must be in [1, T={T}], got {lengths.tolist()}")
    return lengths - 1


class LastTokenHead(Linear):
    """Linear(C, K) applied to hidden[b, lengths[b] - 1]; its parameters are a Linear's (weight, bias)."""

    def forward(self, hidden, lengths):
        B, T, C = hidden.shape
        last = last_positions(lengths, B, T)                    # (B,)
        self.save_for_backward(shape=hidden.shape, last=last)   # (Linear.forward keeps x itself)
        x = hidden[np.arange(B), last]                          # (B, C) a gather: one row per example
        return super().forward(x)                               # (B, K)

    def backward(self, dlogits):
        # logits = x @ w + b  =>  dw, db and dx as in Linear
        shape, last = self.saved("shape", "last")
        dx = super().backward(dlogits)                          # (B, C)
        # x[b] = hidden[b, last[b]]  =>  dhidden[b, last[b]] = dx[b], zero at every other position
        dhidden = np.zeros(shape, dtype=dx.dtype)               # (B, T, C)
        dhidden[np.arange(shape[0]), last] += dx
        return dhidden
