"""Regression tests of issue 12: the core that training and fine-tuning stand on.

Grad mode (npgpt.no_grad), inference that keeps no training caches, contiguous parameters,
parameters with no gradient left alone by AdamW and clipping, names of a nested GPT, containers
of parameters, sampling edge cases, gradcheck on non-contiguous inputs, Hugging Face dropout
fields, boolean dropout masks and cross_entropy's normalizer.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

import npgpt
from npgpt import GPT, AdamW, GPTConfig, clip_grad_norm
from npgpt.inference.kvcache import KVCache
from npgpt.layers import CausalSelfAttention, Dropout, Linear, Module, Parameter
from npgpt.inference.sampling import Sampler, sample_from_probs, top_p_filter

TINY = dict(n_vocab=29, n_ctx=10, n_embd=12, n_head=3, n_layer=2)


def tiny(randomize, dtype=np.float64, seed=0, dropout=0.0):
    model = GPT(GPTConfig(**TINY, dropout=dropout), dtype=dtype, seed=seed)
    return randomize(model, np.random.default_rng(seed + 1000), weight_std=0.2)


def batch(seed=0, B=2, T=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, TINY["n_vocab"], (B, T)), rng.integers(0, TINY["n_vocab"], (B, T))


def grads_of(model, idx, targets):
    model.zero_grad()
    _, dlogits = npgpt.cross_entropy(model.forward(idx), targets)
    model.backward(dlogits)
    return {n: g.copy() for n, g in model.named_grads()}


# ----------------------------------------------------------------------------- 1. grad mode

def test_cached_sample_between_forward_and_backward_leaves_the_gradients_exact(backend, randomize):
    """A KV-cached sample runs the model's layers under no_grad, which keeps nothing and leaves the
    training forward's caches alone: the backward after it gives exactly the gradients without it."""
    model = tiny(randomize)
    idx, targets = batch()
    expected = grads_of(model, idx, targets)
    model.zero_grad()
    logits = model.forward(idx)
    other, _ = batch(seed=1)                                     # a sample of the same shape in between
    model.forward_cached(other, KVCache.for_model(model, other.shape[0]), last_only=False)
    with npgpt.no_grad():
        model.forward(other[:, :3])                              # and an evaluation of another shape
    _, dlogits = npgpt.cross_entropy(logits, targets)
    model.backward(dlogits)
    for n, g in model.named_grads():
        np.testing.assert_array_equal(g, expected[n], err_msg=n)
    # sampling after backward (before the optimizer step) leaves the gradients exact too
    model.zero_grad()
    _, dlogits = npgpt.cross_entropy(model.forward(idx), targets)
    model.backward(dlogits)
    model.forward_cached(other, KVCache.for_model(model, other.shape[0]), last_only=False)
    for n, g in model.named_grads():
        np.testing.assert_array_equal(g, expected[n], err_msg=n)


def test_grad_mode_context_and_decorator():
    assert npgpt.is_grad_enabled()
    with npgpt.no_grad():
        assert not npgpt.is_grad_enabled()
        with npgpt.no_grad():
            assert not npgpt.is_grad_enabled()
        assert not npgpt.is_grad_enabled()
    assert npgpt.is_grad_enabled()

    @npgpt.no_grad()
    def inside():
        return npgpt.is_grad_enabled()
    assert inside() is False and npgpt.is_grad_enabled()
    with pytest.raises(KeyError):                                # restored on an exception too
        with npgpt.no_grad():
            raise KeyError
    assert npgpt.is_grad_enabled()


def activation_arrays(model):
    return [(type(m).__name__, k) for m in model.modules() for k, v in vars(m).items() if isinstance(v, np.ndarray)]


def test_no_grad_forward_keeps_no_activations(backend, randomize):
    model = tiny(randomize, dropout=0.2)                         # train mode: dropout applies, no mask kept
    idx, targets = batch()
    with npgpt.no_grad():
        logits = model.forward(idx)
    assert activation_arrays(model) == []                        # an evaluation keeps nothing
    assert np.isfinite(logits).all()
    model.forward(idx)
    kept = {(id(m), k): id(v) for m in model.modules() for k, v in vars(m).items() if isinstance(v, np.ndarray)}
    assert kept                                                  # a training forward keeps its caches
    with npgpt.no_grad():
        model.forward(idx[:, :5])
    after = {(id(m), k): id(v) for m in model.modules() for k, v in vars(m).items() if isinstance(v, np.ndarray)}
    assert after == kept                                         # and no_grad leaves them be


