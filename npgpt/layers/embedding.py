"""Token and position embeddings: lookup tables whose backward is a scatter-add."""
from __future__ import annotations

import numpy as np

from .. import fast
from .module import Module, Parameter, normal_init


class Embedding(Module):
    """out[b, t] = weight[idx[b, t]]   (token embedding wte, also the tied LM head)."""

    def __init__(self, n: int, C: int, *, dtype=np.float32, rng=None, std: float = 0.02):
        self.weight = Parameter(normal_init(rng, (n, C), std, dtype))  # (n, C); zeros if rng is None

    def forward(self, idx):
        self.save_for_backward(idx=idx)
        return self.weight.data[idx]                                   # (B, T, C)

    def backward(self, dout):
        # out[b, t] = w[idx[b, t]]  =>  dw[i] += sum of dout[b, t] over every (b, t) with idx[b, t] == i
        idx = self.saved("idx")
        if not self.weight.requires_grad:
            return None                                                # frozen: no scatter-add at all
        if fast.use_numba():
            fast.embedding_backward(idx, dout, self.weight.grad)
        else:
            C = dout.shape[-1]
            np.add.at(self.weight.grad, idx.reshape(-1), dout.reshape(-1, C))
        return None  # token ids have no gradient


class PositionEmbedding(Module):
    """out[t] = weight[t] for t < T, broadcast over the batch (wpe)."""

    def __init__(self, n_ctx: int, C: int, *, dtype=np.float32, rng=None, std: float = 0.02):
        self.weight = Parameter(normal_init(rng, (n_ctx, C), std, dtype))  # (n_ctx, C); zeros if rng is None

    def forward(self, T: int, start: int = 0):
        self.save_for_backward(start=start, T=T)
        return self.weight.data[start:start + T]                       # (T, C)

    def backward(self, dout):
        # out[b, t] = w[start + t] for every b  =>  dw[start + t] += sum_b dout[b, t]
        start, T = self.saved("start", "T")
        if not self.weight.requires_grad:
            return None
        self.weight.grad[start:start + T] += dout.sum(axis=0) if dout.ndim == 3 else dout
        return None

    def forward_cached(self, pos):
        """out[b, t] = weight[pos[b, t]] (B, T, C): each row at its own positions (a KV cache's rows
        hold different lengths). Inference only: keeps nothing, has no backward."""
        return self.weight.data[pos]


class TiedLMHead(Module):
    """logits = x @ wte^T: the output projection shares the token embedding's weight."""

    FEW_ROWS = 8     # 1..FEW_ROWS float32 rows (decoded tokens): the packed-row kernels (fast.quant), BLAS above

    def __init__(self, wte: Embedding):
        self.weight = wte.weight   # the same Parameter: named_parameters lists it once, as wte

    def forward(self, x):
        *lead, C = x.shape
        x2 = x.reshape(-1, C)                                          # (N, C), N = B*T
        self.save_for_backward(x=x2)
        w = self.weight.data                                           # (V, C)
        if (1 <= len(x2) <= self.FEW_ROWS and x2.dtype == np.float32 and w.dtype == np.float32
                and w.flags.c_contiguous and fast.use_numba()):
            # wte (V, C) is already rows: the kernels of packed (out, in) weights, which pick few_rows' dot
            # products up to fast.dots_limit() rows (the 154 MB wte at 1.3-2.5x the GB/s of BLAS's GEMV at one
            # row, 1.3-1.6x at 2-4 and 1.14-1.19x at 5-8 the Numba row loop that takes the rest); BLAS's GEMM
            # of so few rows reads at a third of the bandwidth. docs/performance.md, fifth and sixth sessions
            from ..fast.quant import packed_matmul
            return packed_matmul(x2, w, None, None).reshape(*lead, -1)    # (B, T, V)
        return (x2 @ w.T).reshape(*lead, -1)                          # (B, T, V)

    def backward(self, dlogits):
        # logits = x @ w^T  =>  dw += dlogits^T x   and   dx = dlogits @ w
        x2, w = self.saved("x"), self.weight.data
        dl2 = dlogits.reshape(-1, w.shape[0])                          # (B*T, V)
        if self.weight.requires_grad:
            self.weight.add_matmul(dl2.T, x2)                          # dw += dlogits^T x  (V, C)
        return (dl2 @ w).reshape(dlogits.shape[:-1] + (w.shape[1],))   # (B, T, C)
