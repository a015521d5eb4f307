"""Every hand-written backward pass against finite differences, in float64, on both kernel backends.

Layers go through npgpt.gradcheck_layer (L = sum(out * R) for a fixed random R: the input and
every parameter are checked); the loss through our own finite differences on its logits; the
whole tiny GPT through npgpt.gradcheck_model.  All at the default tolerance (1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest

import npgpt
import npgpt.fast
from npgpt.gradcheck import DEFAULT_TOL, format_table
from npgpt.layers import (MLP, GELU, Block, CausalSelfAttention, Dropout, Embedding, LayerNorm, Linear,
                          PositionEmbedding, TiedLMHead)

F64 = np.float64


def assert_all_pass(results, expected_names):
    table = format_table(results)
    assert [r.parameter for r in results] == list(expected_names), table
    for r in results:
        assert r.tol == DEFAULT_TOL, table
        assert r.checked > 0, table
        assert r.passed, "gradcheck failed:\n" + table


def check_layer(layer, *inputs, n_float_inputs=1, **kw):
    results = npgpt.gradcheck_layer(layer, *inputs, **kw)
    expected = [f"input {i}" for i in range(n_float_inputs)] + [n for n, _ in layer.named_parameters()]
    assert_all_pass(results, expected)
    return results


# ----------------------------------------------------------------------------- single layers

def test_linear(backend, randomize):
    rng = np.random.default_rng(1)
    layer = randomize(Linear(5, 7, dtype=F64, rng=rng), rng, weight_std=0.5, bias_std=0.5)
    x = rng.standard_normal((2, 3, 5))
    check_layer(layer, x)


def test_layernorm(backend, randomize):
    rng = np.random.default_rng(2)
    layer = randomize(LayerNorm(6, dtype=F64), rng, bias_std=0.5, gain_std=0.5)
    assert not np.allclose(layer.weight.data, 1.0) and not np.allclose(layer.bias.data, 0.0)
    # rows with a non-zero mean and a non-unit spread, so all three backward terms matter
    x = 1.5 + 2.0 * rng.standard_normal((3, 4, 6))
    check_layer(layer, x)


def test_gelu(backend):
    rng = np.random.default_rng(3)
    x = 2.0 * rng.standard_normal((2, 5, 7))           # both tails and the bend around 0
    check_layer(GELU(), x)


def test_dropout_training(backend):
    rng = np.random.default_rng(4)
    layer = Dropout(0.3, seed=123)
    assert layer.training
    x = rng.standard_normal((4, 5, 6))
    check_layer(layer, x)
    mask = layer.mask                                    # the replayed mask of the last forward
    assert mask is not None
    assert mask.dtype == bool and mask.any() and not mask.all()
    y = layer.forward(x)
    np.testing.assert_allclose(y[layer.mask], x[layer.mask] / 0.7)
    assert np.all(y[~layer.mask] == 0)


def test_embedding_repeated_ids(backend, randomize):
    rng = np.random.default_rng(5)
    layer = Embedding(11, 4, dtype=F64, rng=rng)
    idx = np.array([[1, 3, 3, 0, 1, 1], [3, 7, 7, 7, 2, 1]])   # repeats: the scatter-add must accumulate
    check_layer(layer, idx, n_float_inputs=0)
    # and explicitly: row 7 collects three output rows' gradients, unused rows get none
    layer.zero_grad()
    dout = rng.standard_normal((2, 6, 4))
    layer.forward(idx)
    assert layer.backward(dout) is None
    np.testing.assert_allclose(layer.weight.grad[7], dout[1, 1:4].sum(axis=0), rtol=1e-14)
    np.testing.assert_allclose(layer.weight.grad[1], dout[0, 0] + dout[0, 4] + dout[0, 5] + dout[1, 5],
                               rtol=1e-14)
    unused = [i for i in range(11) if i not in idx]
    assert np.all(layer.weight.grad[unused] == 0)


@pytest.mark.parametrize("T, start", [(5, 0), (4, 3)])
def test_position_embedding(backend, T, start):
    rng = np.random.default_rng(6)
    layer = PositionEmbedding(8, 4, dtype=F64, rng=rng)
    check_layer(layer, T, start, n_float_inputs=0)
    # broadcast over a batch: the (B, T, C) gradient is summed over B
    layer.zero_grad()
    out = layer.forward(T, start)
    dout = rng.standard_normal((3,) + out.shape)
    layer.backward(dout)
    np.testing.assert_allclose(layer.weight.grad[start:start + T], dout.sum(axis=0), rtol=1e-14)
    assert np.all(layer.weight.grad[:start] == 0) and np.all(layer.weight.grad[start + T:] == 0)


def test_tied_lm_head(backend):
    rng = np.random.default_rng(7)
    wte = Embedding(11, 4, dtype=F64, rng=rng)
    head = TiedLMHead(wte)
    assert head.weight is wte.weight
    x = rng.standard_normal((2, 3, 4))
    check_layer(head, x)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_attention(backend, randomize, dropout):
    rng = np.random.default_rng(8)
    layer = CausalSelfAttention(8, 2, dtype=F64, rng=rng, dropout=dropout, n_layer=2, seed=11)
    randomize(layer, rng, weight_std=0.4, bias_std=0.3)   # peaky, non-uniform attention
    x = rng.standard_normal((2, 5, 8))
    check_layer(layer, x)
    if dropout:
        assert (layer.attn_dropout.mask == 0).any() and (layer.resid_dropout.mask == 0).any()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_mlp(backend, randomize, dropout):
    rng = np.random.default_rng(9)
    layer = randomize(MLP(6, dtype=F64, rng=rng, dropout=dropout, n_layer=2, seed=12), rng,
                      weight_std=0.4, bias_std=0.3)
    x = rng.standard_normal((2, 3, 6))
    check_layer(layer, x)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_block(backend, randomize, dropout):
    rng = np.random.default_rng(10)
    layer = randomize(Block(8, 2, dtype=F64, rng=rng, dropout=dropout, n_layer=2, seed=13), rng,
                      weight_std=0.3, bias_std=0.3, gain_std=0.3)
    x = rng.standard_normal((2, 5, 8))
    check_layer(layer, x)


# ----------------------------------------------------------------------------- the loss

def fd_max_rel_error(f, x, analytic, eps=1e-4, floor=1e-4):
    """Fourth-order central differences of the scalar f() w.r.t. every element of x (in place)."""
    flat, a = x.reshape(-1), analytic.reshape(-1)
    assert np.shares_memory(flat, x)
    worst = 0.0
    for i in range(flat.size):
        old = flat[i]
        vals = {}
        for k in (-2, -1, 1, 2):
            flat[i] = old + k * eps
            vals[k] = f()
        flat[i] = old
        num = (8.0 * (vals[1] - vals[-1]) - (vals[2] - vals[-2])) / (12.0 * eps)
        worst = max(worst, abs(a[i] - num) / max(abs(a[i]), abs(num), floor))
    return worst


def manual_ce(logits, targets):
    V = logits.shape[-1]
    z, t = logits.reshape(-1, V), targets.reshape(-1)
    keep = t != -100
    m = z.max(axis=1)
    lse = np.log(np.exp(z - m[:, None]).sum(axis=1)) + m
    return (lse[keep] - z[keep, t[keep]]).mean()


@pytest.mark.parametrize("case", ["some_ignored", "whole_row_ignored"])
def test_cross_entropy(backend, case):
    rng = np.random.default_rng(20)
    B, T, V = 3, 4, 7
    logits = 3.0 * rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 1] = targets[2, 3] = -100
    if case == "whole_row_ignored":
        targets[1, :] = -100
    ignored = targets == -100

    loss, dlogits = npgpt.cross_entropy(logits, targets)
    assert loss.dtype == F64 and dlogits.dtype == F64 and dlogits.shape == logits.shape
    np.testing.assert_allclose(float(loss), manual_ce(logits, targets), rtol=1e-13)
    assert np.all(dlogits[ignored] == 0)
    # each valid row of dlogits sums to 0 (softmax minus one-hot)
    np.testing.assert_allclose(dlogits[~ignored].sum(axis=-1), 0.0, atol=1e-15)

    err = fd_max_rel_error(lambda: float(npgpt.cross_entropy(logits, targets)[0]), logits, dlogits)
    assert err <= DEFAULT_TOL, err


def test_cross_entropy_all_ignored(backend):
    logits = np.random.default_rng(21).standard_normal((2, 3, 5))
    targets = np.full((2, 3), -100)
    loss, dlogits = npgpt.cross_entropy(logits, targets)
    assert float(loss) == 0.0
    assert dlogits.shape == logits.shape and np.all(dlogits == 0)


def test_cross_entropy_rejects_bad_targets(backend):
    logits = np.zeros((2, 3, 5))
    with pytest.raises(ValueError):
        npgpt.cross_entropy(logits, np.full((2, 3), 5))
    with pytest.raises(ValueError):
        npgpt.cross_entropy(logits, np.full((2, 3), -1))
    with pytest.raises(ValueError):
        npgpt.cross_entropy(logits, np.zeros((2, 4), dtype=int))
    with pytest.raises(ValueError):
        npgpt.cross_entropy(logits, np.zeros((2, 3)))      # float targets


# ----------------------------------------------------------------------------- the whole model

TINY = dict(n_vocab=23, n_ctx=8, n_embd=8, n_head=2, n_layer=2)


def tiny_model(randomize, dropout=0.0, seed=0):
    cfg = npgpt.GPTConfig(**TINY, dropout=dropout)
    model = npgpt.GPT(cfg, dtype=F64, seed=seed)
    return randomize(model, np.random.default_rng(seed + 100), weight_std=0.3, bias_std=0.2, gain_std=0.2)


def tiny_batch(seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, TINY["n_vocab"], size=(2, TINY["n_ctx"]))
    targets = rng.integers(0, TINY["n_vocab"], size=(2, TINY["n_ctx"]))
    targets[1, 2] = -100
    return idx, targets


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradcheck_model(backend, randomize, dropout):
    model = tiny_model(randomize, dropout=dropout).train()
    idx, targets = tiny_batch()
    results = npgpt.gradcheck_model(model, idx, targets)   # every element of every parameter
    table = format_table(results)
    names = [n for n, _ in model.named_parameters()]
    assert [f"{r.layer}.{r.parameter}" for r in results] == names, table
    sizes = {n: p.data.size for n, p in model.named_parameters()}
    for r in results:
        assert r.checked == sizes[f"{r.layer}.{r.parameter}"], table
        assert r.passed, "gradcheck_model failed:\n" + table
    if dropout:
        drops = [m for m in model.modules() if isinstance(m, Dropout)]
        assert len(drops) == 1 + 3 * TINY["n_layer"]
        assert all(d.mask is not None and (d.mask == 0).any() for d in drops)


def test_gradcheck_model_parallel_kernels(randomize, monkeypatch):
    """The same check with every Numba kernel on its parallel build (a subset of entries per tensor)."""
    from npgpt.fast import _jit
    monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 0)
    model = tiny_model(randomize, dropout=0.1).train()
    idx, targets = tiny_batch()
    with npgpt.fast.use_backend("numba"):
        results = npgpt.gradcheck_model(model, idx, targets, max_checks=24)
    table = format_table(results)
    assert len(results) == len(list(model.named_parameters()))
    assert all(r.passed for r in results), "gradcheck_model (parallel kernels) failed:\n" + table
