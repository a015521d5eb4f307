"""MLP: out = dropout(gelu(x @ w_fc + b_fc) @ w_proj + b_proj), hidden width 4C."""
from __future__ import annotations

import math

import numpy as np

from .dropout import Dropout
from .gelu import GELU
from .linear import Linear
from .module import Module


class MLP(Module):
    def __init__(self, C: int, *, dtype=np.float32, rng=None, dropout: float = 0.0, n_layer: int = 1, seed=None):
        self.c_fc = Linear(C, 4 * C, dtype=dtype, rng=rng)
        self.gelu = GELU()
        self.c_proj = Linear(4 * C, C, dtype=dtype, rng=rng, std=0.02 / math.sqrt(2 * n_layer))
        self.dropout = Dropout(dropout, seed=seed)

    def forward(self, x):
        if type(self.c_fc) is Linear and type(self.gelu) is GELU:   # not a LoRA or packed c_fc: one pass adds b_fc
            h = self.gelu(self.c_fc.forward_without_bias(x), bias=self.c_fc.bias.data)   # gelu(x @ w_fc + b_fc)
        else:
            h = self.gelu(self.c_fc(x))              # (B, T, 4C)
        return self.dropout(self.c_proj(h))          # (B, T, C)

    def backward(self, dout):
        # out = dropout(c_proj(h))
        dh = self.c_proj.backward(self.dropout.backward(dout))  # (B, T, 4C)
        # h = gelu(c_fc(x))      (dh, a fresh product of a plain Linear, may take GELU's dx)
        if type(self.gelu) is GELU:
            dg = self.gelu.backward(dh, overwrite_dy=type(self.c_proj) is Linear)   # (B, T, 4C)
        else:
            dg = self.gelu.backward(dh)
        return self.c_fc.backward(dg)                           # (B, T, C)
