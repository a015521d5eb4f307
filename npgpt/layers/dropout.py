"""Dropout (inverted): in training, y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p)."""
from __future__ import annotations

import numpy as np

from .module import Module


class Dropout(Module):
    def __init__(self, p: float, *, seed=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p!r}")
        self.p = p
        self.rng = np.random.default_rng(seed)
        self.mask = None

    def active(self):
        return self.training and self.p > 0.0

    def forward(self, x):
        if not self.active():
            self.save_for_backward(mask=None)                  # identity
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        self.save_for_backward(mask=mask)
        return x * mask

    def backward(self, dy):
        # y = x * mask  =>  dx = dy * mask (the same mask: dropped units get no gradient)
        return self.replay(dy)

    def replay(self, x):
        """x * mask with the last forward's mask: backward, and forward again with the same units dropped
        (attention recomputes its dropped probabilities this way instead of keeping them)."""
        mask = self.saved("mask")
        return x if mask is None else x * mask
