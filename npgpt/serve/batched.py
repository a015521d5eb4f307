"""One decoding step for any subset of a KV cache's rows, batch-invariant: the logits of a row are
the same bits whichever other rows share the step (npgpt serve's continuous batching relies on it).

    step = BatchedStep(model)
    logits = step.prefill(cache, row, prompt_ids)            # (V,): one sequence into cache row `row`
    logits = step(cache, rows, tokens)                       # rows (A,), tokens (A,) -> (A, V)

prefill is GPT.forward_cached on the one-row view cache.rows(row): exactly what `npgpt generate`
runs for that prompt. A step then feeds one token to each of the rows `rows`, at that row's own
position, and advances only those rows. Two ways, both batch-invariant by construction:

  - "kernels" (the Numba backend): GPT-2's block written out once more for one new position a row,
    every product and the attention through npgpt/serve/kernels.py (each weight read once per step
    for all rows, each row's sums in an order fixed by the layer's shape), and every LayerNorm and
    GELU run on one row at a time through the model's own modules. Dropout is skipped: inference.
  - "rows" (the NumPy backend, and any model this path does not know): GPT.forward_cached on each
    row's own view, one row after another, which is `npgpt generate`'s own decoding step; each
    weight is read once per row.

The kernels path differs from the rows path only by rounding (tested to a tolerance), and costs
what docs/performance.md measures against an ordinary (not batch-invariant) batched step.
"""
from __future__ import annotations

import numpy as np

from .. import fast
from ..inference.quant import QuantEmbedding, QuantLinear, QuantTiedLMHead
from ..layers.embedding import Embedding, TiedLMHead
from ..layers.linear import Linear
from ..layers.module import no_grad


def _kernels_fit(model) -> bool:
    """Whether every module the kernels path computes is one it knows (plain or packed GPT-2)."""
    linears = [m for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    return (all(type(m) in (Linear, QuantLinear) for m in linears)
            and type(model.wte) in (Embedding, QuantEmbedding)
            and type(model.lm_head) in (TiedLMHead, QuantTiedLMHead))


def _linear(m, x):
    """A Linear or QuantLinear on rows x (A, in) -> (A, out), batch-invariant."""
    from .kernels import in_out_matmul, out_in_matmul
    if isinstance(m, QuantLinear):
        return out_in_matmul(x, m.packed, m.scale, m.bias.data)
    return in_out_matmul(x, m.weight.data, m.bias.data)


def _per_row(module, x):
    """module on each row of x (A, n) alone, as a (1, n) array: its arithmetic never sees another row."""
    return np.concatenate([module(x[a:a + 1]) for a in range(len(x))])


class BatchedStep:
    """prefill(cache, row, ids) and step(cache, rows, tokens) for one model (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        self.mode = "kernels" if fast.use_numba() and _kernels_fit(model) else "rows"
        self._modules = list(model.modules())

    def prefill(self, cache, row: int, ids, all_positions: bool = False):
        """Clear cache row `row` and run ids (T,) into it -> the next-token logits (V,), or with
        all_positions the logits after every position (T, V)."""
        view = cache.rows(row)
        view.reset()
        ids = np.asarray(ids, dtype=np.int64)[None]                          # (1, T)
        with self.model.eval_mode(self._modules):
            return self.model.forward_cached(ids, view, last_only=not all_positions)[0]

    def __call__(self, cache, rows, tokens):
        """Feed tokens[a] to cache row rows[a] for every a -> logits (A, V); those rows advance by one."""
        rows = np.asarray(rows, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(np.unique(rows)) != len(rows):
            raise ValueError(f"a step feeds each cache row once, got rows {rows.tolist()}")
        if (cache.lengths[rows] >= cache.n_ctx).any():
            raise ValueError("a row's cache is full (n_ctx positions): no room for one more token")
        with self.model.eval_mode(self._modules):
            if self.mode == "rows":
                return np.concatenate([self.model.forward_cached(tokens[a:a + 1, None], cache.rows(int(r)))
                                       for a, r in enumerate(rows)])
            with no_grad():
                return self._kernels_step(cache, rows, tokens)

    def _kernels_step(self, cache, rows, tokens):
        from .kernels import attend_rows, out_in_matmul
        model = self.model
        A, pos = len(rows), cache.lengths[rows]                                # pos (A,): where each new token goes
        NH = model.config.n_head
        x = model.wte(tokens[:, None])[:, 0] + model.wpe.weight.data[pos]     # (A, C)
        C = x.shape[1]
        for l, block in enumerate(model.h):
            h = _per_row(block.ln_1, x)                                        # (A, C)
            q, k, v = _linear(block.attn.c_attn, h).reshape(A, 3, NH, C // NH).transpose(1, 0, 2, 3)  # (A, NH, hs) each
            cache.k[l][rows, :, pos] = k
            cache.v[l][rows, :, pos] = v
            y = attend_rows(q, cache.k[l], cache.v[l], rows, pos + 1)         # (A, NH, hs)
            x = x + _linear(block.attn.c_proj, y.reshape(A, C))
            h = _per_row(block.mlp.gelu, _linear(block.mlp.c_fc, _per_row(block.ln_2, x)))   # (A, 4C)
            x = x + _linear(block.mlp.c_proj, h)
        x = _per_row(model.ln_f, x)                                            # (A, C)
        head = model.lm_head
        logits = (out_in_matmul(x, head.packed, head.scale) if isinstance(head, QuantTiedLMHead)
                  else out_in_matmul(x, head.weight.data))                     # (A, V)
        cache.lengths[rows] += 1
        return logits
