"""Perplexity of a text with strided sliding windows, as the Hugging Face perplexity guide runs them.

For N tokens, windows [begin, end) of `context` tokens start at 0, stride, 2 stride, ..., the last one
ending at the text's end (end = min(begin + context, N); none after it). A window scores the tokens

    t = max(prev_end, begin + 1) .. end - 1        (prev_end: the previous window's end, 0 for the first)

so every token is scored once, with the window's tokens before it as its context, and never without
one token of context: at stride = context (the default: no overlap) the first token of each window goes
unscored, as in the guide. The model reads a window's first end - begin - 1 tokens (its last token is
only a target), so a window may hold n_ctx + 1 tokens.

    cross-entropy    NLL / tokens scored                     (nats; NLL = the scored tokens' total)
    perplexity       exp(cross-entropy)
    bits per byte    NLL / ln 2 / bytes      bits per character   NLL / ln 2 / characters
    word perplexity  exp(NLL / words)        words: whitespace-separated, the GPT-2 paper's normalisation

Bytes, characters and words are those of the scored tokens (UTF-8; a character or a word counts with
the token its first byte is in), so every figure divides the same NLL. The guide's own code weighs each
overlapping window's mean loss by one token fewer than it averaged over; npgpt counts exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .score import Request, score


def windows(n: int, context: int, stride: int) -> list:
    """(begin, end, first scored token) of each window over n tokens (see the module docstring)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:                          # a last window of one token has nothing to score
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@dataclass
class PerplexityResult:
    """What the windows scored: the NLL and what it is divided by; the ratios as properties."""
    tokens: int                  # tokens in the text
    scored: int                  # tokens scored
    nll: float                   # their total negative log-likelihood, nats
    context: int
    stride: int
    windows: int                 # windows evaluated (all of them unless limited)
    bytes: int | None = None     # UTF-8 bytes, characters and words of the scored tokens (None: no tokenizer
    chars: int | None = None     # of npgpt's, or ids that are not UTF-8 text)
    words: int | None = None

    @property
    def cross_entropy(self) -> float:
        return self.nll / self.scored

    @property
    def ppl(self) -> float:
        return math.exp(self.cross_entropy)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    @property
    def bits_per_char(self) -> float | None:
        return self.nll / math.log(2) / self.chars if self.chars else None

    @property
    def word_ppl(self) -> float | None:
        return math.exp(self.nll / self.words) if self.words else None

    def to_dict(self) -> dict:
        return {**asdict(self), **{k: getattr(self, k) for k in
                                   ("cross_entropy", "ppl", "bits_per_byte", "bits_per_char", "word_ppl")}}


def check_window(context: int, stride: int, n_ctx: int, flag: str = "") -> None:
    """ValueError unless 2 <= context <= n_ctx + 1 and 1 <= stride <= context (flag: "--" names the CLI's flags)."""
    if not 2 <= context <= n_ctx + 1:
        raise ValueError(f"{flag}context {context} must be in [2, n_ctx + 1 = {n_ctx + 1}] (a window's last token "
                         f"is only a target, so it may hold n_ctx + 1 tokens)")
    if not 1 <= stride <= context:
        raise ValueError(f"{flag}stride {stride} must be in [1, {flag}context {context}]")


def default_tokenizer(tokenizer=None):
    """`tokenizer`, or GPT-2's BPE (npgpt.tokens.tokenizers.GPT2Tokenizer) when None."""
    if tokenizer is None:
        from ..tokens.tokenizers import GPT2Tokenizer
        tokenizer = GPT2Tokenizer()
    return tokenizer


def check_vocab(ids, n_vocab: int) -> None:
    """ValueError naming the first token id outside [0, n_vocab): a tokenizer that is not the model's."""
    bad = (ids < 0) | (ids >= n_vocab)
    if bad.any():
        raise ValueError(f"token id {int(ids[bad][0])} is outside the model's vocabulary [0, {n_vocab}); "
                         f"is the tokenizer the model's?")


def perplexity(model, text_or_ids, context: int | None = None, stride: int | None = None, *, tokenizer=None,
               batch: int = 8, limit: int | None = None, progress: bool = False, dist=None,
               keep: bool = False) -> PerplexityResult:
    """Strided sliding-window perplexity of a text (str, tokenized with `tokenizer`, default GPT-2's BPE) or of
    token ids. context: tokens per window (default the model's n_ctx); stride: default the context; batch:
    windows per forward; limit: only the first windows. With a tokenizer the result also counts the
    scored bytes, characters and words. Under MPI (dist) each rank scores a share of the windows. keep: an
    interrupted evaluation continues (npgpt/eval/resume.py)."""
    if isinstance(text_or_ids, str):
        tokenizer = default_tokenizer(tokenizer)
        ids = np.asarray(tokenizer.encode(text_or_ids), dtype=np.int64)
    else:
        ids = np.asarray(text_or_ids)
    context = model.config.n_ctx if context is None else int(context)
    stride = context if stride is None else int(stride)
    check_window(context, stride, model.config.n_ctx)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"the text has {ids.size} tokens; perplexity needs at least 2")
    check_vocab(ids, model.config.n_vocab)
    plan = windows(len(ids), context, stride)[:limit]
    scores = score(model, [Request(ids[b:e], f - b) for b, e, f in plan], batch, progress, dist, desc="perplexity",
                   keep=keep)
    scored = np.zeros(len(ids), dtype=bool)
    for _, e, f in plan:
        scored[f:e] = True
    nll = float(np.concatenate([s.nll for s in scores]).sum())            # in text order: windows score in order
    units = token_units(ids, tokenizer) if hasattr(tokenizer, "encoding") else None    # npgpt's tokenizers have it
    counts = {} if units is None else {k: int(v[scored].sum()) for k, v in units.items()}
    return PerplexityResult(len(ids), int(scored.sum()), nll, context, stride, len(plan), **counts)


def token_units(ids, tokenizer) -> dict | None:
    """{"bytes", "chars", "words"}: (N,) counts of what each token begins (its UTF-8 bytes; the characters
    and whitespace-separated words whose first byte it holds), or None when the ids' bytes are not UTF-8."""
    enc = tokenizer.encoding
    uniq, inverse = np.unique(ids, return_inverse=True)
    nbytes = np.array([len(enc.decode_single_token_bytes(int(t))) for t in uniq], dtype=np.int64)[inverse]   # (N,)
    raw = enc.decode_bytes([int(t) for t in ids])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    b = np.frombuffer(raw, dtype=np.uint8)
    lead = np.flatnonzero((b & 0xC0) != 0x80)                  # the first byte of each character
    space = np.fromiter((c.isspace() for c in text), dtype=bool, count=len(text))    # (chars,)
    word_start = ~space & np.concatenate([[True], space[:-1]])                       # a non-space after a space
    char_at, word_at = np.zeros(len(b) + 1, dtype=np.int64), np.zeros(len(b) + 1, dtype=np.int64)
    char_at[lead + 1], word_at[lead + 1] = 1, word_start
    ends = np.concatenate([[0], np.cumsum(nbytes)])            # token i holds bytes ends[i] .. ends[i+1] - 1
    return {"bytes": nbytes, "chars": np.diff(np.cumsum(char_at)[ends]), "words": np.diff(np.cumsum(word_at)[ends])}
