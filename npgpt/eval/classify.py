"""A fine-tuned classifier (npgpt finetune classify) on a labelled table: accuracy, per-class precision,
recall and F1, and the confusion matrix.

    confusion[i][j]  rows whose true class is i and predicted class j (class order: the classifier's labels)
    precision_k = confusion[k][k] / column k's sum      recall_k = confusion[k][k] / row k's sum
    F1_k = 2 precision_k recall_k / (precision_k + recall_k)        (0 where a denominator is 0, as scikit-learn)

Texts are tokenized with GPT-2's BPE and cut to max_length tokens (default n_ctx), as fine-tuning cut them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..finetune.classify import pad_batch
from ..layers.module import no_grad
from .perplexity import default_tokenizer
from .score import collect, progress_bar, shard


@dataclass
class ClassifyResult:
    """The confusion matrix of a classifier on labelled rows; the metrics as properties."""
    labels: list
    confusion: list               # (K, K) counts: rows true class, columns predicted

    @property
    def items(self) -> int:
        return int(np.sum(self.confusion))

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / max(self.items, 1)

    @property
    def precision(self) -> list:
        c = np.asarray(self.confusion, dtype=np.float64)
        return _ratio(np.diag(c), c.sum(axis=0))

    @property
    def recall(self) -> list:
        c = np.asarray(self.confusion, dtype=np.float64)
        return _ratio(np.diag(c), c.sum(axis=1))

    @property
    def f1(self) -> list:
        p, r = np.array(self.precision), np.array(self.recall)
        return _ratio(2 * p * r, p + r)

    def to_dict(self) -> dict:
        return {**asdict(self), **{k: getattr(self, k) for k in ("items", "accuracy", "precision", "recall", "f1")}}


def _ratio(num, den) -> list:
    """num / den elementwise, 0 where den is 0."""
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0).tolist()


def classify(model, texts, labels, tokenizer=None, *, max_length: int | None = None, batch: int = 16,
             limit: int | None = None, progress: bool = False, dist=None) -> ClassifyResult:
    """A Classifier's predictions on `texts` against their `labels` (names among model.labels)."""
    from ..distributed import LocalDist
    dist = dist or LocalDist()
    tokenizer = default_tokenizer(tokenizer)
    texts, labels = list(texts)[:limit], list(labels)[:limit]
    index = {name: k for k, name in enumerate(model.labels)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not the classifier's ({model.labels})")
    max_length = min(max_length or model.gpt.config.n_ctx, model.gpt.config.n_ctx)
    ids = [tokenizer.encode(t)[:max_length] for t in texts]
    mine = shard(len(ids), dist)
    local = {}
    with progress_bar(len(mine), progress and dist.is_main, "classify", unit="row") as bar, no_grad(), \
            model.eval_mode():
        for b0 in range(0, len(mine), batch):
            rows = mine[b0:b0 + batch]
            x, lengths = pad_batch([ids[i] for i in rows], max_length)
            predicted = model.forward(x, lengths).argmax(axis=-1)          # (B,)
            local.update({int(i): int(k) for i, k in zip(rows, predicted)})
            bar.update(len(rows))
    confusion = np.zeros((len(model.labels), len(model.labels)), dtype=np.int64)
    for name, k in zip(labels, collect(local, len(ids), dist)):
        confusion[index[name], k] += 1
    return ClassifyResult(list(model.labels), confusion.tolist())
