"""LayerNorm over the last axis: y = (x - mean) / sqrt(var + eps) * g + b (biased variance)."""
from __future__ import annotations

import numpy as np

from .. import fast
from .module import Module, Parameter


class LayerNorm(Module):
    def __init__(self, C: int, *, dtype=np.float32, eps: float = 1e-5):
        self.eps = eps
        self.weight = Parameter(np.ones(C, dtype=dtype))   # g (C,)
        self.bias = Parameter(np.zeros(C, dtype=dtype))    # b (C,)

    def forward(self, x):
        if fast.use_numba():
            y, xhat, rstd = fast.layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
            self.save_for_backward(xhat=xhat, rstd=rstd)
            return y
        return self.forward_numpy(x)

    def forward_numpy(self, x):
        mean = x.mean(axis=-1, keepdims=True)                         # (..., 1)
        xc = x - mean                                                 # (..., C)
        var = (xc * xc).mean(axis=-1, keepdims=True)                  # (..., 1) biased
        rstd = 1.0 / np.sqrt(var + self.eps)                          # (..., 1)
        xhat = xc * rstd                                              # (..., C)
        self.save_for_backward(xhat=xhat, rstd=rstd)
        return xhat * self.weight.data + self.bias.data

    def backward(self, dy):
        if fast.use_numba():
            xhat, rstd = self.saved("xhat", "rstd")
            return fast.layernorm_backward(dy, xhat, rstd, self.weight.data,
                                              self._grad_sink(self.weight), self._grad_sink(self.bias))
        return self.backward_numpy(dy)

    @staticmethod
    def _grad_sink(p):
        """Where the kernel adds p's gradient: p.grad, or a throwaway array when p is frozen."""
        return p.grad if p.requires_grad else np.zeros_like(p.data)

    def backward_numpy(self, dy):
        # forward: y = xhat * g + b, with xhat = (x - mean) * rstd
        (xhat, rstd), g = self.saved("xhat", "rstd"), self.weight.data
        C = xhat.shape[-1]
        sum_rows = tuple(range(dy.ndim - 1))
        if self.weight.requires_grad:
            self.weight.grad += (dy * xhat).sum(axis=sum_rows)       # dL/dg = sum_rows dy * xhat
        if self.bias.requires_grad:
            self.bias.grad += dy.sum(axis=sum_rows)                  # dL/db = sum_rows dy
        dxhat = dy * g                                               # dL/dxhat
        # xhat depends on x directly, through the mean, and through rstd:
        #   dx = rstd * ( dxhat                                   <- term 1: direct
        #                 - mean(dxhat)                           <- term 2: through the mean
        #                 - xhat * mean(dxhat * xhat) )           <- term 3: through the variance
        term2 = dxhat.sum(axis=-1, keepdims=True) / C
        term3 = xhat * ((dxhat * xhat).sum(axis=-1, keepdims=True) / C)
        return rstd * (dxhat - term2 - term3)
