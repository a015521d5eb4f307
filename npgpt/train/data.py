"""The data side of ``npgpt train``: text -> token ids -> windows -> batches.

The layout is the one of chapter 5 of "Build a Large Language Model (From Scratch)":

1. The text is split BY CHARACTERS: ``split = int(train_ratio * len(text))``,
   ``train = text[:split]``, ``val = text[split:]``; each part is tokenized separately.
2. A split's token ids ``ids`` (length N) are cut into windows of ``context`` (T) tokens
   starting at ``0, stride, 2*stride, ...`` while ``start < N - T``; a window's inputs are
   ``ids[s : s+T]`` and its targets ``ids[s+1 : s+T+1]`` (the next token at every position).
3. Training batches (``BatchStream``) draw ``batch_size`` windows at a time, shuffled afresh
   each epoch (or in order), dropping the last partial batch; evaluation batches
   (``eval_batches``) go over a split's windows in order, keeping the partial last batch.

Token ids are cached in ``<cache>/tokens/<sha256>.npy`` (``uint16``, or ``uint32`` when the
vocabulary has more than 65536 ids) keyed by the text and the tokenizer's identity, and
memory-mapped, so a second run neither re-tokenizes nor holds the ids in RAM.

    data = prepare_data("the-verdict", tokenizer="gpt2", context=256)
    stream = data.batches(batch_size=8, shuffle=True, seed=0)
    x, y = stream.next()                                  # (8, 256) int64 each
    for x, y in data.eval_batches("val", batch_size=8):   # every val window once
        ...
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..io.download import cache_dir as default_cache_dir
from .sources import load_text
from ..tokens.tokenizers import make_tokenizer

__all__ = ["Data", "Windows", "BatchStream", "prepare_data", "split_text", "tokenize_cached",
           "eval_batches"]


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """``(text[:split], text[split:])`` with ``split = int(train_ratio * len(text))``."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    split = int(train_ratio * len(text))
    return text[:split], text[split:]


def token_dtype(n_vocab: int):
    """uint16 when every id (0 .. n_vocab-1) fits in 16 bits, else uint32."""
    return np.uint16 if n_vocab <= 1 << 16 else np.uint32


def tokenize_cached(text: str, tokenizer, cache_dir=None) -> np.ndarray:
    """``tokenizer.encode(text)`` as a read-only memory-mapped array (N,), cached on disk.

    The cache file ``<cache_dir>/tokens/<sha256>.npy`` is named by a hash of the
    tokenizer's identity and the text, so any change to either makes a new file; it is
    written atomically (temporary file + rename)."""
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{tokenizer.identity}\0".encode() + text.encode("utf-8", "surrogatepass"))
    path = os.path.join(root, "tokens", key.hexdigest() + ".npy")
    if not os.path.isfile(path):
        ids = np.asarray(tokenizer.encode(text), dtype=token_dtype(tokenizer.n_vocab))   # (N,)
        _save_atomic(path, ids)
    ids = np.load(path, mmap_mode="r")
    # older NumPy cannot memory-map a zero-length array
    return ids if ids.size else np.zeros(0, dtype=ids.dtype)


