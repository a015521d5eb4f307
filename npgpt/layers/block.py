"""Transformer block, pre-LN with residuals:

    x1 = x  + attn(ln_1(x))
    x2 = x1 + mlp(ln_2(x1))
"""
from __future__ import annotations

import numpy as np

from .attention import CausalSelfAttention
from .layernorm import LayerNorm
from .mlp import MLP
from .module import Module, no_grad, spawn_seeds


class Block(Module):
    def __init__(self, C: int, NH: int, *, dtype=np.float32, rng=None, dropout: float = 0.0, n_layer: int = 1,
                 seed=None):
        s_attn, s_mlp = spawn_seeds(seed, 2)
        self.ln_1 = LayerNorm(C, dtype=dtype)
        self.attn = CausalSelfAttention(C, NH, dtype=dtype, rng=rng, dropout=dropout, n_layer=n_layer, seed=s_attn)
        self.ln_2 = LayerNorm(C, dtype=dtype)
        self.mlp = MLP(C, dtype=dtype, rng=rng, dropout=dropout, n_layer=n_layer, seed=s_mlp)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x

    def backward(self, dx2):
        # x2 = x1 + mlp(ln_2(x1))  =>  dx1 = dx2 + ln_2'(mlp'(dx2))   (the residual passes dx2 straight through)
        dx1 = dx2 + self.ln_2.backward(self.mlp.backward(dx2))
        # x1 = x + attn(ln_1(x))   =>  dx  = dx1 + ln_1'(attn'(dx1))
        return dx1 + self.ln_1.backward(self.attn.backward(dx1))

    def forward_cached(self, x, layer_cache, only_at=None):
        """Inference with a KV cache (see CausalSelfAttention.forward_cached), keeping nothing for
        backward. The sub-layers' own forward runs (a swapped MLP runs too), so dropout is off only in
        eval mode: GPT.forward_cached runs every block under model.eval_mode(). only_at (B,): only the
        output at position only_at[b] of each row is computed (B, 1, C); the keys and values of all
        T positions still go into the cache."""
        with no_grad():
            a = self.attn.forward_cached(self.ln_1(x), layer_cache, only_at)  # (B, T, C) | (B, 1, C)
            if only_at is not None:
                x = x[np.arange(len(x)), only_at][:, None]                    # (B, 1, C): the kept positions
            x = x + a
            x = x + self.mlp(self.ln_2(x))                                 # (B, T, C) | (B, 1, C)
        return x
