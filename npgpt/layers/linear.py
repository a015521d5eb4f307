"""Linear: y = x @ w + b, with w stored (in, out) as in OpenAI's checkpoints."""
from __future__ import annotations

import numpy as np

from .. import fast
from .module import Module, Parameter, normal_init


def add_bias_(y, b):
    """y += b in place for a GEMM's output y (N, out) and b (out,): the Numba kernel
    (npgpt/fast/bias.py) or this NumPy line, as npgpt.fast selects. Returns y."""
    if fast.use_numba():
        return fast.add_bias_(y, b)
    y += b
    return y


class Linear(Module):
    FEW_ROWS = 8     # 2..FEW_ROWS float32 rows (a batch of decoded tokens): npgpt/fast/few_rows.py, not BLAS

    def __init__(self, n_in: int, n_out: int, *, dtype=np.float32, rng=None, std: float = 0.02):
        self.weight = Parameter(normal_init(rng, (n_in, n_out), std, dtype))  # (in, out); zeros if rng is None
        self.bias = Parameter(np.zeros(n_out, dtype=dtype))                                 # (out,)

    def forward(self, x):
        y = self.forward_without_bias(x)                     # x @ w
        add_bias_(y.reshape(-1, y.shape[-1]), self.bias.data)   # y += b
        return y

    def forward_without_bias(self, x):
        """x @ w, leaving the bias to the caller (the MLP adds it in its GELU pass); backward is the same."""
        *lead, n_in = x.shape
        x2 = x.reshape(-1, n_in)                             # (N, in), N = B*T: one 2-D GEMM
        self.save_for_backward(x=x2)
        w = self.weight.data                                 # (in, out)
        if (2 <= len(x2) <= self.FEW_ROWS and x2.dtype == np.float32 and w.dtype == np.float32
                and x2.flags.c_contiguous and w.flags.c_contiguous and fast.use_numba()
                and len(x2) <= fast.rows_limit()):
            # BLAS copies (packs) w before multiplying so few rows and reads 10-14 GB/s; the kernel
            # streams w once for every four rows (docs/performance.md, "2026-12-06, fifth session")
            y = fast.few_rows_matmul(x2, w)                  # x @ w, each row's sums in order
        else:
            y = x2 @ w                                       # (N, out)
        return y.reshape(*lead, -1)

    def backward(self, dy):
        # forward: y = x @ w + b, row by row over N = B*T rows
        x2, w = self.saved("x"), self.weight.data
        dy2 = dy.reshape(-1, w.shape[1])                     # (N, out)
        if self.weight.requires_grad:                        # frozen: skip a third of the backward's work
            self.weight.add_matmul(x2.T, dy2)                # dL/dw += x^T dy   (in, out)
        if self.bias.requires_grad:
            self.bias.grad += np.ones(len(dy2), dy2.dtype) @ dy2   # dL/db = sum_n dy = 1^T dy  (out,): BLAS's
            #                                                  threaded GEMV, 2-2.5x NumPy's one-core column sum
        dx = dy2 @ w.T                                       # dL/dx = dy w^T    (N, in)
        return dx.reshape(*dy.shape[:-1], w.shape[0])
