"""Choosing the next token from a batch of logits (B, V), all rows at once.

The logits pass through these steps, in this order (the order Hugging Face uses, with OpenAI's
penalties after CTRL's):

    1. repetition penalty   (CTRL; transformers' RepetitionPenaltyLogitsProcessor): for every token
                            already in the row (prompt included), a positive logit is divided by the
                            penalty and a negative one multiplied by it
    2. presence, frequency  (OpenAI): logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty,
                            c[j] = how often token j was generated so far (the prompt does not count)
    3. temperature          logits / temperature; temperature 0 means greedy: argmax of the logits
                            after steps 1-2, no randomness (steps 4-6 never change the argmax)
    4. top-k                keep the k largest logits (ties with the k-th are kept too)
    5. top-p (nucleus)      keep the smallest set of most probable tokens whose probability mass
                            reaches p (always at least one token), renormalise
    6. min-p                keep the tokens whose probability is at least min_p times the most
                            probable one's (transformers' MinPLogitsWarper), renormalise
    7. draw                 one token per row by inverse-CDF sampling with np.random.Generator

A Sampler owns its generator, np.random.default_rng(seed), so a seed reproduces a run exactly; the
i-th of n samples of one prompt draws with sample_seed(seed, i) (the first with seed itself).
With logprobs=N it also records, at each draw, the model's log-probabilities (log-softmax of the
logits it was given, before any step above) of the chosen token and of the N most likely ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# a probability mass within this of p counts as reaching p (the sums below are float64)
TOP_P_TOLERANCE = 1e-9


def softmax(logits, axis: int = -1):
    """float64 softmax (-inf logits get probability 0)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(logits, axis: int = -1):
    """float64 log-probabilities of logits (-inf logits get -inf)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL's repetition penalty on logits (B, V) for the tokens marked in seen (B, V) bool;
    returns a new array: seen positive logits / penalty, seen negative logits * penalty."""
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty}")
    logits = np.array(logits, dtype=np.float64)
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def apply_presence_frequency(logits, counts, presence: float = 0.0, frequency: float = 0.0):
    """OpenAI's penalties on logits (B, V) given counts (B, V), how often each token was generated so
    far: logits - counts * frequency - (counts > 0) * presence, as a new float64 array."""
    counts = np.asarray(counts)
    return np.asarray(logits, dtype=np.float64) - counts * frequency - (counts > 0) * presence


def top_k_filter(logits, k: int):
    """Set every logit below the k-th largest of its row to -inf (B, V) -> (B, V)."""
    logits = np.array(logits, dtype=np.float64)
    V = logits.shape[-1]
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= V:
        return logits
    kth = np.partition(logits, V - k, axis=-1)[..., V - k: V - k + 1]  # (B, 1) the k-th largest
    logits[logits < kth] = -np.inf
    return logits


def top_p_filter(probs, p: float):
    """Nucleus filtering of probabilities (B, V): per row, keep the smallest set of most probable
    tokens whose mass reaches p (at least one token), zero the rest and renormalise."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=-1, kind="stable")                 # (B, V) most probable first
    sorted_p = np.take_along_axis(probs, order, axis=-1)               # (B, V)
    mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p              # (B, V) mass of the better tokens
    keep_sorted = mass_before < p - TOP_P_TOLERANCE                    # (B, V)
    keep_sorted[..., 0] = True                                         # the most probable token, always (tiny p)
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)               # back to token order
    out = np.where(keep, probs, 0.0)
    return out / out.sum(axis=-1, keepdims=True)


def min_p_filter(probs, min_p: float):
    """Per row of probabilities (B, V): zero every token less probable than min_p times the row's most
    probable one (which always stays), renormalise."""
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    probs = np.asarray(probs, dtype=np.float64)
    out = np.where(probs >= min_p * probs.max(axis=-1, keepdims=True), probs, 0.0)   # (B, V)
    return out / out.sum(axis=-1, keepdims=True)


def sample_from_probs(probs, rng: np.random.Generator):
    """One token id per row of probs (B, V) (rows sum to 1, zeros are never drawn) -> (B,) int64.
    ValueError for NaN or infinite probabilities, negative ones, or a row with no mass."""
    probs = np.asarray(probs, dtype=np.float64)
    if not np.isfinite(probs).all():
        raise ValueError("sample_from_probs: the probabilities are not all finite (NaN or inf: NaN or inf "
                         "logits, or an overflow upstream)")
    if (probs < 0).any() or not (probs.sum(axis=-1) > 0).all():
        raise ValueError("sample_from_probs: every row needs non-negative probabilities with a positive sum")
    cdf = np.cumsum(probs, axis=-1)                                    # (B, V)
    u = rng.random(probs.shape[0]) * cdf[:, -1]                        # (B,) uniform in [0, total)
    idx = (cdf <= u[:, None]).sum(axis=-1)                             # first token whose cdf exceeds u
    last_nonzero = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(idx, last_nonzero).astype(np.int64)             # guards u rounding up to the total


def sample_seed(seed, i: int):
    """The seed of the i-th of n samples of one prompt: seed itself for the first, so one sample equals
    a plain seeded run; None (fresh entropy) stays None."""
    return seed if seed is None or i == 0 else [seed, i]


@dataclass
class TopLogprobs:
    """Log-probabilities at one draw: the chosen tokens' (B,) and the N most likely tokens (B, N), best first."""
    chosen: np.ndarray       # (B,) float64
    ids: np.ndarray          # (B, N) int64
    values: np.ndarray       # (B, N) float64


