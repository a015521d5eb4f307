"""LoRA: a frozen Linear plus a trainable low-rank update (Hu et al. 2021; the book's appendix E).

    y = x @ W + b + s * (x @ A) @ B,      s = alpha / r

W (in, out) and b (out,) are the wrapped Linear's own Parameters (the same objects, so they keep
their names and are frozen: requires_grad False); A (in, r) starts random and B (r, out) at zero,
so a fresh LoRALinear computes exactly what the Linear computed. Training moves only A and B:
r * (in + out) numbers instead of in * out.

A is drawn as PEFT draws it (kaiming_uniform_(a=sqrt(5)) of its (r, in) weight): uniform in
[-1/sqrt(in), 1/sqrt(in)].

Putting adapters into a model and taking them out again (the surgery, below the layer):

    apply_lora(model, rank=16, alpha=16)   every Linear of the GPT body -> LoRALinear; everything but the
                                           adapters (and a classifier's head) frozen; returns the
                                           number of trainable parameters
    merge(model)                           W += s A B in every LoRALinear, back to plain Linears

`targets` names a subset as PEFT's target_modules does: a layer matches a name when its dotted name
(as Hugging Face's GPT2LMHeadModel names it, transformer.h.0.attn.c_attn) equals it or ends in
"." + name; a single string is a regular expression matched against the whole name. The adapter
files (PEFT's layout) are read and written by npgpt/io/peft.py.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .last_token import LastTokenHead
from .linear import Linear, add_bias_
from .module import Module, Parameter


def check_rank(rank) -> None:
    """ValueError unless rank is a whole number >= 1 (the one place a LoRA rank is checked)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank}")


class LoRALinear(Module):
    def __init__(self, base: Linear, rank: int, alpha: float, *, rng=None, freeze_base: bool = True):
        n_in, n_out = base.weight.data.shape
        check_rank(rank)
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


# ----------------------------------------------------------------------------- surgery
LORA_PARAMS = ("lora_A", "lora_B")


@dataclass
class LoRAConfig:
    """What apply_lora did (kept on the GPT as .lora_config, for save_adapter)."""
    rank: int
    alpha: float
    target_modules: list | str
    base: str | None = None


# ----------------------------------------------------------------------------- finding layers
def _body(model):
    """The GPT a model is built on: a Classifier's .gpt, else the model itself."""
    gpt = getattr(model, "gpt", None)
    return gpt if isinstance(gpt, Module) else model


def lora_layers(model) -> list:
    """[(dotted name, LoRALinear)] of the model's GPT body (names as in GPT2LMHeadModel)."""
    return [(name, m) for name, m in _body(model).named_modules() if isinstance(m, LoRALinear)]


def _matches(name: str, targets) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def count_trainable(model) -> int:
    return sum(p.data.size for p in model.parameters() if p.requires_grad)


def _base_params(gpt):
    """(name, Parameter) of the GPT's weights other than its adapters."""
    return [(name, p) for name, p in gpt.named_parameters() if name.rsplit(".", 1)[-1] not in LORA_PARAMS]


# ----------------------------------------------------------------------------- apply / merge
def apply_lora(model, rank: int, alpha: float, targets=None, seed=0, base: str | None = None) -> int:
    """Wrap every Linear of the model's GPT body (or those `targets` names) in a LoRALinear, freeze
    everything else except a classification head, and return the number of trainable parameters.
    A is drawn from np.random.default_rng(seed), layer by layer in module order; B starts at zero.
    base: the base model's name or path, recorded for save_adapter."""
    if lora_layers(model):
        raise ValueError("the model already holds LoRA adapters (merge them first, or load into a fresh model)")
    check_rank(rank)
    if isinstance(targets, (list, tuple)) and not targets:
        raise ValueError("targets must name at least one layer (None: every Linear)")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha}")
    body = _body(model)
    found = [(name, lin) for name, lin in body.named_modules()
             if isinstance(lin, Linear) and not isinstance(lin, LastTokenHead) and _matches(name, targets)]
    if not found:
        raise ValueError(f"no Linear layer matches targets {targets!r}")
    model.requires_grad_(False)                                      # the whole base model frozen
    rng = np.random.default_rng(seed)
    for name, lin in found:
        body.replace(name, LoRALinear(lin, rank, alpha, rng=rng))   # A (in, r) random, B (r, out) zero
    for m in model.modules():
        if isinstance(m, LastTokenHead):
            m.requires_grad_(True)                                   # a classification head trains in full
    if targets is None:
        targets = sorted({name.rsplit(".", 1)[-1] for name, _ in found})
    body.lora_config = LoRAConfig(int(rank), float(alpha), list(targets) if not isinstance(targets, str) else targets,
                                  None if base is None else os.fspath(base))
    return count_trainable(model)


def merge(model):
    """Fold every adapter into its base weight, W += (alpha/r) A B, and put plain Linears back (in place;
    returns the model). The merged model computes the same function, with no adapter cost."""
    body = _body(model)
    for name, layer in lora_layers(body):
        body.replace(name, layer.merged())
    body.__dict__.pop("lora_config", None)
    return model
