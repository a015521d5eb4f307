"""Log-likelihoods of token sequences under a GPT, in batches, with nothing kept for backward.

A request is a token sequence `ids` (n,) and the position `first` (>= 1) of its first scored token.
The model reads ids[0 : n-1] (its last token is only a target) and scores ids[t], t = first .. n-1,
from its logits at t - 1:

    nll[t]    = logsumexp(logits[t-1]) - logits[t-1, ids[t]]        natural log, float64
    greedy[t] = argmax(logits[t-1]) == ids[t]                       (the first maximum, as torch.argmax)

Requests run longest first, `batch` at a time, right-padded (attention is causal, so the padding
after a row's last token never reaches its scored positions): one forward_hidden under no_grad
and eval mode (no KV cache, no activations kept; from T = 128 the fused attention kernel), then
the LM head only at the scored positions, a block of rows at a time, so the (B, T, V) logits are
never held. Under MPI each rank scores every world_size-th request of that order and every rank
gets every result (collect).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import fast
from ..layers.module import no_grad

HEAD_FLOATS = 1 << 24          # logits computed at once: rows x V <= this (64 MiB of float32: 333 rows of GPT-2's
                               # vocabulary, whose head GEMM ran 1.2x as fast as at 166 rows)


@dataclass
class Request:
    """A token sequence and the position of its first scored token."""
    ids: np.ndarray            # (n,) token ids
    first: int                 # 1 <= first <= n - 1


@dataclass
class Scores:
    """A request's scored tokens ids[first:]: their negative log-likelihoods and greedy hits."""
    nll: np.ndarray            # (n - first,) float64
    greedy: np.ndarray         # (n - first,) bool


def token_nll(logits, targets):
    """-log softmax(logits)[target] (float64) and argmax == target, row by row; logits (N, V) are overwritten.
    The Numba kernel (npgpt/fast/crossentropy.py) unless NPGPT_KERNELS=numpy."""
    if fast.use_numba():
        return fast.token_nll(logits, targets)
    return token_nll_numpy(logits, targets)


def token_nll_numpy(logits, targets):
    """token_nll in NumPy: the reference the kernel is tested against."""
    rows = np.arange(len(targets))
    best = logits.argmax(axis=1)                                      # (N,) the first maximum
    m = logits[rows, best]                                            # (N,) max_v z
    zt = logits[rows, targets].astype(np.float64)                     # (N,) z[target]
    logits -= m[:, None]
    np.exp(logits, out=logits)                                        # e = exp(z - m)
    sumexp = logits.sum(axis=1, dtype=np.float64)                     # (N,)
    return np.log(sumexp) + m - zt, best == targets                   # nll = log(sumexp) + m - z[target]


def shard(n: int, dist, order=None) -> np.ndarray:
    """This rank's items of `order` (default 0 .. n-1): every world_size-th, starting at its rank."""
    order = np.arange(n) if order is None else np.asarray(order)
    return order[dist.rank::dist.world_size]


def collect(local: dict, n: int, dist) -> list:
    """Every rank's {item: result} merged into one list of n results, on every rank."""
    parts = dist.gather(local)
    merged = None
    if dist.is_main:
        everything = {k: v for part in parts for k, v in part.items()}
        merged = [everything[i] for i in range(n)]
    return dist.bcast(merged)


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "tok"):
    """A tqdm bar over `total` units with their rate (tokens/s), or a silent one."""
    from tqdm.auto import tqdm
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True,
                leave=False)


def score(model, requests, batch: int = 8, progress: bool = False, dist=None, desc: str = "eval",
          keep: bool = False) -> list:
    """Scores of every request (a list in their order, on every rank); see the module docstring. keep: write
    each finished batch to disk and take those an interrupted run of the same evaluation wrote
    (npgpt/eval/resume.py); the folder goes once every score is in."""
    from ..distributed import LocalDist
    from .resume import Kept, progress_folder
    dist = dist or LocalDist()
    lengths = np.array([len(r.ids) for r in requests])
    for i, r in enumerate(requests):
        if not 1 <= r.first < len(r.ids):
            raise ValueError(f"request {i}: first scored position {r.first} is not in [1, {len(r.ids) - 1}]")
    mine = shard(len(requests), dist, np.argsort(-lengths, kind="stable"))   # longest first
    V = model.config.n_vocab
    rows_at_once = max(1, HEAD_FLOATS // V)
    local = {}
    store = Kept(progress_folder(model, requests, batch, dist), dist.rank) if keep else None
    kept = store.load() if keep else {}
    if kept:
        desc += f" (continued: {len(kept)} of {-(-len(mine) // batch)} batches kept)"
    with progress_bar(int(lengths[mine].sum() - len(mine)), progress and dist.is_main, desc) as bar, \
            no_grad(), model.eval_mode():
        for b0 in range(0, len(mine), batch):
            group = [requests[i] for i in mine[b0:b0 + batch]]
            if b0 in kept and np.array_equal(kept[b0][0], mine[b0:b0 + batch]):   # scored by an interrupted run
                _per_request(local, *kept[b0])
                bar.update(sum(len(r.ids) - 1 for r in group))
                continue
            T = max(len(r.ids) for r in group) - 1
            x = np.zeros((len(group), T), dtype=np.int64)                    # (B, T), right-padded with id 0
            for row, r in enumerate(group):
                x[row, :len(r.ids) - 1] = r.ids[:-1]
            hidden = model.forward_hidden(x)                                 # (B, T, C)
            h = np.concatenate([hidden[row, r.first - 1:len(r.ids) - 1] for row, r in enumerate(group)])  # (M, C)
            targets = np.concatenate([r.ids[r.first:] for r in group]).astype(np.int64)                   # (M,)
            nll, greedy = np.empty(len(targets)), np.empty(len(targets), dtype=bool)
            for s in range(0, len(targets), rows_at_once):
                e = min(s + rows_at_once, len(targets))
                nll[s:e], greedy[s:e] = token_nll(model.lm_head(h[s:e]), targets[s:e])   # logits (rows, V)
            counts = [len(r.ids) - r.first for r in group]
            _per_request(local, mine[b0:b0 + batch], nll, greedy, counts)
            if store is not None:
                store.add(b0, mine[b0:b0 + batch], nll, greedy, counts)
            bar.update(sum(len(r.ids) - 1 for r in group))
    scores = collect(local, len(requests), dist)       # every rank's batches are in: nothing more to keep
    if store is not None:
        store.remove()
    return scores


def _per_request(local: dict, items, nll, greedy, counts) -> None:
    """local[item] = its Scores, from a batch's scored tokens laid end to end (counts of them a request)."""
    cuts = np.cumsum(counts)[:-1]
    for i, n_, g_ in zip(items, np.split(nll, cuts), np.split(greedy, cuts)):
        local[int(i)] = Scores(n_, g_)
