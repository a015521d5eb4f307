"""GPT-2 built from the layers:

    x      = drop(wte[idx] + wpe[0:T])            (B, T, C)
    x      = block_l(x)   for l = 0 .. L-1        (B, T, C)
    logits = ln_f(x) @ wte^T                      (B, T, V)   LM head tied to the token embedding

Parameters carry Hugging Face GPT-2 names and layouts (`transformer.h.0.attn.c_attn.weight` is (C, 3C)).
"""
from __future__ import annotations

import numpy as np

from .config import HF_PREFIX, GPTConfig
from .layers import Block, Dropout, Embedding, LayerNorm, Module, PositionEmbedding, TiedLMHead
from .layers.module import no_grad, spawn_seeds

PREFIX = HF_PREFIX


class GPT(Module):
    weight_format = "fp32"   # "bf16" | "int8" once npgpt.inference.quant.quantize swapped packed modules in
    # Called by backward_hidden with each module whose parameters' gradients are final, in the order
    # the backward finishes them (ln_f, then block L-1 down to the lowest block it runs; wte and wpe
    # are final only when backward returns). Set for one backward by a data-parallel dist
    # (npgpt.distributed.MPIDist.reduce_during_backward), which starts summing those gradients over
    # the processes while the blocks below are still in backward. None: nothing is called.
    grads_ready_hook = None

    def __init__(self, config: GPTConfig, dtype=np.float32, seed=None, init: bool = True):
        """init=False allocates zero weights without drawing random numbers (for loading checkpoints)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"GPT dtype must be float32 or float64, got {dtype}")
        self.config, self.dtype = config, dtype
        C, NH, L, p = config.n_embd, config.n_head, config.n_layer, config.dropout
        rng = np.random.default_rng(seed) if init else None
        seeds = spawn_seeds(seed, L + 1)
        self.wte = Embedding(config.n_vocab, C, dtype=dtype, rng=rng)
        self.wpe = PositionEmbedding(config.n_ctx, C, dtype=dtype, rng=rng)
        self.drop = Dropout(p, seed=seeds[L])
        self.h = [Block(C, NH, dtype=dtype, rng=rng, dropout=p, n_layer=L, seed=seeds[i]) for i in range(L)]
        self.ln_f = LayerNorm(C, dtype=dtype)
        self.lm_head = TiedLMHead(self.wte)

    # ----------------------------------------------------------------- forward / backward
    def forward(self, idx, start_pos: int = 0):
        return self.lm_head(self.forward_hidden(idx, start_pos))  # (B, T, V)

    def forward_hidden(self, idx, start_pos: int = 0):
        """The final hidden states ln_f(x) (B, T, C), for heads other than the LM head."""
        idx = self._check_idx(idx, start_pos)
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(T, start_pos)                # (B, T, C)
        x = self.drop(x)
        for block in self.h:
            x = block(x)                                          # (B, T, C)
        return self.ln_f(x)                                       # (B, T, C)

    def backward(self, dlogits):
        """Adds dL/dparam into every trainable parameter's .grad (call zero_grad() first)."""
        dlogits = np.asarray(dlogits, dtype=self.dtype)
        # logits = ln_f(x) @ wte^T
        dx = self.lm_head.backward(dlogits)                       # (B, T, C); adds into wte.grad
        self.backward_hidden(dx)

    def backward_hidden(self, dhidden):
        """Backward from dL/d(hidden) (B, T, C), hidden = forward_hidden(idx). Stops as soon as nothing
        below needs a gradient: blocks under the lowest trainable one never run, and frozen embeddings
        get no scatter-add."""
        dx = np.asarray(dhidden, dtype=self.dtype)
        embeddings = self.wte.weight.requires_grad or self.wpe.weight.requires_grad
        lowest = 0 if embeddings else next((l for l, b in enumerate(self.h) if b.needs_grad()), len(self.h))
        # hidden = ln_f(x)
        dx = self.ln_f.backward(dx)
        self._grads_ready(self.ln_f)
        # x = block_{L-1}(... block_0(x0)): walk the blocks in reverse, down to the lowest that needs it
        for block in reversed(self.h[lowest:]):
            dx = block.backward(dx)
            self._grads_ready(block)                              # nothing below adds into its gradients
        if not embeddings:
            return
        # x0 = drop(wte[idx] + wpe[0:T])
        dx = self.drop.backward(dx)
        # x = wte[idx] + wpe[0:T]: the sum passes dx to both tables
        self.wpe.backward(dx)
        self.wte.backward(dx)                                     # second contribution to wte.grad

    def _grads_ready(self, module):
        if self.grads_ready_hook is not None:
            self.grads_ready_hook(module)

    def _check_idx(self, idx, start_pos):
        idx = np.asarray(idx)
        if idx.ndim == 1:
            idx = idx[None, :]
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"idx must be an integer array (B, T), got {idx.dtype} {idx.shape}")
        T = idx.shape[1]
        if T == 0 or start_pos + T > self.config.n_ctx:
            raise ValueError(f"sequence length {start_pos + T} must be in [1, n_ctx={self.config.n_ctx}]")
        if idx.size and (idx.min() < 0 or idx.max() >= self.config.n_vocab):
            bad = idx[(idx < 0) | (idx >= self.config.n_vocab)].flat[0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.n_vocab})")
        return idx

    # ----------------------------------------------------------------- parameters by HF name
    def _members(self):
        """As Hugging Face names them: the body under transformer. (transformer.h.0...), the head as
        lm_head (tied to wte, so it adds no parameter unless a different head is swapped in)."""
        for name, value in super()._members():
            yield (name if name == "lm_head" else PREFIX + name), value

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters())

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        """Module.load_state_dict (HF GPT-2 names and layouts), plus the tied head: an lm_head.weight in
        `state` must equal transformer.wte.weight (npgpt cannot load an untied checkpoint)."""
        state = dict(state)
        if "lm_head.weight" not in dict(self.named_parameters()):   # the head is tied to wte
            lm_head, wte = state.pop("lm_head.weight", None), state.get(PREFIX + "wte.weight")
            if lm_head is not None and wte is not None and (np.shape(lm_head) != np.shape(wte) or
                                                            not np.array_equal(lm_head, wte)):
                raise ValueError("load_state_dict: lm_head.weight differs from transformer.wte.weight; npgpt's "
                                 "LM head is tied to the token embedding and cannot load an untied checkpoint")
        return super().load_state_dict(state, strict=strict, assign=assign)

    # ----------------------------------------------------------------- inference with a KV cache
    def forward_cached(self, idx, cache, last_only: bool = True, n_valid=None):
        """Run only the new tokens idx (B, T) through the network, reusing the keys/values in `cache`
        (npgpt.inference.kvcache.KVCache, e.g. KVCache.for_model(model, B)), and append theirs to it.

        Row b's tokens sit at positions cache.lengths[b] .. + T - 1: prefill with the prompt (T tokens),
        then decode one token at a time (T = 1). Inference only: runs under no_grad and eval_mode (no
        dropout even in train mode, nothing kept for backward), through the model's own modules.
        n_valid (B,): row b holds only n_valid[b] real tokens followed by right padding; its cache then
        advances by n_valid[b] and its padding is never attended to. Returns the logits of each row's
        last real position (B, V) when last_only, else those of every position (B, T, V). With
        last_only the last block computes only those positions (its keys and values still go into
        the cache) and the (B*T, V) projection is never computed."""
        idx = self._check_idx(idx, 0)
        B, T = idx.shape
        if cache.batch_size != B or cache.n_layer != len(self.h):
            raise ValueError(f"cache is for batch {cache.batch_size} and {cache.n_layer} layers; "
                             f"got batch {B} for a model with {len(self.h)} layers")
        if n_valid is not None:
            n_valid = np.asarray(n_valid, dtype=np.int64).reshape(B)
            if n_valid.min() < 1 or n_valid.max() > T:
                raise ValueError(f"n_valid must be in [1, T={T}], got {n_valid.tolist()}")
        with no_grad(), self.eval_mode():
            pos = cache.begin(T)                                                   # (B, T)
            x = self.wte(idx) + self.wpe.forward_cached(pos)                       # (B, T, C)
            only_at = None                                                            # the last block: one position a row
            if last_only and T > 1:
                only_at = np.full(B, T - 1) if n_valid is None else n_valid - 1      # (B,) each row's last real position
            for l, block in enumerate(self.h):
                x = block.forward_cached(x, cache.layer(l), only_at if l == len(self.h) - 1 else None)   # (B, T | 1, C)
            cache.advance(n_valid)
            if last_only:
                x = x[:, 0]                                                        # (B, C): the one position left
            return self.lm_head(self.ln_f(x))                                      # (B, V) | (B, T, V)
