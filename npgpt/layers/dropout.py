"""Dropout (inverted): in training, y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p).

The mask is kept for backward as a bool array (a quarter of a float32 one's memory)."""
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
        mask = self.rng.random(x.shape, dtype=np.float32) >= self.p      # bool, True = kept
        self.save_for_backward(mask=mask)
        return self.apply_mask(x, mask)

    def apply_mask(self, x, mask):
        """x * mask / (1 - p), in x's dtype."""
        y = x * x.dtype.type(1.0 / (1.0 - self.p))
        y *= mask
        return y

    def backward(self, dy):
        # y = x * mask / (1 - p)  =>  dx = dy * mask / (1 - p) (the same mask: dropped units get no gradient)
        return self.replay(dy)

    def replay(self, x):
        """x * mask / (1 - p) with the last forward's mask: backward, and forward again with the same units
        dropped (attention recomputes its dropped probabilities this way instead of keeping them)."""
        mask = self.saved("mask")
        return x if mask is None else self.apply_mask(x, mask)
