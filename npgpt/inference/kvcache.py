"""KVCache: every layer's keys and values of the positions seen so far, for incremental decoding.

Each layer l owns two buffers k[l], v[l] of shape (B, NH, n_ctx, hs), allocated once in the
model's dtype, and row b of the batch holds `lengths[b]` valid positions. A forward pass over
T new tokens (GPT.forward_cached) then

    - runs only those T tokens through the network, at positions lengths[b] .. lengths[b] + T - 1,
    - writes their keys and values into the buffers right after the cached ones,
    - lets query t of row b attend to the keys 0 .. lengths[b] + t of that row,
    - and advances lengths by T (or by n_valid[b] when the rows were right-padded).

Rows may hold different lengths ("ragged"), e.g. after a batch of prompts of different lengths
was prefilled with right padding. When all rows hold the same length the causal offset of the
attention kernel alone does the masking; otherwise an additive mask (-inf on the keys a row
must not see) is built once per forward pass and shared by all layers. When only one position a
row is wanted (the last block of GPT.forward_cached with last_only), that block's one query a row
gets its own (B, 1, 1, Tk) mask from LayerKV.store(only_at=).
"""
from __future__ import annotations

import numpy as np


def additive_mask(hidden, dtype):
    """-inf where `hidden` (a boolean array), 0 elsewhere: added to attention scores before the softmax."""
    return np.where(hidden, -np.inf, 0.0).astype(dtype)


