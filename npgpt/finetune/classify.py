"""The classification pieces `fit` is given for fine-tuning (`npgpt finetune classify`): a labelled
table of texts, balanced and split; right-padded batches (ids, lengths, labels); their loss and
accuracy."""
from __future__ import annotations

import csv
from collections import Counter

import numpy as np

from ..config import EOT_ID
from ..layers.module import no_grad
from ..loss import cross_entropy

PAD_ID = EOT_ID   # <|endoftext|>, GPT-2's padding token


def read_table(path, text_col=None, label_col=None):
    """(texts, labels) from a TSV/CSV file. With no header (the SMS Spam Collection, `label<TAB>text`)
    columns are numbers: label 0, text 1 by default. A header row is recognised when text_col or
    label_col names one of its cells, and with numbered columns when the first row's label cell is a
    value no other row has while every other row's label is shared with another row (a class name
    occurs many times, a column name once). ValueError on a bad column or an empty table."""
    with open(path, encoding="utf-8", newline="") as f:
        sample = f.read(65536)
        f.seek(0)
        delim = "\t" if "\t" in sample.split("\n", 1)[0] or path.endswith((".tsv", ".txt")) else ","
        rows = [r for r in csv.reader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
                if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    header = rows[0]
    named = [c for c in (text_col, label_col) if c is not None and not str(c).isdigit()]
    if named:
        for c in named:
            if c not in header:
                raise ValueError(f"{path}: no column {c!r} (header: {header})")
        rows = rows[1:]

    def index(col, default):
        if col is None:
            return default
        if str(col).isdigit():
            return int(col)
        return header.index(col)
    ti, li = index(text_col, 1), index(label_col, 0)
    width = min(len(r) for r in rows) if rows else 0
    for name, i in (("text", ti), ("label", li)):
        if i >= width:
            raise ValueError(f"{path}: no {name} column {i} (rows have {width} columns)")
    if not named and _is_header(rows, li):
        rows = rows[1:]
    texts, labels = [r[ti] for r in rows], [r[li].strip() for r in rows]
    if not texts:
        raise ValueError(f"{path}: no rows")
    return texts, labels


def _is_header(rows, label_col: int) -> bool:
    """Whether the first row names the columns: its label cell occurs in no other row, and every other
    row's label occurs at least twice."""
    counts = Counter(r[label_col].strip() for r in rows)
    first = rows[0][label_col].strip()
    return counts[first] == 1 and len(rows) > 1 and all(n >= 2 for c, n in counts.items() if c != first)


def balance_and_split(labels, seed: int, fractions=(0.7, 0.1)):
    """Row indices (train, val, test): every class undersampled to the rarest one's count, shuffled with
    the seed, then split 70/10/20. ValueError with fewer than two classes."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError(f"need at least two classes, found {names}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in names]
    n = min(len(ix) for ix in by_class)
    keep = np.concatenate([rng.permutation(ix)[:n] for ix in by_class])
    keep = rng.permutation(keep)
    a = int(len(keep) * fractions[0])
    b = a + int(len(keep) * fractions[1])
    return keep[:a], keep[a:b], keep[b:]


def pad_batch(seqs, max_length=None, pad_id: int = PAD_ID):
    """Right-pad token lists to the longest (or to max_length, truncating) -> ids (B, T), lengths (B,)."""
    seqs = [s[:max_length] if max_length else s for s in seqs]
    seqs = [s if len(s) else [pad_id] for s in seqs]                  # an empty text reads one pad token
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, np.array([len(s) for s in seqs], dtype=np.int64)


class ClassRows:
    """The training rows as BatchStream reads them: get(rows) -> (ids, lengths, labels), padded."""
    what = "rows"

    def __init__(self, tokens, labels, max_length=None):
        self.tokens, self.labels, self.max_length = tokens, np.asarray(labels, dtype=np.int64), max_length

    def __len__(self):
        return len(self.tokens)

    def get(self, rows):
        ids, lengths = pad_batch([self.tokens[i] for i in rows], self.max_length)
        return ids, lengths, self.labels[rows]


def classify_loss(model, batch, normalizer: int) -> float:
    """Forward and backward of cross-entropy on one micro-batch (ids, lengths, labels): adds
    d(sum of per-row losses / normalizer)/dparam into the grads; returns that loss share."""
    ids, lengths, labels = batch
    logits = model.forward(ids, lengths)                                        # (B, K)
    loss, dlogits = cross_entropy(logits, labels, normalizer=normalizer)
    model.backward(dlogits)
    return float(loss)


def count_rows(batch) -> int:
    return len(batch[0])


@no_grad()
def evaluate_rows(model, tokens, labels, batch_size: int = 16, max_length=None):
    """(mean loss, accuracy) over rows, in batches."""
    labels = np.asarray(labels, dtype=np.int64)
    total, correct = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        ids, lengths = pad_batch(tokens[i:i + batch_size], max_length)
        y = labels[i:i + batch_size]
        logits = model.forward(ids, lengths)                                    # (b, K)
        total += float(cross_entropy(logits, y, normalizer=1)[0])
        correct += int(np.count_nonzero(logits.argmax(axis=-1) == y))
    n = max(len(tokens), 1)
    return total / n, correct / n


def classify_evaluator(splits: dict, batch_size: int, max_length=None, rows: list | None = None, epoch_of=None):
    """evaluate(model) for fit: loss and accuracy on each split {name: (tokens, labels)}; each result is
    also appended to `rows` (with the epoch, epoch_of() if given)."""
    def evaluate(model):
        out = {}
        for name, (tokens, labels) in splits.items():
            out[f"{name}_loss"], out[f"{name}_accuracy"] = evaluate_rows(model, tokens, labels, batch_size, max_length)
        if rows is not None:
            rows.append({"epoch": epoch_of() if epoch_of else len(rows), **out})
        return out
    return evaluate