def _save_atomic(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Windows:
    """The ``context``-token windows of one split, starting every ``stride`` tokens.

    Window ``i`` starts at ``starts[i] = i * stride``; starts run while ``start < N - T``,
    so every window has its T inputs and T targets inside ``ids``."""

    def __init__(self, ids: np.ndarray, context: int, stride: int | None = None):
        stride = context if stride is None else stride
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.ids, self.context, self.stride = ids, context, stride
        self.starts = np.arange(0, max(len(ids) - context, 0), stride, dtype=np.int64)   # (n,)

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, index) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``index`` (ints, shape (B,)) -> inputs x, targets y: int64 (B, T)."""
        rows = self.starts[np.asarray(index)][:, None] + np.arange(self.context)         # (B, T)
        return self.ids[rows].astype(np.int64), self.ids[rows + 1].astype(np.int64)


class BatchStream:
    """Training batches from ``windows``, one ``next()`` after another across epochs.

    ``windows`` is anything with ``len()`` and ``get(index) -> batch`` (index: an int array of rows):
    pretraining's token ``Windows``, and fine-tuning's padded rows (npgpt.finetune.classify.ClassRows,
    npgpt.finetune.instruct.InstructRows), so every training stream shuffles and resumes the same way.

    Each epoch visits ``batches_per_epoch = len(windows) // batch_size`` batches (the
    last partial batch is dropped). With ``shuffle`` the window order of epoch ``e`` is
    ``np.random.default_rng([seed, e]).permutation(len(windows))``, a pure function of
    (seed, e), so the position (epoch, batch within epoch) is all a resume needs.
    ``epoch`` is the epoch of the batch returned last (0 before the first)."""

    def __init__(self, windows, batch_size: int, shuffle: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(windows) < batch_size:
            what = getattr(windows, "what", "windows")
            raise ValueError(f"the training split has {len(windows)} {what}, fewer than one batch "
                             f"of batch_size={batch_size}" + ("; lower the batch size, context or stride"
                                                               if what == "windows" else ""))
        self.windows, self.batch_size, self.shuffle, self.seed = windows, batch_size, shuffle, seed
        self.batches_per_epoch = len(windows) // batch_size
        self.epoch = 0
        self.position = 0          # batches already taken from the current epoch
        self._order = None         # (epoch, window order of that epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of ``epoch`` in visiting order, (n_windows,)."""
        n = len(self.windows)
        if not self.shuffle:
            return np.arange(n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return self._order[1]

    def next(self) -> tuple:
        """The next batch: windows.get of the next batch_size rows (for Windows: inputs x and targets y,
        int64 (batch_size, context))."""
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        b = self.batch_size
        index = self.order(self.epoch)[self.position * b:(self.position + 1) * b]   # (B,)
        self.position += 1
        return self.windows.get(index)

    __next__ = next

    def __iter__(self):
        return self

    @property
    def steps(self) -> int:
        """Batches returned so far."""
        return self.epoch * self.batches_per_epoch + self.position

    def state_dict(self) -> dict:
        """A small JSON-able dict; ``load_state_dict`` continues the stream from here."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size, "n_windows": len(self.windows)}

    def load_state_dict(self, d: dict) -> None:
        """Resume at ``d``'s position; ValueError if ``d`` describes a different stream."""
        mine = self.state_dict()
        for k in ("seed", "shuffle", "batch_size", "n_windows"):
            if d.get(k) != mine[k]:
                raise ValueError(f"cannot resume the batch stream: its {k} was {d.get(k)!r}, now {mine[k]!r}")
        epoch, position = int(d["epoch"]), int(d["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"cannot resume the batch stream at epoch {epoch}, batch {position} "
                             f"(an epoch has {self.batches_per_epoch} batches)")
        self.epoch, self.position = epoch, position


def eval_batches(windows: Windows, batch_size: int, n_batches: int = 0):
    """Yield (x, y), int64 (B, T), over ``windows`` in order; the last batch may be smaller.

    Only the first ``n_batches`` batches are yielded (0 = all of them)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_batches < 0:
        raise ValueError(f"n_batches must be >= 0, got {n_batches}")
    n = len(windows)
    if n == 0:
        raise ValueError(f"no windows to evaluate: the split has {len(windows.ids)} tokens, "
                         f"one window needs context + 1 = {windows.context + 1}")
    stop = n if n_batches == 0 else min(n, n_batches * batch_size)
    for start in range(0, stop, batch_size):
        yield windows.get(np.arange(start, min(start + batch_size, stop)))


@dataclass
class Data:
    """A prepared dataset: tokenizer, token ids of both splits, their windows."""

    name: str            # what --data named: a dataset name, URL or path
    tokenizer: object    # GPT2Tokenizer / CharTokenizer (encode, decode, n_vocab, name, save)
    train_ids: np.ndarray = field(repr=False)   # (N_train,) uint16/uint32, memory-mapped
    val_ids: np.ndarray = field(repr=False)     # (N_val,)
    train: Windows = field(repr=False)
    val: Windows = field(repr=False)
    context: int
    stride: int

    @property
    def n_vocab(self) -> int:
        return self.tokenizer.n_vocab

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> BatchStream:
        """The endless stream of training batches (see ``BatchStream``)."""
        return BatchStream(self.train, batch_size, shuffle=shuffle, seed=seed)

    def eval_batches(self, split: str, batch_size: int, n_batches: int = 0):
        """Batches over the ``"train"`` or ``"val"`` windows in order (see ``eval_batches``)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return eval_batches(self.train if split == "train" else self.val, batch_size, n_batches)


def prepare_data(data=None, tokenizer="gpt2", context: int = 256, stride: int | None = None,
                 train_ratio: float = 0.9, cache_dir=None, progress: bool = True,
                 max_bytes: int | None = None) -> Data:
    """Load ``data`` (see ``npgpt.train.sources``), split, tokenize (cached), window it.

    ``tokenizer`` is ``"gpt2"``, ``"char"`` (vocabulary = sorted unique characters of the
    whole text) or a tokenizer object, e.g. ``find_tokenizer(run_dir)`` to
    resume with a saved vocabulary. ``stride`` defaults to ``context``. ``max_bytes`` caps a
    download (``download_file``). Both splits must hold at least one window (``context + 1``
    tokens), else ValueError says which one."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    stride = context if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    text, name = load_text(data, cache_dir=cache_dir, progress=progress, max_bytes=max_bytes)
    train_text, val_text = split_text(text, train_ratio)
    tok = make_tokenizer(tokenizer, text)
    train_ids = tokenize_cached(train_text, tok, cache_dir)
    val_ids = tokenize_cached(val_text, tok, cache_dir)
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) <= context:
            raise ValueError(
                f"--data {name}: the {split} split has {len(ids)} tokens ({tok.name} tokenizer, "
                f"train_ratio={train_ratio}) but one window needs context + 1 = {context + 1}; "
                f"use a longer text or a smaller context" + (" or train_ratio" if split == "validation" else ""))
    return Data(name, tok, train_ids, val_ids, Windows(train_ids, context, stride),
                Windows(val_ids, context, stride), context, stride)
