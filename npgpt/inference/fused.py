"""A decoding step of a packed-weight model (bf16, int8, or float32 rows) with one compiled call per block.

GPT.forward_cached (npgpt/model.py) runs a decoded token through the model's own modules: a dozen Python
calls a block (LayerNorms, Linears and their wrappers, attention, GELU, residual adds), each with its
checks and temporaries. That is the reference. With bf16 or int8 weights, or float32 ones laid out as rows
by decode_layout (npgpt/inference/quant.py), and the Numba backend, `step(model, blocks, idx, cache)` runs
the same token with each block as one call of npgpt.fast.decode.decode_block, which runs the same kernels'
code in the same order: the same logits up to float32 rounding (tests/test_fused_decode.py, token for
token). The embeddings and the head stay the model's. The call's arguments other than x, the caches and the
positions are prepared once, in the plan (block_constants; run_block makes the call with them).

    blocks = plan(model)                   # None unless every block is a plain packed one
    logits = step(model, blocks, idx, cache)   # idx (B, 1) -> (B, V), as model.forward_cached(idx, cache)
"""
from __future__ import annotations

import numpy as np

from .. import fast
from ..layers.attention import CausalSelfAttention
from ..layers.block import Block
from ..layers.dropout import Dropout
from ..layers.gelu import GELU
from ..layers.layernorm import LayerNorm
from ..layers.mlp import MLP
from ..layers.module import no_grad
from ..model import GPT
from .quant import QuantLinear, packed_max_rows


def _linear(m):
    return (m.packed, m.scale, m.bias.data) if type(m) is QuantLinear else None


def plan(model):
    """Per block, decode_block's weights ((ln_1), (ln_2), eps, c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj,
    attention scale) and the block call's arguments made of them (npgpt.fast.decode.block_constants: the
    kernels' choices too, as they are when the plan is made), or None where the step cannot be fused:
    another backend, a model or module of another class (a subclass, LoRA, float32 Linears not laid out
    by decode_layout, a swapped GELU or Dropout), a different eps, dtype or memory order somewhere. The
    plan holds the model's arrays as they are now: Decoder makes one at every prefill."""
    if not fast.use_numba() or type(model) is not GPT:
        return None
    out = []
    for block in model.h:
        if not (type(block) is Block and type(block.ln_1) is LayerNorm and type(block.ln_2) is LayerNorm
                and type(block.attn) is CausalSelfAttention and type(block.mlp) is MLP and type(block.mlp.gelu) is GELU
                and all(type(d) is Dropout for d in (block.attn.attn_dropout, block.attn.resid_dropout, block.mlp.dropout))):
            return None
        ln_1, ln_2, attn, mlp = block.ln_1, block.ln_2, block.attn, block.mlp
        weights = [_linear(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)]
        if any(w is None for w in weights) or len({w[0].dtype for w in weights}) != 1 or ln_1.eps != ln_2.eps:
            return None
        arrays = [ln_1.weight.data, ln_1.bias.data, ln_2.weight.data, ln_2.bias.data] + [a for w in weights for a in w
                                                                                         if a is not None]
        if any(a.dtype != np.float32 for a in arrays if a.dtype.kind == "f") or \
                not all(a.flags.c_contiguous for a in arrays):
            return None
        block = ((ln_1.weight.data, ln_1.bias.data), (ln_2.weight.data, ln_2.bias.data), ln_1.eps, *weights,
                 1.0 / np.sqrt(attn.hs))
        out.append((*block, fast.block_constants(*block)))    # the call's other arguments, prepared once
    return out


def max_rows(packed) -> int:
    """The widest batch step() takes for weights like `packed`: the packed kernels' rows (float32 rows:
    fast.dots_limit()); wider batches run the modules (their products unpack the weights for BLAS).

    int8 took at most 3 rows here until its products stopped calling a Numba function per weight row
    (npgpt/fast/_q8.py, _tail): with it, four rows of x at a time (q8_dot4) compiled into decode_block ran
    slower than in the product's own kernel. GPT-2 124M on the Zen 4 since, modules / compiled blocks, 6
    alternated pairs of 32 tokens: B=1 1.049x, B=2 1.090x, B=4 1.121x, B=8 1.121x, B=16 1.064x
    (examples/bench_fused_decode.py)."""
    return packed_max_rows(packed)


def step(model, blocks, idx, cache):
    """model.forward_cached(idx, cache) for idx (B, 1), each block one call. None, with nothing done (the
    caller then runs the model), where it cannot: another backend now, more than one token a row, more
    rows than max_rows, a cache for another batch or depth, or a cache that is not float32 C-contiguous."""
    B, T = idx.shape
    if not fast.use_numba() or T != 1 or B > max_rows(blocks[0][3][0]) or cache.batch_size != B or \
            cache.n_layer != len(blocks):
        return None
    if cache.dtype != np.float32 or not all(a.flags.c_contiguous for a in cache.k + cache.v):
        return None
    idx = model._check_idx(idx, 0)
    with no_grad():
        pos = cache.begin(1)                                                   # (B, 1)
        x = np.ascontiguousarray((model.wte(idx) + model.wpe.forward_cached(pos))[:, 0], dtype=np.float32)  # (B, C)
        where = np.ascontiguousarray(pos[:, 0], dtype=np.int64)               # (B,) each row's new position
        for l, block in enumerate(blocks):                # fast.decode_block, its constants prepared by plan
            fast.run_block(x, block[-1], cache.k[l], cache.v[l], where)
        cache.advance()
        return model.lm_head(model.ln_f(x))                                   # (B, V)
