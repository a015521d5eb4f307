"""LoRA: a frozen Linear plus a trainable low-rank update (Hu et al. 2021; the book's appendix E).

    y = x @ W + b + s * (x @ A) @ B,      s = alpha / r

W (in, out) and b (out,) are the wrapped Linear's own Parameters (the same objects, so they keep
their names and are frozen: requires_grad False); A (in, r) starts random and B (r, out) at zero,
so a fresh LoRALinear computes exactly what the Linear computed. Training moves only A and B:
r * (in + out) numbers instead of in * out.

A is drawn as PEFT draws it (kaiming_uniform_(a=sqrt(5)) of its (r, in) weight): uniform in
[-1/sqrt(in), 1/sqrt(in)].
"""
from __future__ import annotations

import numpy as np

from .linear import Linear, add_bias_
from .module import Module, Parameter


class LoRALinear(Module):
    def __init__(self, base: Linear, rank: int, alpha: float, *, rng=None, freeze_base: bool = True):
        n_in, n_out = base.weight.data.shape
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank}")
        dtype = base.weight.data.dtype
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank                                   # s = alpha / r
        self.weight, self.bias = base.weight, base.bias                       # (in, out), (out,): the base's own
        if freeze_base:
            self.weight.requires_grad = self.bias.requires_grad = False
        rng = np.random.default_rng(rng)                                      # a Generator passes through
        bound = 1.0 / np.sqrt(n_in)
        self.lora_A = Parameter(rng.uniform(-bound, bound, (n_in, self.rank)).astype(dtype))   # (in, r)
        self.lora_B = Parameter(np.zeros((self.rank, n_out), dtype=dtype))                     # (r, out)

    def forward(self, x):
        *lead, n_in = x.shape
        x2 = x.reshape(-1, n_in)                             # (N, in), N = B*T
        h = x2 @ self.lora_A.data                            # (N, r)   h = x A
        self.save_for_backward(x=x2, h=h)
        y = x2 @ self.weight.data                            # (N, out) x W
        add_bias_(y, self.bias.data)                         #          + b
        y += (self.scale * h) @ self.lora_B.data             #          + s h B   (the scale on the small (N, r))
        return y.reshape(*lead, -1)

    def backward(self, dy):
        # forward: y = x W + b + s h B,  h = x A   (row by row over N = B*T rows)
        x2, h = self.saved("x", "h")
        W, A, B, s = self.weight.data, self.lora_A.data, self.lora_B.data, self.scale
        dy2 = dy.reshape(-1, W.shape[1])                     # (N, out)
        if self.weight.requires_grad:                        # frozen (the usual case): skipped
            self.weight.add_matmul(x2.T, dy2)                # dL/dW += x^T dy            (in, out)
        if self.bias.requires_grad:
            self.bias.grad += dy2.sum(axis=0)                # dL/db += sum_n dy          (out,)
        # y = ... + s h B  =>  dL/dB = s h^T dy,  dL/dh = s dy B^T
        if self.lora_B.requires_grad:
            self.lora_B.add_matmul((s * h).T, dy2)           # dL/dB += (s h)^T dy        (r, out)
        dh = s * (dy2 @ B.T)                                 # dL/dh  = s dy B^T          (N, r)
        # h = x A  =>  dL/dA = x^T dh,  and x gets dh A^T
        if self.lora_A.requires_grad:
            self.lora_A.add_matmul(x2.T, dh)                 # dL/dA += x^T dh = s x^T dy B^T   (in, r)
        dx = dy2 @ W.T                                       # dL/dx  = dy W^T            (N, in)
        dx += dh @ A.T                                       #        + s (dy B^T) A^T
        return dx.reshape(*dy.shape[:-1], W.shape[0])

    def delta(self):
        """s A B (in, out): what the adapter adds to W (merge folds it in)."""
        return self.scale * (self.lora_A.data @ self.lora_B.data)

    def merged(self) -> Linear:
        """A plain Linear holding W + s A B and b (W's array is updated in place, as PEFT's merge does)."""
        self.weight.data += self.delta().astype(self.weight.data.dtype)
        n_in, n_out = self.weight.data.shape
        lin = Linear(n_in, n_out, dtype=self.weight.data.dtype)         # zeros, replaced at once:
        lin.weight, lin.bias = self.weight, self.bias                   # the same Parameters
        lin.training = self.training
        return lin

    def __repr__(self):
        n_in, n_out = self.weight.data.shape
        return f"LoRALinear({n_in}, {n_out}, rank={self.rank}, alpha={self.alpha})"
