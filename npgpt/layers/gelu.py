"""GELU, the tanh approximation GPT-2 uses ("gelu_new" in Hugging Face):

    y = 0.5 * x * (1 + tanh(s * (x + 0.044715 * x^3))),   s = sqrt(2 / pi)
"""
from __future__ import annotations

import math

import numpy as np

from .. import fast
from .module import Module, is_grad_enabled

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


class GELU(Module):
    def forward(self, x, bias=None):
        """gelu(x); with `bias`, gelu(x + bias), adding bias into x in place (x: the GEMM output that
        the MLP hands over, so the bias add and GELU are one pass). The Numba kernels keep dgelu/dx for
        the backward instead of x (in x's memory when bias is given: x is then overwritten by it)."""
        train = is_grad_enabled()
        if fast.use_numba():
            if bias is not None:
                y = fast.bias_gelu_forward(x, bias, slope=train)   # x += bias; y = gelu(x); x <- dgelu/dx
                self.save_for_backward(slope=x, x=None)
                return y
            if not train:
                return fast.gelu_forward(x)
            y, d = fast.gelu_forward(x, slope=True)
            self.save_for_backward(slope=d, x=None)
            return y
        if bias is not None:
            x += bias
        self.save_for_backward(slope=None, x=x)
        return self.forward_numpy(x)

    @staticmethod
    def forward_numpy(x):
        u = GELU_SCALE * (x + GELU_CUBIC * (x * x * x))   # x*x*x: float pow is ~70x slower
        return 0.5 * x * (1.0 + np.tanh(u))

    def backward(self, dy, overwrite_dy: bool = False):
        """dx; with overwrite_dy, dx may be written into dy (the MLP hands over c_proj's fresh dx)."""
        d, x = self.saved("slope", "x")
        if d is None:
            return self.backward_numpy(dy, x)
        out = dy if overwrite_dy and dy.flags.c_contiguous else None
        return fast.gelu_backward(dy, d, out=out)             # dx = dy * dgelu/dx (the Numba forward kept it)

    @staticmethod
    def backward_numpy(dy, x):
        # y = 0.5 x (1 + t), t = tanh(u), u = s (x + 0.044715 x^3)
        # dy/dx = 0.5 (1 + t)  +  0.5 x (1 - t^2) * du/dx,   du/dx = s (1 + 3 * 0.044715 x^2)
        t = np.tanh(GELU_SCALE * (x + GELU_CUBIC * (x * x * x)))
        du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
