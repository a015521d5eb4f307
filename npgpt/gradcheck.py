"""Gradient checking as a feature: compare hand-written backward passes with central differences.

For a layer with output y we check the scalar L = sum(y * R) for a fixed random R, so the
analytic gradients come from backward(R); for the whole model L is the cross-entropy loss.
Each checked element's error is

    |analytic - numeric| / max(|analytic|, |numeric|, floor)

where the floor turns the test into an absolute one (floor * tol = 1e-9) for gradients that
are exactly zero in exact arithmetic (the key bias: softmax is invariant to adding a constant
to every score of a row), whose numeric estimate is pure rounding noise: L itself carries a
relative rounding error of ~1e-14, which the difference quotient divides by h = 1e-4, so
numeric derivatives are only good to ~1e-10 in absolute terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import Dropout, Module
from .loss import cross_entropy

DEFAULT_EPS = 1e-4
DEFAULT_TOL = 1e-6
DEFAULT_FLOOR = 1e-3


@dataclass
class GradCheckResult:
    layer: str
    parameter: str
    max_rel_error: float
    checked: int
    tol: float

    @property
    def passed(self) -> bool:
        return bool(self.max_rel_error <= self.tol)


def _rng_snapshot(module: Module):
    """Dropout draws new masks each forward; replaying the generator states keeps them fixed."""
    drops = [m for m in module.modules() if isinstance(m, Dropout)]
    states = [d.rng.bit_generator.state for d in drops]

    def restore():
        for d, s in zip(drops, states):
            d.rng.bit_generator.state = s
    return restore


def _pick(size, max_checks, rng):
    if max_checks is None or size <= max_checks:
        return np.arange(size)
    return np.sort(rng.choice(size, size=max_checks, replace=False))


def _compare(f, x, analytic, idx, eps, floor):
    """Max relative error between analytic[idx] and central differences of f() w.r.t. x.flat[idx]
    (element i in C order; x is perturbed in place, whatever its memory layout).

    Fourth-order central difference: f' = (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h,
    truncation error O(h^4) instead of O(h^2), so h can be large enough that rounding is negligible."""
    worst = 0.0
    for i in idx:
        at = np.unravel_index(i, x.shape)          # not x.reshape(-1)[i]: a copy when x is a strided view
        old = x[at]
        f_at = {}
        for k in (-2, -1, 1, 2):
            x[at] = old + k * eps
            f_at[k] = f()
        x[at] = old
        numeric = (8.0 * (f_at[1] - f_at[-1]) - (f_at[2] - f_at[-2])) / (12.0 * eps)
        a = analytic[at]
        err = abs(a - numeric) / max(abs(a), abs(numeric), floor)
        worst = max(worst, err if np.isfinite(err) else np.inf)   # a NaN gradient fails
    return float(worst)


def _check_float64(arrays, what):
    for name, a in arrays:
        if a.dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 {what} (build it with dtype=np.float64); {name} is {a.dtype}")


def gradcheck_layer(layer: Module, *inputs, name: str | None = None, eps=DEFAULT_EPS, tol=DEFAULT_TOL,
                    floor=DEFAULT_FLOOR, max_checks: int | None = 200, seed: int = 0):
    """Check layer.backward against finite differences for every float input and every trainable
    parameter (a frozen one, requires_grad False, gets no gradient by design and is not checked).

    Returns a list of GradCheckResult (one per input and per trainable parameter)."""
    name = name or type(layer).__name__
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]   # frozen: no gradient by design
    _check_float64([(n, p.data) for n, p in params], "parameters")
    float_inputs = [(i, x) for i, x in enumerate(inputs) if isinstance(x, np.ndarray) and x.dtype.kind == "f"]
    _check_float64([(f"input {i}", x) for i, x in float_inputs], "inputs")
    rng = np.random.default_rng(seed)
    restore = _rng_snapshot(layer)

    def loss_of(out, R):
        return float(np.sum(out * R))

    out = layer.forward(*inputs)
    R = rng.standard_normal(out.shape)
    restore()
    layer.zero_grad()
    out = layer.forward(*inputs)
    dx = layer.backward(R)
    dxs = dx if isinstance(dx, tuple) else (dx,)

    def f():
        restore()
        return loss_of(layer.forward(*inputs), R)

    results = []
    for (i, x), dxi in zip(float_inputs, dxs):
        err = _compare(f, x, dxi, _pick(x.size, max_checks, rng), eps, floor)
        results.append(GradCheckResult(name, f"input {i}", err, min(x.size, max_checks or x.size), tol))
    for pname, p in params:
        err = _compare(f, p.data, p.grad, _pick(p.data.size, max_checks, rng), eps, floor)
        results.append(GradCheckResult(name, pname, err, min(p.data.size, max_checks or p.data.size), tol))
    return results


def gradcheck_model(model, idx, targets, *, eps=DEFAULT_EPS, tol=DEFAULT_TOL, floor=DEFAULT_FLOOR,
                    max_checks: int | None = None, seed: int = 0):
    """Check the whole model: L = cross_entropy(model.forward(idx), targets), every trainable parameter."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # frozen: no gradient by design
    _check_float64([(n, p.data) for n, p in params], "parameters")
    rng = np.random.default_rng(seed)
    restore = _rng_snapshot(model)
    model.zero_grad()
    loss, dlogits = cross_entropy(model.forward(idx), targets)
    model.backward(dlogits)

    def f():
        restore()
        return float(cross_entropy(model.forward(idx), targets)[0])

    results = []
    for pname, p in params:
        layer, _, short = pname.rpartition(".")
        err = _compare(f, p.data, p.grad, _pick(p.data.size, max_checks, rng), eps, floor)
        results.append(GradCheckResult(layer, short, err, min(p.data.size, max_checks or p.data.size), tol))
    return results


