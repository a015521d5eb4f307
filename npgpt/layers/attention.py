"""Causal multi-head self-attention with a fused qkv projection.

    qkv = x @ w_attn + b_attn                       (B, T, 3C) -> q, k, v each (B, NH, T, hs)
    s   = q @ k^T                                                (B, NH, T, T)
    a   = softmax(scale * s) over j, scale = 1/sqrt(hs), with
          key j masked out (a = 0) for query i when j > i;  then dropout     (B, NH, T, T)
    y   = a @ v                                                  (B, NH, T, hs) -> (B, T, C)
    out = y @ w_proj + b_proj,  then residual dropout            (B, T, C)

The attention core (s, a, y and their backward) below is the readable one (`attend` and `backward`),
which holds the (B, NH, T, T) probabilities between forward and backward. It is the reference of two
Numba kernels, and npgpt/fast/fused_attention.py says which runs (`core(T)`): for long sequences the
fused kernel (FlashAttention-2 tiling, no probabilities kept), for short ones the same products as
here with the (batch row, head) pairs split over the cores (fast/head_attention.py).
"""
from __future__ import annotations

import math

import numpy as np

from .. import fast
from ..fast import fused_attention
from .dropout import Dropout
from .linear import Linear
from .module import Module, spawn_seeds


def causal_softmax_numpy(s, scale):
    """a = softmax(scale * s) along the last axis, key j masked out for query i when j > i + (Tk - Tq).

    s: (..., Tq, Tk); Tq < Tk when the queries are the newest Tq of Tk positions (KV cache)."""
    Tq, Tk = s.shape[-2:]
    future = np.triu(np.ones((Tq, Tk), dtype=bool), k=1 + Tk - Tq)     # True where j > i + (Tk - Tq)
    z = np.where(future, -np.inf, s * scale)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def causal_softmax(s, scale):
    """The Numba kernel (in place over s) or the NumPy reference, as npgpt.fast selects."""
    if fast.use_numba():
        return fast.causal_softmax_forward(s, scale)
    return causal_softmax_numpy(s, scale)


def causal_softmax_backward_numpy(da, a, scale):
    """ds for a = softmax(scale * s): ds = scale * a * (da - sum_j da * a)  (masked entries have a = 0)."""
    return scale * a * (da - (da * a).sum(axis=-1, keepdims=True))