def test_backward_after_no_grad_forward_raises(backend, randomize):
    model = tiny(randomize)
    idx, targets = batch()
    with npgpt.no_grad():                                        # no training forward behind this backward
        logits = model.forward(idx)
    _, dlogits = npgpt.cross_entropy(logits, targets)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(dlogits)
    layer = Linear(3, 2, dtype=np.float64, rng=np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="forward"):           # no forward at all
        layer.backward(np.ones((4, 2)))
    drop = Dropout(0.0)
    with npgpt.no_grad():
        drop(np.ones(3))
    with pytest.raises(RuntimeError, match="no_grad"):           # even an inactive dropout
        drop.backward(np.ones(3))


def test_no_grad_dropout_still_drops_in_training_mode():
    drop = Dropout(0.5, seed=0)
    with npgpt.no_grad():
        y = drop(np.ones((64, 64)))
    assert (y == 0).any() and drop.mask is None


class Doubled(Module):
    """A swapped-in module: the wrapped one's output times two."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return 2.0 * self.inner(x)


def test_forward_cached_runs_the_model_own_modules(backend, randomize):
    model = tiny(randomize).eval()
    idx, _ = batch(T=5)
    plain = model.forward_cached(idx, KVCache.for_model(model, 2))
    model.lm_head = Doubled(model.lm_head)
    model.h[1].mlp = Doubled(model.h[1].mlp)
    got = model.forward_cached(idx, KVCache.for_model(model, 2))
    assert model.lm_head.calls == 1 and model.h[1].mlp.calls == 1
    model.lm_head = model.lm_head.inner
    model.h[1].mlp = model.h[1].mlp.inner
    assert not np.allclose(got, 2.0 * plain)                     # the doubled MLP changed the output
    model.h[1].mlp = Doubled(model.h[1].mlp)
    np.testing.assert_allclose(model.forward(idx)[:, -1], model.forward_cached(idx, KVCache.for_model(model, 2)),
                               rtol=1e-12, atol=1e-12)


def test_forward_cached_never_drops_even_in_train_mode(backend, randomize):
    model = tiny(randomize, dropout=0.5)
    idx, _ = batch(T=6)
    assert model.training
    got = model.forward_cached(idx, KVCache.for_model(model, 2), last_only=False)
    assert all(m.training for m in model.modules())              # the mode is restored
    with npgpt.no_grad():
        expected = model.eval().forward(idx)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_position_embedding_forward_cached_per_row_positions():
    from npgpt.layers import PositionEmbedding
    wpe = PositionEmbedding(8, 3, dtype=np.float64, rng=np.random.default_rng(0))
    pos = np.array([[2, 3], [5, 6]])
    np.testing.assert_array_equal(wpe.forward_cached(pos), wpe.weight.data[pos])


# ----------------------------------------------------------------------------- 2. contiguous parameters

class One(Module):
    def __init__(self, data):
        self.w = Parameter(data)


def test_parameter_is_c_contiguous_and_adamw_moves_it(backend):
    f_ordered = np.arange(6.).reshape(2, 3).T                    # (3, 2), not C-contiguous
    m = One(f_ordered.copy(order="F"))
    assert m.w.data.flags.c_contiguous
    np.testing.assert_array_equal(m.w.data, f_ordered)
    m.w.data = np.asfortranarray(np.ones((4, 5)))
    assert m.w.data.flags.c_contiguous
    m.w.data = f_ordered.copy(order="F")
    m.zero_grad()
    m.w.grad[...] = 1.0
    before = m.w.data.copy()
    AdamW(m, lr=0.1, weight_decay=0.0).step()
    np.testing.assert_allclose(m.w.data, before - 0.1, rtol=1e-6)


def test_numba_kernels_refuse_non_contiguous():
    from npgpt.fast import adamw
    a = np.ones((4, 3)).T
    with pytest.raises(ValueError, match="contiguous"):
        adamw.adamw_update(a, a, a, a, 0.1, 0.9, 0.95, 1e-8, 0.0, 0.1, 0.05)
    with pytest.raises(ValueError, match="contiguous"):
        adamw.scale_(a, 0.5)
    with pytest.raises(ValueError, match="contiguous"):
        adamw.sum_of_squares(a)


# ----------------------------------------------------------------------------- 3. no gradient, no step

def test_parameters_without_gradient_are_left_alone(backend, randomize):
    model = tiny(randomize)
    idx, targets = batch()
    opt = AdamW(model, lr=0.01, weight_decay=0.1)
    grads_of(model, idx, targets)
    opt.step()                                                   # every moment is now non-zero
    model.zero_grad()
    touched = model.h[0].mlp.c_fc.weight
    touched.grad += 1.0                                          # only this one receives a gradient
    assert touched.has_grad and not model.wpe.weight.has_grad
    names = {n for n, g in model.named_grads() if g is not None}
    assert names == {"transformer.h.0.mlp.c_fc.weight"}
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    m_before = {n: m.copy() for n, m in opt.m.items()}
    norm = clip_grad_norm(model, 1e-3)
    assert norm == pytest.approx(math.sqrt(touched.data.size))
    opt.step()
    for n, p in model.named_parameters():
        if p is touched:
            assert not np.array_equal(p.data, before[n])
        else:
            np.testing.assert_array_equal(p.data, before[n], err_msg=n)
            np.testing.assert_array_equal(opt.m[n], m_before[n], err_msg=n)


# ----------------------------------------------------------------------------- 4. names and containers

class Classifier(Module):
    def __init__(self, gpt):
        self.gpt = gpt
        self.head = Linear(gpt.config.n_embd, 2, dtype=gpt.dtype, rng=np.random.default_rng(0))


def test_nested_gpt_names_and_state_dict(randomize):
    clf = Classifier(tiny(randomize))
    names = [n for n, _ in clf.named_parameters()]
    assert names[0] == "gpt.transformer.wte.weight" and names[-2:] == ["head.weight", "head.bias"]
    assert "gpt.transformer.h.1.mlp.c_proj.bias" in names
    state = {k: v.copy() for k, v in clf.state_dict().items()}
    assert list(state) == names
    other = Classifier(tiny(randomize, seed=7))
    assert other.load_state_dict(state) is other
    for (n, p), (_, q) in zip(clf.named_parameters(), other.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({k: v for k, v in state.items() if k != "head.bias"})
    # a swapped, untied LM head is named as in Hugging Face: lm_head.weight
    gpt = tiny(randomize)
    gpt.lm_head = Linear(gpt.config.n_embd, gpt.config.n_vocab, dtype=gpt.dtype)
    assert [n for n, _ in gpt.named_parameters()][-2:] == ["lm_head.weight", "lm_head.bias"]


class Holder(Module):
    def __init__(self):
        self.layers = [Linear(2, 2, dtype=np.float64), Linear(2, 3, dtype=np.float64)]
        self.heads = {"a": Linear(3, 1, dtype=np.float64)}
        self.extra = (Parameter(np.zeros(4)),)


def test_module_finds_parameters_in_lists_tuples_and_dicts():
    m = Holder()
    assert [n for n, _ in m.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
        "heads.a.weight", "heads.a.bias", "extra.0"]
    assert len(list(m.modules())) == 4
    m.zero_grad()
    assert set(m.state_dict()) == {n for n, _ in m.named_parameters()}


# ----------------------------------------------------------------------------- 5. sampling

def test_tiny_top_p_keeps_the_most_likely_token():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    for p in (1e-9, 1e-12, 1e-300):
        np.testing.assert_array_equal(top_p_filter(probs, p), [[0, 1, 0], [1, 0, 0]])
    tok = Sampler(1.0, top_p=1e-12, seed=0)(np.log(probs))
    np.testing.assert_array_equal(tok, [1, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_sample_from_probs_rejects_non_finite(bad):
    probs = np.array([[0.2, 0.8], [0.5, bad]])
    with pytest.raises(ValueError, match="finite"):
        sample_from_probs(probs, np.random.default_rng(0))


# ----------------------------------------------------------------------------- 7. smaller ones

def test_gradcheck_non_contiguous_input(backend):
    from npgpt.gradcheck import gradcheck_layer
    layer = Linear(4, 3, dtype=np.float64, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((4, 5, 2)).transpose(2, 1, 0)    # (2, 5, 4), a view
    assert not x.flags.c_contiguous
    results = gradcheck_layer(layer, x)
    assert all(r.passed for r in results), [(r.parameter, r.max_rel_error) for r in results]


def test_config_from_hf_reads_every_dropout_field():
    from npgpt.io.safetensors import config_from_hf
    base = dict(model_type="gpt2", vocab_size=29, n_positions=10, n_embd=12, n_head=3, n_layer=2)
    assert config_from_hf({**base, "resid_pdrop": 0.1, "attn_pdrop": 0.1, "embd_pdrop": 0.1}, "c").dropout == 0.1
    assert config_from_hf(base, "c").dropout == 0.0
    with pytest.raises(ValueError, match="attn_pdrop"):
        config_from_hf({**base, "resid_pdrop": 0.1, "attn_pdrop": 0.2, "embd_pdrop": 0.1}, "c")
    with pytest.raises(ValueError, match="embd_pdrop"):
        config_from_hf({**base, "embd_pdrop": 0.1}, "c")


def test_dropout_mask_is_bool_and_attention_keeps_no_a_drop(backend):
    drop = Dropout(0.3, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    y = drop(x)
    assert drop.mask.dtype == bool and y.dtype == np.float32
    np.testing.assert_allclose(y, np.where(drop.mask, x / np.float32(0.7), 0), rtol=1e-6)
    attn = CausalSelfAttention(8, 2, dtype=np.float64, rng=np.random.default_rng(0), dropout=0.2, seed=0)
    attn(np.random.default_rng(1).standard_normal((2, 5, 8)))
    assert not isinstance(getattr(attn, "a_drop", None), np.ndarray)
    assert attn.attn_dropout.mask.dtype == bool


def test_cross_entropy_normalizer_accumulates_micro_batches_exactly(backend, randomize):
    model = tiny(randomize)
    idx, targets = batch(B=2, T=8)
    targets[0, :5] = -100                                        # row 0: 3 targets, row 1: 8
    n = int((targets != -100).sum())
    full = grads_of(model, idx, targets)
    full_loss, _ = npgpt.cross_entropy(model.forward(idx), targets)
    model.zero_grad()
    total = 0.0
    for b in range(2):
        logits = model.forward(idx[b:b + 1])
        loss, dlogits = npgpt.cross_entropy(logits, targets[b:b + 1], normalizer=n, out=logits)
        model.backward(dlogits)
        total += float(loss)
    assert total == pytest.approx(float(full_loss), rel=1e-12)
    for name, g in model.named_grads():
        np.testing.assert_allclose(g, full[name], rtol=0, atol=1e-12 * np.abs(full[name]).max(), err_msg=name)
    with pytest.raises(ValueError, match="normalizer"):
        npgpt.cross_entropy(logits, targets[:1], normalizer=0)


def test_cross_entropy_normalizer_reference_and_kernel_agree():
    from npgpt.fast import cross_entropy_forward_backward
    from npgpt.loss import cross_entropy_numpy
    rng = np.random.default_rng(0)
    logits, t = rng.standard_normal((6, 11)), rng.integers(0, 11, 6)
    t[2] = -100
    l1, d1 = cross_entropy_numpy(logits, t, normalizer=17.0)
    l2, d2 = cross_entropy_forward_backward(logits, t, -100, normalizer=17.0)
    l0, d0 = cross_entropy_numpy(logits, t)
    np.testing.assert_allclose([l1, l2], l0 * 5 / 17.0, rtol=1e-12)
    np.testing.assert_allclose(d1, d0 * 5 / 17.0, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d2, d1, rtol=1e-12, atol=1e-15)


def test_eval_mode_reentered_and_with_a_given_module_list():
    """eval_mode inside eval_mode of the same module does not walk or restore twice; with the module
    list given it sets exactly those; every mode comes back afterwards."""
    model = GPT(GPTConfig(n_vocab=32, n_ctx=8, n_embd=8, n_head=2, n_layer=2, dropout=0.1), dtype=np.float64, seed=0)
    model.train()
    model.h[1].eval()                                       # a mixed state, restored exactly
    before = [m.training for m in model.modules()]
    mods = list(model.modules())
    with model.eval_mode(mods):
        assert not any(m.training for m in model.modules())
        with model.eval_mode():
            assert not any(m.training for m in model.modules())
        assert not any(m.training for m in model.modules())    # the inner exit restored nothing
    assert [m.training for m in model.modules()] == before


def test_decoder_leaves_training_mode_alone():
    """Sampling from a model in training mode (as fit's sampler does) runs without dropout and leaves
    every module's mode as it was."""
    from npgpt.inference.decode import generate
    model = GPT(GPTConfig(n_vocab=32, n_ctx=16, n_embd=8, n_head=2, n_layer=2, dropout=0.5), dtype=np.float64, seed=0)
    model.train()
    a = generate(model, np.array([[1, 2, 3]]), 5)
    b = generate(model, np.array([[1, 2, 3]]), 5)
    np.testing.assert_array_equal(a, b)                     # no dropout: greedy decoding is deterministic
    assert all(m.training for m in model.modules())


def test_spin_between_kernels_sets_gomp_spincount_once(monkeypatch):
    from npgpt.fast import settings
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert settings.spin_between_kernels() is True
    assert os.environ["GOMP_SPINCOUNT"] == settings.INFERENCE_SPIN_COUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    assert settings.spin_between_kernels() is False        # the user's value wins
    assert os.environ["GOMP_SPINCOUNT"] == "123"
