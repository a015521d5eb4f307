"""Text generation with a KV cache: prefill the prompt once, then run one new token per step.

    out   = generate(model, idx, max_new_tokens=50, temperature=0.8, top_k=40, seed=0)   # (B, T + new)
    text  = generate_text(model, tokenizer, "Hello", max_new_tokens=50, stop=["\\n\\n"])
    for t in stream_tokens(model, ids, 50): ...                                         # one id at a time
    for piece in stream_text(model, tokenizer, "Hello", 50): print(piece, end="")      # UTF-8 safe

Batches. A (B, T) array is a batch of equal-length prompts. A list of 1-D sequences may hold prompts
of different lengths: they are prefilled together, right-padded, each row at its own positions
0 .. len - 1 (padding comes after a row's real tokens, so causal attention never sees it), and
then every decode step feeds one token per row at that row's own position, attending only to
its own cached keys. Each row thus produces what it would produce alone.

The vocabulary. Only token ids below n_vocab are drawn (default: the model's whole vocabulary); the
text functions pass their tokenizer's size, so a model whose vocabulary is larger than its tokenizer's
(a character vocabulary on a GPT-2 model, a vocabulary padded to a round size) never yields an id
the tokenizer cannot decode. Logits that are not finite (NaN weights) raise FloatingPointError.

End of sequence. A row that samples eos_id stops growing: its later entries are eos_id. Generation
ends when every row has stopped or after max_new_tokens steps.

The context window. The model has n_ctx positions. When a row's cache is full, the window
slides: the cache row is cleared and re-filled with the most recent `keep` tokens (the new one
included), default keep = n_ctx // 2, and decoding goes on from there. Keeping half the window
means the re-prefill (n_ctx / 2 tokens) happens once every n_ctx / 2 steps, so its cost spread
over those steps is about one extra token per step, while the model always sees between n_ctx / 2
and n_ctx tokens of context. (Keeping n_ctx - 1 would re-run the whole window at every step.)
A prompt longer than n_ctx is conditioned on its last n_ctx tokens.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from . import fused
from .kvcache import KVCache
from .sampling import Sampler, TokenHistory

__all__ = ["generate", "generate_text", "stream_tokens", "stream_text", "Decoder", "TextStreamer"]


class Decoder:
    """Incremental decoding state for a batch: the KV cache, each row's tokens so far, and where
    each row's attention window starts.

        dec = Decoder(model, batch_size=B, capacity=max_prompt_len + max_new_tokens)
        logits = dec.prefill(prompts)      # (B, V): next-token logits after each prompt
        logits = dec.step(tokens)          # tokens (B,) -> (B, V), sliding full windows first

    At all times the cache row b holds the tokens tokens[b, start[b]:n[b]], so `logits[b]` equals
    model.forward(tokens[b, start[b]:n[b]])[0, -1].

    compiled: with bf16 or int8 weights, or float32 ones laid out by decode_layout, a decoded token runs
    each block as one compiled call (npgpt/inference/fused.py): the modules' logits up to float32
    rounding. The plan is made at every prefill and holds the model's arrays until the next one; int8
    and bf16 take this path for batches of up to the packed kernels' rows (16, 64), float32 rows up to
    fast.dots_limit(); wider batches run the modules (fused.max_rows).
    False: always through the modules (GPT.forward_cached, the reference)."""

    def __init__(self, model, batch_size: int, capacity: int, keep: int | None = None, compiled: bool = True):
        n_ctx = model.config.n_ctx
        keep = max(1, n_ctx // 2) if keep is None else keep
        if not 1 <= keep <= n_ctx:
            raise ValueError(f"keep must be in [1, n_ctx={n_ctx}], got {keep}")
        B = batch_size
        self.model, self.keep, self.n_ctx = model, keep, n_ctx
        self.cache = KVCache.for_model(model, B)
        self.tokens = np.zeros((B, capacity), dtype=np.int64)  # (B, capacity) each row's tokens, prompt first
        self.n = np.zeros(B, dtype=np.int64)                   # (B,) tokens per row
        self.start = np.zeros(B, dtype=np.int64)               # (B,) first token of each row's window
        self.slides = 0                                        # how many row-windows have slid
        self._modules = list(model.modules())                  # for eval_mode: walked once, not per token
        self.compiled = compiled                               # packed weights: each block one call a token
        self._blocks = None                                    # (fused.plan, made at each prefill)

    def _forward(self, idx, cache, n_valid=None):
        with self.model.eval_mode(self._modules):
            if self._blocks is not None and n_valid is None and idx.shape[1] == 1:
                logits = fused.step(self.model, self._blocks, idx, cache)    # the same values, fewer calls
                if logits is not None:
                    return logits
            return self.model.forward_cached(idx, cache, n_valid=n_valid)

    def prefill(self, prompts: Sequence[np.ndarray]):
        """prompts: B 1-D int arrays (lengths may differ) -> next-token logits (B, V)."""
        lens = np.array([len(p) for p in prompts], dtype=np.int64)    # (B,)
        for b, p in enumerate(prompts):                               # bookkeeping copy, not compute
            self.tokens[b, :len(p)] = p
        self.n[:] = lens
        w = np.minimum(lens, self.n_ctx)                              # (B,) window lengths
        self.start[:] = lens - w
        W = int(w.max())
        cols = self.start[:, None] + np.arange(W)                     # (B, W), right padding past n[b]
        batch = np.take_along_axis(self.tokens, np.minimum(cols, lens[:, None] - 1), axis=1)  # (B, W)
        self.cache.reset()
        self._blocks = fused.plan(self.model) if self.compiled else None     # the model's weights as they are now
        ragged = bool(w.min() != W)
        return self._forward(batch, self.cache, n_valid=w if ragged else None)   # (B, V)

    def step(self, next_tokens):
        """Append next_tokens (B,) to every row and return the logits that follow them (B, V)."""
        next_tokens = np.asarray(next_tokens, dtype=np.int64).reshape(-1)
        full = np.flatnonzero(self.cache.lengths >= self.n_ctx)       # rows with no room for one more
        if full.size:
            self._slide(full)
        B = len(next_tokens)
        self.tokens[np.arange(B), self.n] = next_tokens
        self.n += 1
        return self._forward(next_tokens[:, None], self.cache)             # (B, V)

    def _slide(self, rows):
        """Refill the cache rows `rows` with their last keep - 1 tokens; the token about to be fed
        by step() completes the window of `keep` tokens."""
        k = self.keep - 1
        self.slides += len(rows)
        self.start[rows] = self.n[rows] - k
        if len(rows) == len(self.n):                                  # every row at once (equal lengths)
            views = [(np.arange(len(rows)), self.cache)]
        else:                                                         # rare: one row at a time
            views = [(np.array([b]), self.cache.rows(b)) for b in rows]
        for rs, cache in views:
            cache.reset()
            if k > 0:
                cols = self.n[rs, None] - k + np.arange(k)            # (R, k)
                self._forward(np.take_along_axis(self.tokens[rs], cols, axis=1), cache)


# ----------------------------------------------------------------------------- input checks
def _as_prompts(idx):
    """-> (list of 1-D int64 arrays, True if the input was a list of sequences)."""
    if isinstance(idx, (list, tuple)) and len(idx) and not np.isscalar(idx[0]):
        prompts = [np.asarray(p) for p in idx]
        if any(p.ndim != 1 for p in prompts):
            raise ValueError("a list of prompts must hold 1-D token sequences")
        as_list = True
    else:
        a = np.asarray(idx)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise ValueError(f"idx must be (B, T) or (T,) token ids, or a list of 1-D sequences; got shape {a.shape}")
        prompts = list(a)
        as_list = False
    if not prompts:
        raise ValueError("no prompts given")
    for p in prompts:
        if p.size == 0:
            raise ValueError("a prompt is empty: give at least one token (e.g. <|endoftext|>)")
        if not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {p.dtype}")
    return [p.astype(np.int64) for p in prompts], as_list


def check_token_ids(ids, n_vocab: int) -> None:
    """Raise ValueError naming the first token id outside [0, n_vocab)."""
    ids = np.asarray(ids).reshape(-1)
    bad = ids[(ids < 0) | (ids >= n_vocab)]
    if bad.size:
        raise ValueError(f"prompt token id {int(bad[0])} is outside the model's vocabulary of {n_vocab} tokens "
                         f"(ids 0..{n_vocab - 1})")


def _check_steps(max_new_tokens) -> int:
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens}")
    return int(max_new_tokens)


# ----------------------------------------------------------------------------- the decoding loop
def _drawable(logits, model, step: int, n_vocab: int):
    """The first n_vocab logits of each row (B, n_vocab); FloatingPointError when any is not finite."""
    logits = logits[:, :n_vocab]
    if not np.isfinite(logits).all():
        from ..layers.module import first_non_finite
        arrays = [(name, p.data) for name, p in model.named_parameters()]
        arrays += [(f"{name}.weight", m.packed) for name, m in model.named_modules()
                   if getattr(m, "kind", None) == "fp32"]              # decode_layout's float32 rows
        bad = first_non_finite(arrays)
        why = (f"its parameter {bad} holds NaN or infinite values" if bad is not None else
               "an activation overflowed, or its packed weights hold NaN or infinite values")
        raise FloatingPointError(f"the model's next-token logits are not finite (NaN or inf) at new token "
                                 f"{step + 1}: {why}")
    return logits


def _steps(model, prompts, max_new_tokens, sampler: Sampler, eos_id=None, keep=None,
           n_vocab=None) -> Iterator[np.ndarray]:
    """Yield the next token of every row (B,) at each step, each below n_vocab (default: the model's
    vocabulary); rows that finished yield eos_id."""
    B, V = len(prompts), model.config.n_vocab
    for p in prompts:
        check_token_ids(p, V)
    if max_new_tokens == 0:
        return
    Vd = V if n_vocab is None else min(V, int(n_vocab))                    # ids that may be drawn: 0 .. Vd - 1
    dec = Decoder(model, B, max(len(p) for p in prompts) + max_new_tokens, keep=keep)
    logits = _drawable(dec.prefill(prompts), model, 0, Vd)                 # (B, Vd)
    history = TokenHistory(prompts, Vd) if sampler.penalised else None     # what the penalties look at
    finished = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        tok = sampler(logits, *((history.seen, history.counts) if history else ()))   # (B,)
        if eos_id is not None:
            tok = np.where(finished, eos_id, tok)
            finished |= tok == eos_id
        yield tok
        if finished.all() or step == max_new_tokens - 1:
            return
        if history is not None:
            history.add(tok)
        logits = _drawable(dec.step(tok), model, step + 1, Vd)             # (B, Vd)


def generate(model, idx, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None, seed=None,
             eos_id=None, repetition_penalty=None, keep=None, n_vocab=None, sampler=None):
    """Continue each prompt by up to max_new_tokens tokens.

    idx: (B, T) or (T,) int token ids -> returns an int64 array (B, T + n_new); or a list of 1-D
    sequences (lengths may differ) -> returns a list of 1-D arrays (len(prompt_b) + n_new).
    temperature 0 is greedy; top_k, top_p, repetition_penalty: see npgpt.inference.sampling; seed makes
    sampling reproducible. A row that samples eos_id stops and is padded with eos_id; n_new is
    max_new_tokens unless every row stopped earlier. keep: tokens kept when the window slides
    (default n_ctx // 2; see the module docstring). n_vocab: draw only ids below it (a tokenizer's size;
    default the model's vocabulary). sampler: a Sampler to draw with instead of the settings temperature
    .. seed (for its min_p, presence and frequency penalties and logprobs)."""
    max_new_tokens = _check_steps(max_new_tokens)
    prompts, as_list = _as_prompts(idx)
    sampler = sampler or Sampler(temperature, top_k, top_p, repetition_penalty, seed)
    steps = list(_steps(model, prompts, max_new_tokens, sampler, eos_id, keep, n_vocab))
    new = np.stack(steps, axis=1) if steps else np.zeros((len(prompts), 0), dtype=np.int64)   # (B, n_new)
    if as_list:
        return [np.concatenate([p, row]) for p, row in zip(prompts, new)]
    return np.concatenate([np.stack(prompts), new], axis=1)                                # (B, T + n_new)


def stream_tokens(model, idx, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None, seed=None,
                  eos_id=None, repetition_penalty=None, keep=None, n_vocab=None, sampler=None) -> Iterator[int]:
    """Yield the new token ids of one prompt (T,) or (1, T) one at a time, as they are decoded;
    stops after max_new_tokens or after yielding eos_id. Same tokens as generate() with the same seed
    (and n_vocab). sampler: as in generate (its .last holds each token's logprobs when it records them)."""
    max_new_tokens = _check_steps(max_new_tokens)
    prompts, _ = _as_prompts(idx)
    if len(prompts) != 1:
        raise ValueError(f"stream_tokens takes one prompt, got {len(prompts)}")
    sampler = sampler or Sampler(temperature, top_k, top_p, repetition_penalty, seed)
    for tok in _steps(model, prompts, max_new_tokens, sampler, eos_id, keep, n_vocab):
        yield int(tok[0])


# ----------------------------------------------------------------------------- text
class TextStreamer:
    """Token ids -> text pieces, never splitting a UTF-8 character (npgpt.tokens.bpe.StreamDecoder) and
    holding back any tail that could be the start of a stop string.

        ts = TextStreamer(tokenizer, stop=["\\n\\n"])
        for t in ids:
            print(ts.push(t), end="")
            if ts.stopped: break
        print(ts.finish())

    Text from a stop string on is dropped (the stop string itself is not emitted)."""

    def __init__(self, tokenizer, stop: Sequence[str] | str | None = None):
        from ..tokens.bpe import StreamDecoder
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.pending = ""          # decoded text not emitted yet
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """Whatever is still held back (call once generation has ended)."""
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self.pending
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)]
        hold = 0 if final else self._tail_len(text)
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold]

    def _tail_len(self, text: str) -> int:
        """Length of the longest end of text that is the beginning of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def encode_prompt(model, tokenizer, prompt: str) -> list:
    """Token ids of prompt; an empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_token]
    V = model.config.n_vocab
    if not prompt and ids[0] >= V:
        raise ValueError(f"empty prompt: it would start from <|endoftext|> (id {ids[0]}), which is outside the "
                         f"model's vocabulary of {V} tokens")
    check_token_ids(ids, V)
    return ids


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0, top_k=None,
                top_p=None, seed=None, repetition_penalty=None, stop=None, stop_at_eos: bool = True,
                keep=None, sampler=None) -> Iterator[str]:
    """Yield the continuation of prompt as text pieces, as it is decoded (the prompt is not repeated).
    Stops at <|endoftext|> (unless stop_at_eos=False), at the first stop string (not emitted), or
    after max_new_tokens tokens. Only ids the tokenizer holds are drawn. sampler: as in generate."""
    ids = encode_prompt(model, tokenizer, prompt)
    eos_id = tokenizer.eot_token if stop_at_eos else None
    ts = TextStreamer(tokenizer, stop)
    for t in stream_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                           repetition_penalty, keep, tokenizer.n_vocab, sampler):
        if t == eos_id:
            break
        piece = ts.push(t)
        if piece:
            yield piece
        if ts.stopped:
            return
    piece = ts.finish()
    if piece:
        yield piece


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
                  top_k=None, top_p=None, seed=None, repetition_penalty=None, stop=None, stop_at_eos: bool = True,
                  keep=None, sampler=None) -> str:
    """The continuation of prompt as one string (the prompt is not included); see stream_text."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                               repetition_penalty, stop, stop_at_eos, keep, sampler))
