"""Choosing the next token from a batch of logits (B, V), all rows at once.

The logits pass through these steps, in this order (the order Hugging Face uses):

    1. repetition penalty   (CTRL): for every token already seen in the row, a positive logit is
                            divided by the penalty and a negative one multiplied by it
    2. temperature          logits / temperature; temperature 0 means greedy: argmax, no randomness
    3. top-k                keep the k largest logits (ties with the k-th are kept too)
    4. top-p (nucleus)      keep the smallest set of most probable tokens whose probability mass
                            reaches p (always at least one token), renormalise
    5. draw                 one token per row by inverse-CDF sampling with np.random.Generator

A Sampler owns its generator, np.random.default_rng(seed), so a seed reproduces a run exactly.
"""
from __future__ import annotations

import math

import numpy as np

# a probability mass within this of p counts as reaching p (the sums below are float64)
TOP_P_TOLERANCE = 1e-9


def softmax(logits, axis: int = -1):
    """float64 softmax (-inf logits get probability 0)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL's repetition penalty on logits (B, V) for the tokens marked in seen (B, V) bool;
    returns a new array: seen positive logits / penalty, seen negative logits * penalty."""
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty}")
    logits = np.array(logits, dtype=np.float64)
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


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


class Sampler:
    """next_tokens = Sampler(temperature=0.8, top_k=40, seed=0)(logits, seen)   logits (B, V) -> (B,)"""

    def __init__(self, temperature: float = 0.0, top_k=None, top_p=None, repetition_penalty=None, seed=None):
        if temperature is None or not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and not (math.isfinite(top_k) and int(top_k) == top_k and top_k >= 1):
            raise ValueError(f"top_k must be a positive int, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:          # also rejects nan
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.repetition_penalty = repetition_penalty
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits, seen=None):
        """The distribution tokens are drawn from (B, V), after every filter (not used when greedy)."""
        logits = self.adjust(logits, seen) / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, int(self.top_k))
        probs = softmax(logits)
        if self.top_p is not None and self.top_p < 1.0:
            probs = top_p_filter(probs, self.top_p)
        return probs

    def adjust(self, logits, seen=None):
        """Step 1: the repetition penalty (float64 logits (B, V))."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0 and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        return logits

    def __call__(self, logits, seen=None):
        """logits (B, V), seen (B, V) bool or None -> next token ids (B,) int64."""
        if self.greedy:
            return np.argmax(self.adjust(logits, seen), axis=-1).astype(np.int64)
        return sample_from_probs(self.probs(logits, seen), self.rng)
