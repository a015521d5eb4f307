"""The language-model pieces `fit` is given for pretraining: the loss of a batch of (inputs, targets)
windows, its evaluation over a split, and a text sample."""
from __future__ import annotations

import numpy as np

from ..layers.module import no_grad
from ..loss import IGNORE_INDEX, cross_entropy


def lm_loss(model, batch, normalizer: int) -> float:
    """Forward and backward of next-token cross-entropy on one micro-batch (x, y), both (B, T).
    Adds d(sum of per-target losses / normalizer)/dparam into the grads; returns that loss share."""
    x, y = batch
    logits = model.forward(x)                                                # (B, T, V)
    loss, dlogits = cross_entropy(logits, y, normalizer=normalizer, out=logits)   # dlogits overwrites logits
    model.backward(dlogits)
    return float(loss)


def count_targets(batch) -> int:
    """Targets that count (not IGNORE_INDEX) in a batch (x, y)."""
    return int(np.count_nonzero(batch[1] != IGNORE_INDEX))


@no_grad()
def mean_loss(model, batches) -> float:
    """Mean cross-entropy over every target of `batches` (an iterable of (x, y)), with no gradients
    kept: each batch is a sum, so a partial last batch weighs by its size."""
    total, n = 0.0, 0
    for x, y in batches:
        logits = model.forward(x)
        k = int(np.count_nonzero(y != IGNORE_INDEX))
        loss, _ = cross_entropy(logits, y, normalizer=1, out=logits)        # the sum over the batch's targets
        total, n = total + float(loss), n + k
    return total / max(n, 1)


def lm_evaluator(data, batch_size: int, n_batches: int):
    """evaluate(model) for fit: mean loss over the first n_batches batches (0 = all) of each split."""
    def evaluate(model):
        return {"train_loss": mean_loss(model, data.eval_batches("train", batch_size, n_batches)),
                "val_loss": mean_loss(model, data.eval_batches("val", batch_size, n_batches))}
    return evaluate


def lm_sampler(tokenizer, prompt: str, max_new_tokens: int = 50, seed: int = 0, temperature: float = 0.8,
               top_k: int | None = 40):
    """sample(model) for fit: the prompt followed by its continuation (seeded: the same each time,
    so samples never move the training RNGs)."""
    from ..inference.decode import generate

    def sample(model):
        ids = tokenizer.encode(prompt) if prompt else [getattr(tokenizer, "eot_token", None) or 0]
        out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       n_vocab=tokenizer.n_vocab)
        return prompt + tokenizer.decode([int(t) for t in out[0][len(ids):]])
    return sample