def top_logprobs(logits, tokens, n: int) -> TopLogprobs:
    """The log-probabilities of logits (B, V): of tokens (B,) and of the n most likely tokens per row."""
    lp = log_softmax(logits)                                               # (B, V)
    B, V = lp.shape
    n = min(int(n), V)
    ids = np.argpartition(-lp, n - 1, axis=-1)[:, :n] if n else np.zeros((B, 0), np.int64)   # (B, n) unordered
    order = np.argsort(-np.take_along_axis(lp, ids, axis=-1), axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=-1).astype(np.int64)         # (B, n) best first
    return TopLogprobs(lp[np.arange(B), tokens], ids, np.take_along_axis(lp, ids, axis=-1))


class TokenHistory:
    """What the penalties look at, per row: seen (B, V) bool, every token so far (prompt included; the
    repetition penalty), and counts (B, V), how often each token was generated (presence/frequency)."""

    def __init__(self, prompts, n_vocab: int):
        self.seen = np.zeros((len(prompts), n_vocab), dtype=bool)             # (B, V)
        self.counts = np.zeros((len(prompts), n_vocab), dtype=np.int32)      # (B, V)
        for b, p in enumerate(prompts):
            p = np.asarray(p)
            self.seen[b, p[p < n_vocab]] = True

    def add(self, tokens) -> None:
        """Record one generated token per row (B,)."""
        rows = np.arange(len(self.seen))
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1


class Sampler:
    """next_tokens = Sampler(temperature=0.8, top_k=40, seed=0)(logits, seen, counts)   logits (B, V) -> (B,)"""

    def __init__(self, temperature: float = 0.0, top_k=None, top_p=None, repetition_penalty=None, seed=None,
                 min_p=None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logprobs=None):
        if temperature is None or not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and not (math.isfinite(top_k) and int(top_k) == top_k and top_k >= 1):
            raise ValueError(f"top_k must be a positive int, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:          # also rejects nan
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
        if min_p is not None and not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if logprobs is not None and not (isinstance(logprobs, (int, np.integer)) and logprobs >= 0):
            raise ValueError(f"logprobs must be an int >= 0, got {logprobs}")
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), top_k, top_p, min_p
        self.repetition_penalty = repetition_penalty
        self.presence_penalty, self.frequency_penalty = float(presence_penalty), float(frequency_penalty)
        self.logprobs = logprobs
        self.last = None                 # TopLogprobs of the latest draw, when logprobs is set
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether steps 1-2 change anything (so a caller must keep a TokenHistory)."""
        return (self.repetition_penalty not in (None, 1.0) or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def probs(self, logits, seen=None, counts=None):
        """The distribution tokens are drawn from (B, V), after every filter (not used when greedy)."""
        logits = self.adjust(logits, seen, counts) / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, int(self.top_k))
        probs = softmax(logits)
        if self.top_p is not None and self.top_p < 1.0:
            probs = top_p_filter(probs, self.top_p)
        if self.min_p:
            probs = min_p_filter(probs, self.min_p)
        return probs

    def adjust(self, logits, seen=None, counts=None):
        """Steps 1-2: the repetition penalty (given seen), presence and frequency (given counts) -> float64 (B, V)."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0 and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if (self.presence_penalty or self.frequency_penalty) and counts is not None:
            logits = apply_presence_frequency(logits, counts, self.presence_penalty, self.frequency_penalty)
        return logits

    def __call__(self, logits, seen=None, counts=None):
        """logits (B, V), seen (B, V) bool and counts (B, V) int or None -> next token ids (B,) int64."""
        if self.greedy:
            tokens = np.argmax(self.adjust(logits, seen, counts), axis=-1).astype(np.int64)
        else:
            tokens = sample_from_probs(self.probs(logits, seen, counts), self.rng)
        if self.logprobs is not None:
            self.last = top_logprobs(logits, tokens, self.logprobs)
        return tokens