class KVCache:
    def __init__(self, n_layer: int, B: int, NH: int, n_ctx: int, hs: int, dtype=np.float32):
        dtype = np.dtype(dtype)
        self.k = [np.zeros((B, NH, n_ctx, hs), dtype=dtype) for _ in range(n_layer)]   # (B, NH, n_ctx, hs)
        self.v = [np.zeros((B, NH, n_ctx, hs), dtype=dtype) for _ in range(n_layer)]   # (B, NH, n_ctx, hs)
        self.lengths = np.zeros(B, dtype=np.int64)   # (B,) valid positions per row
        self._step = None                            # set by begin(): where the T new positions go

    @classmethod
    def for_model(cls, model, batch_size: int = 1) -> "KVCache":
        c = model.config
        return cls(c.n_layer, batch_size, c.n_head, c.n_ctx, c.n_embd // c.n_head, dtype=model.dtype)

    # ----------------------------------------------------------------- shape and state
    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def n_ctx(self) -> int:
        return self.k[0].shape[2]

    @property
    def n_layer(self) -> int:
        return len(self.k)

    @property
    def dtype(self):
        return self.k[0].dtype

    @property
    def ragged(self) -> bool:
        return bool(self.lengths.size) and self.lengths.min() != self.lengths.max()

    @property
    def length(self) -> int:
        """The number of cached positions, when every row holds the same number."""
        if self.ragged:
            raise ValueError(f"the cache's rows hold different lengths {self.lengths.tolist()}; use .lengths")
        return int(self.lengths[0]) if self.lengths.size else 0

    def reset(self) -> "KVCache":
        """Forget every position (the buffers are reused; stale entries are never read)."""
        self.lengths[...] = 0
        self._step = None
        return self

    def rows(self, start: int, stop: int | None = None) -> "KVCache":
        """A cache over rows start..stop-1 that shares this one's memory (buffers and lengths), e.g. to
        re-prefill a single row of a batch: writes through the view land in this cache."""
        stop = start + 1 if stop is None else stop
        view = object.__new__(KVCache)
        view.k = [a[start:stop] for a in self.k]
        view.v = [a[start:stop] for a in self.v]
        view.lengths = self.lengths[start:stop]     # a view: advancing it advances this cache
        view._step = None
        return view

    # ----------------------------------------------------------------- one forward pass
    def begin(self, T: int) -> np.ndarray:
        """Prepare to store T new positions per row; returns their positions (B, T) (for wpe).

        Called once per forward pass, before the layers run; layer(l).store() then uses it."""
        if T < 1:
            raise ValueError(f"need at least one new token, got T={T}")
        if self.lengths.max() + T > self.n_ctx:
            raise ValueError(f"the cache holds {int(self.lengths.max())} positions and n_ctx={self.n_ctx}: "
                             f"no room for {T} more (slide the window first)")
        start = self.lengths                                           # (B,)
        pos = start[:, None] + np.arange(T)                            # (B, T) absolute positions
        Tk = int(start.max()) + T                                      # keys attended to (incl. the new ones)
        if self.ragged:
            # query t of row b sees keys j <= start[b] + t; the kernel's own causal mask (j <= t + Tk - T)
            # is looser, so add -inf on the keys in between (stale or other rows' positions)
            keys = np.arange(Tk)
            hidden = keys[None, None, :] > pos[:, :, None]              # (B, T, Tk)
            mask = additive_mask(hidden, self.dtype)[:, None]            # (B, 1, T, Tk)
        else:
            mask = None
        self._step = (pos, Tk, mask)
        return pos

    def advance(self, n_valid=None) -> None:
        """Finish the forward pass: each row now holds n_valid[b] (default all T) more positions."""
        pos, _, _ = self._step
        T = pos.shape[1]
        self.lengths += T if n_valid is None else np.asarray(n_valid, dtype=np.int64)
        self._step = None

    def layer(self, l: int) -> "LayerKV":
        return LayerKV(self, l)


class LayerKV:
    """One layer's share of a KVCache, handed to CausalSelfAttention.forward_cached."""

    __slots__ = ("cache", "k", "v")

    def __init__(self, cache: KVCache, l: int):
        self.cache, self.k, self.v = cache, cache.k[l], cache.v[l]     # (B, NH, n_ctx, hs) each

    def empty(self) -> bool:
        """True when every row of the cache holds no position yet (a prompt's first forward pass)."""
        return not self.cache.lengths.any()

    def buffers(self, dtype):
        """The (k, v) buffers (B, NH, n_ctx, hs) themselves, for a kernel that writes a prompt's keys and
        values at positions 0 .. T-1 as it goes (flash_attention_forward(kv_out=)); None unless the cache
        is empty() and its buffers are C-contiguous in `dtype` (then store() is the way in)."""
        ok = self.empty() and all(a.dtype == dtype and a.flags.c_contiguous for a in (self.k, self.v))
        return (self.k, self.v) if ok else None

    def decode_slots(self, dtype):
        """(k, v, pos) for a kernel that appends one new token a row itself (npgpt.fast.decode_attention):
        the buffers (B, NH, n_ctx, hs) and where row b's token goes, pos (B,); None unless this forward
        pass is over T = 1 and the buffers are C-contiguous in `dtype` (then store() is the way in)."""
        pos = self.cache._step[0]
        ok = pos.shape[1] == 1 and all(a.dtype == dtype and a.flags.c_contiguous for a in (self.k, self.v))
        return (self.k, self.v, pos[:, 0]) if ok else None

    def store(self, k, v, only_at=None):
        """Write the new keys/values k, v (B, NH, T, hs) after each row's cached positions.

        Returns (keys, values, mask): all keys and values to attend to (B, NH, Tk, hs), views into
        the buffers, and the additive mask (B, 1, T, Tk) or None when the kernel's causal offset
        Tk - T is exact (all rows hold the same length). only_at (B,): only query only_at[b] of row b
        will attend (the one position whose output is needed); the mask is then (B, 1, 1, Tk),
        hiding the keys past that query's own position, or None when there are none."""
        pos, Tk, mask = self.cache._step
        T = pos.shape[1]
        if mask is None:
            P = Tk - T                                                 # every row's cached length
            self.k[:, :, P:Tk] = k
            self.v[:, :, P:Tk] = v
        else:
            rows = np.arange(pos.shape[0])[:, None]                    # (B, 1)
            # advanced indices on axes 0 and 2 -> the indexed view is (B, T, NH, hs)
            self.k[rows, :, pos] = k.transpose(0, 2, 1, 3)
            self.v[rows, :, pos] = v.transpose(0, 2, 1, 3)
        if only_at is not None:
            at = pos[np.arange(pos.shape[0]), only_at]                    # (B,) the kept queries' positions
            hidden = np.arange(Tk)[None, :] > at[:, None]              # (B, Tk) keys after them
            mask = additive_mask(hidden, self.k.dtype)[:, None, None] if hidden.any() else None   # (B, 1, 1, Tk)
        return self.k[:, :, :Tk], self.v[:, :, :Tk], mask