class CausalSelfAttention(Module):
    flash_min_T = None          # this layer's fused-kernel threshold (None: npgpt.fast.fused_attention's)

    def __init__(self, C: int, NH: int, *, dtype=np.float32, rng=None, dropout: float = 0.0,
                 n_layer: int = 1, seed=None):
        self.C, self.NH, self.hs = C, NH, C // NH
        self.c_attn = Linear(C, 3 * C, dtype=dtype, rng=rng)
        self.c_proj = Linear(C, C, dtype=dtype, rng=rng, std=0.02 / math.sqrt(2 * n_layer))
        seeds = spawn_seeds(seed, 2)
        self.attn_dropout = Dropout(dropout, seed=seeds[0])
        self.resid_dropout = Dropout(dropout, seed=seeds[1])

    def split_heads(self, qkv):
        """(B, T, 3C) -> three (B, NH, T, hs) views (no copies)."""
        B, T, _ = qkv.shape
        qkv = qkv.reshape(B, T, 3, self.NH, self.hs)
        return [qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]

    def core(self, T: int) -> str:
        """Which attention core a forward over T positions runs: "fused", "heads" or "readable"
        (npgpt.fast.fused_attention decides)."""
        return fused_attention.core(T, self.attn_dropout.active(), self.flash_min_T)

    def runs_fused(self, T: int) -> bool:
        """Whether a forward over T positions runs the fused kernel."""
        return self.core(T) == "fused"

    def attend(self, q, k, v):
        """The attention core on (B, NH, T, hs) tensors; returns y (B, NH, T, hs)."""
        scale = 1.0 / math.sqrt(self.hs)
        s = q @ k.transpose(0, 1, 3, 2)                                # (B, NH, T, T)
        a = causal_softmax(s, scale)                                   # (B, NH, T, T)
        self.save_for_backward(q=q, k=k, v=v, a=a, y=None, L=None, ran_core="readable")
        a_drop = self.attn_dropout(a)                                  # (B, NH, T, T)
        return a_drop @ v                                              # (B, NH, T, hs)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.c_attn(x)                                           # (B, T, 3C)
        q, k, v = self.split_heads(qkv)                                # (B, NH, T, hs) each
        core = self.core(T)
        if core == "fused":
            y = np.empty((B, T, C), dtype=qkv.dtype)                   # heads written straight in place
            _, L = fast.flash_attention_forward(q, k, v, 1.0 / math.sqrt(self.hs), out=self.heads_view(y))
            self.save_for_backward(q=q, k=k, v=v, a=None, y=y, L=L, ran_core=core)   # y is c_proj's input: no copy
        elif core == "heads":
            y = np.empty((B, T, C), dtype=qkv.dtype)
            _, a = fast.head_attention_forward(q, k, v, 1.0 / math.sqrt(self.hs), out=self.heads_view(y))
            self.save_for_backward(q=q, k=k, v=v, a=a, y=None, L=None, ran_core=core)
        else:
            y = self.attend(q, k, v)                                   # (B, NH, T, hs)
            y = y.transpose(0, 2, 1, 3).reshape(B, T, C)               # re-assemble heads (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def heads_view(self, y):
        """(B, T, C) -> its (B, NH, T, hs) view (no copy)."""
        B, T, _ = y.shape
        return y.reshape(B, T, self.NH, self.hs).transpose(0, 2, 1, 3)

    def backward(self, dout):
        B, T, C = dout.shape
        q, k, v, a, core = self.saved("q", "k", "v", "a", "ran_core")
        scale = 1.0 / math.sqrt(self.hs)
        # out = dropout(y @ w_proj + b_proj)
        dy = self.c_proj.backward(self.resid_dropout.backward(dout))   # (B, T, C)
        dy = dy.reshape(B, T, self.NH, self.hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
        dqkv = np.empty((B, T, 3, self.NH, self.hs), dtype=dout.dtype)
        dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views (B, NH, T, hs)
        if core == "fused":                                            # the forward ran the fused kernel
            y, L = self.saved("y", "L")
            fast.flash_attention_backward(q, k, v, self.heads_view(y), L, dy, scale, dq, dk, dv)
            return self.c_attn.backward(dqkv.reshape(B, T, 3 * C))
        if core == "heads":                                            # the lines below, a head per task
            fast.head_attention_backward(q, k, v, a, dy, scale, dq, dk, dv)
            return self.c_attn.backward(dqkv.reshape(B, T, 3 * C))
        a_drop = self.attn_dropout.replay(a)                           # dropout(a) with the forward's mask
        # y = a_drop @ v  =>  da_drop = dy v^T,  dv = a_drop^T dy
        da = dy @ v.transpose(0, 1, 3, 2)                              # (B, NH, T, T)
        np.matmul(a_drop.transpose(0, 1, 3, 2), dy, out=dv)
        da = self.attn_dropout.backward(da)                            # a_drop = dropout(a)
        # a = softmax(scale * s)  =>  ds = scale * a * (da - rowsum(da * a))
        if fast.use_numba():
            ds = fast.causal_softmax_backward(da, a, scale)         # in place over da
        else:
            ds = causal_softmax_backward_numpy(da, a, scale)
        # s = q @ k^T  =>  dq = ds @ k,  dk = ds^T @ q
        np.matmul(ds, k, out=dq)
        np.matmul(ds.transpose(0, 1, 3, 2), q, out=dk)
        return self.c_attn.backward(dqkv.reshape(B, T, 3 * C))

    # ----------------------------------------------------------------- inference with a KV cache
    def forward_cached(self, x, layer_cache, only_at=None):
        """Inference only (no dropout, nothing kept for backward): x (B, T, C) holds the newest T
        positions. Their keys and values are appended to layer_cache (npgpt.inference.kvcache.LayerKV) and their
        queries attend to every cached position of their row, query t seeing keys j <= t + Tk - T.
        only_at (B,): only the output at position only_at[b] of each row is wanted (the last block of a
        prefill): every key and value is still stored, but one query per row attends -> (B, 1, C)."""
        B, T, C = x.shape
        qkv = self.c_attn(x)                                           # (B, T, 3C)
        scale = 1.0 / math.sqrt(self.hs)
        slots = layer_cache.decode_slots(qkv.dtype) if T == 1 and fast.use_numba() else None
        if slots is not None:                                          # one new token a row: one kernel call
            # on both cores when c_attn's product just ran on the kernel threads (packed weights: they still
            # spin), on one after a BLAS product (they sleep, and waking them costs more than it saves)
            on_kernels = getattr(self.c_attn, "runs_on_kernel_threads", None)
            awake = on_kernels is not None and on_kernels(B)
            y = fast.decode_attention(qkv.reshape(B, 3 * C), *slots, scale, threads_awake=awake)   # (B, C)
            return self.c_proj(y.reshape(B, 1, C))
        q, k, v = self.split_heads(qkv)                                # (B, NH, T, hs) each
        if only_at is None and layer_cache.empty() and self.runs_fused(T):   # a prompt into an empty cache
            y = np.empty((B, T, C), dtype=q.dtype)
            fused_attention.prefill(q, k, v, scale, self.heads_view(y), layer_cache)   # stores k, v too
            return self.c_proj(y)
        keys, values, mask = layer_cache.store(k, v, only_at)             # (B, NH, Tk, hs); mask (B, 1, T | 1, Tk) | None
        if only_at is not None:
            q, T = q[np.arange(B), :, only_at][:, :, None], 1             # (B, NH, 1, hs): the kept queries
        s = q @ keys.transpose(0, 1, 3, 2)                             # (B, NH, T, Tk)
        if mask is not None:
            s += mask                                                  # -inf on keys a ragged row must not see
        a = causal_softmax(s, scale)                                   # (B, NH, T, Tk)
        y = a @ values                                                 # (B, NH, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)                   # (B, T, C)
        return self.c_proj(y)