def gradcheck_classifier(model, ids, lengths, labels, *, eps=DEFAULT_EPS, tol=DEFAULT_TOL, floor=DEFAULT_FLOOR,
                         max_checks: int | None = None, seed: int = 0, name: str = "Classifier"):
    """Check a Classifier: L = cross_entropy(model.forward(ids, lengths), labels), every parameter.
    With right-padded ids (lengths < T) this also checks that the padding gets no gradient's worth
    of influence: a head reading the wrong position fails."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # frozen: no gradient by design
    _check_float64([(n, p.data) for n, p in params], "parameters")
    rng = np.random.default_rng(seed)
    restore = _rng_snapshot(model)
    model.zero_grad()
    loss, dlogits = cross_entropy(model.forward(ids, lengths), labels)
    model.backward(dlogits)

    def f():
        restore()
        return float(cross_entropy(model.forward(ids, lengths), labels)[0])

    results = []
    for pname, p in params:
        layer, _, short = pname.rpartition(".")
        err = _compare(f, p.data, p.grad, _pick(p.data.size, max_checks, rng), eps, floor)
        results.append(GradCheckResult(f"{name}.{layer}", short, err, min(p.data.size, max_checks or p.data.size), tol))
    return results


def gradcheck_loss_fn(model, batch, *, loss_fn, count_fn, micro_batches: int = 1, eps=DEFAULT_EPS, tol=DEFAULT_TOL,
                      floor=DEFAULT_FLOOR, max_checks: int | None = None, seed: int = 0, name: str = "loss_fn"):
    """Check a training loss function the way train_step runs it: L = the sum over `micro_batches`
    row blocks of loss_fn(model, micro, n), n = count_fn(batch) (the global count), and the analytic
    gradient is what those calls' backward passes add into the .grad arrays. Every parameter.
    For instruction fine-tuning, batch = collate(...) with -100 targets: a loss whose value ignores
    a masked position but whose backward does not (or the reverse) fails."""
    from .train.loop import split_rows
    params = list(model.named_parameters())
    _check_float64([(n, p.data) for n, p in params], "parameters")
    rng = np.random.default_rng(seed)
    restore = _rng_snapshot(model)
    n = max(count_fn(batch), 1)

    def f():
        restore()
        model.zero_grad()
        return sum(float(loss_fn(model, micro, n)) for micro in split_rows(batch, micro_batches))

    f()
    grads = [p.grad.copy() for _, p in params]     # the analytic gradient (f() below overwrites .grad)
    results = []
    for (pname, p), g in zip(params, grads):
        layer, _, short = pname.rpartition(".")
        err = _compare(f, p.data, g, _pick(p.data.size, max_checks, rng), eps, floor)
        results.append(GradCheckResult(f"{name}.{layer}", short, err, min(p.data.size, max_checks or p.data.size), tol))
    return results


def summarize(results, layer: str, parameter: str) -> GradCheckResult:
    """One row for many: the worst error, the elements checked in all; FAIL if any failed."""
    worst = max(results, key=lambda r: r.max_rel_error / r.tol)
    return GradCheckResult(layer, parameter, worst.max_rel_error, sum(r.checked for r in results), worst.tol)


def format_table(results) -> str:
    rows = [("layer", "parameter", "checked", "max rel error", "")]
    rows += [(r.layer, r.parameter, str(r.checked), f"{r.max_rel_error:.2e}", "PASS" if r.passed else "FAIL")
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _randomize(module: Module, rng, std: float = 0.3):
    """Non-trivial parameters for checking: weights ~ N(0, std), biases ~ N(0, 0.1), and
    layernorm gains ~ 1 + N(0, 0.1), so a dropped bias or gain cannot go unnoticed."""
    from .layers import LayerNorm
    gains = {id(m.weight) for m in module.modules() if isinstance(m, LayerNorm)}
    for name, p in module.named_parameters():
        z = rng.standard_normal(p.data.shape)
        if id(p) in gains:
            p.data[...] = 1.0 + 0.1 * z
        elif name.endswith("bias"):
            p.data[...] = 0.1 * z
        else:
            p.data[...] = std * z
    return module


def check_everything(seed: int = 0, dropout: float = 0.1):
    """Every layer, the loss, a whole tiny GPT-2 and classifiers (plain and with LoRA adapters) in float64:
    the list behind `npgpt gradcheck`."""
    from .config import GPTConfig
    from .finetune.classifier import Classifier
    from .layers import (GELU, MLP, Block, CausalSelfAttention, Embedding, LastTokenHead, LayerNorm, Linear,
                         PositionEmbedding, TiedLMHead)
    from .layers.lora import LoRALinear
    from .layers.lora import apply_lora, lora_layers
    from .model import GPT

    f64 = np.float64
    rng = np.random.default_rng(seed)
    B, T, C, NH, V = 2, 5, 8, 2, 11
    x = rng.standard_normal((B, T, C))
    idx = rng.integers(0, V, (B, T))
    wte = _randomize(Embedding(V, C, dtype=f64, rng=rng), rng)
    checks = [
        ("Embedding", Embedding(V, C, dtype=f64, rng=rng), (idx,)),
        ("PositionEmbedding", PositionEmbedding(8, C, dtype=f64, rng=rng), (T,)),
        ("Linear", Linear(C, 3, dtype=f64, rng=rng), (x,)),
        ("LayerNorm", LayerNorm(C, dtype=f64), (x,)),
        ("GELU", GELU(), (x,)),
        ("CausalSelfAttention", CausalSelfAttention(C, NH, dtype=f64, rng=rng, dropout=dropout, seed=seed), (x,)),
        ("MLP", MLP(C, dtype=f64, rng=rng, dropout=dropout, seed=seed), (x,)),
        ("Block", Block(C, NH, dtype=f64, rng=rng, dropout=dropout, seed=seed), (x,)),
        ("TiedLMHead", TiedLMHead(wte), (x,)),
        ("LastTokenHead (padded)", LastTokenHead(C, 3, dtype=f64, rng=rng), (x, np.array([2, T]))),
        # LoRA: y = x W + b + (alpha/r) (x A) B with alpha/r = 1.5, so a dropped scale cannot pass; base frozen
        ("LoRALinear", LoRALinear(Linear(C, 3, dtype=f64, rng=rng), 2, 3.0, rng=rng), (x,)),
        ("LoRALinear (base trainable)", LoRALinear(Linear(C, 3, dtype=f64, rng=rng), 2, 3.0, rng=rng,
                                                   freeze_base=False), (x,)),
    ]
    results = []
    for name, layer, inputs in checks:
        results += gradcheck_layer(_randomize(layer, rng), *inputs, name=name, seed=seed)

    # the loss, through a parameter-free wrapper so its logits are the checked input
    class _Loss(Module):
        def forward(self, logits):
            self.loss, self.dlogits = cross_entropy(logits, targets)
            return np.asarray(self.loss)

        def backward(self, dloss):
            return self.dlogits * dloss

    targets = rng.integers(0, V, (B, T))
    targets[0, 1] = targets[1, 3] = -100
    results += gradcheck_layer(_Loss(), rng.standard_normal((B, T, V)), name="cross_entropy", seed=seed)

    config = GPTConfig(n_vocab=V, n_ctx=8, n_embd=C, n_head=NH, n_layer=2, dropout=dropout)
    model = _randomize(GPT(config, dtype=f64, seed=seed), rng)
    results += gradcheck_model(model, idx, targets, seed=seed)

    # a classifier on right-padded rows: row 0 has 3 real tokens, then padding
    clf = _randomize(Classifier(GPT(config, dtype=f64, seed=seed), ["a", "b", "c"], seed=seed), rng)
    lengths, labels = np.array([3, T]), np.array([2, 0])
    results += gradcheck_classifier(clf, idx, lengths, labels, seed=seed, name="Classifier (padded)")

    # instruction fine-tuning's loss: entries of different lengths + an end token, padded with it;
    # targets after each row's first end token and (mask_prompt) the prompt's targets are -100;
    # two micro-batches dividing by the global count (as train_step runs lm_loss)
    from .finetune.instruct import collate
    from .train.lm import count_targets, lm_loss
    seqs = [rng.integers(0, V - 1, k).tolist() for k in (4, 2, 5, 3)]
    batch = collate(seqs, prompt_lens=[2, 1, 3, 2], end_id=V - 1)
    rows = gradcheck_loss_fn(model, batch, loss_fn=lm_loss, count_fn=count_targets, micro_batches=2, max_checks=8,
                             seed=seed)
    results.append(summarize(rows, "instruction loss (padded, masked, 2 micro-batches)",
                             f"all {len(rows)} GPT parameters"))

    # the same classifier with LoRA adapters on every Linear (B made nonzero): only adapters and head train
    clf = _randomize(Classifier(GPT(config, dtype=f64, seed=seed), ["a", "b", "c"], seed=seed), rng)
    apply_lora(clf, rank=2, alpha=3.0, seed=seed)
    for _, layer in lora_layers(clf):
        layer.lora_B.data[...] = 0.3 * rng.standard_normal(layer.lora_B.data.shape)
    results += gradcheck_classifier(clf, idx, lengths, labels, seed=seed, name="Classifier + LoRA (padded)")
    return results
