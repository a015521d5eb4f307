"""Negative controls: gradcheck must catch subtly wrong backward passes, and refuse float32.

A gradient checker that always says PASS is worse than none, so here each layer's backward
is monkeypatched to a plausible mistake and the affected entries must FAIL while the
unaffected ones still PASS.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import npgpt
import npgpt.fast
from npgpt.gradcheck import format_table
from npgpt.layers import GELU, CausalSelfAttention, LayerNorm, Linear
from npgpt.layers import attention as attention_mod

F64 = np.float64


def by_name(results):
    return {r.parameter: r for r in results}


def layernorm_backward_without_term3(self, dy):
    """The classic mistake: forgetting that rstd depends on x (the variance path)."""
    xhat, rstd, g = self.xhat, self.rstd, self.weight.data
    C = xhat.shape[-1]
    rows = tuple(range(dy.ndim - 1))
    self.weight.grad += (dy * xhat).sum(axis=rows)
    self.bias.grad += dy.sum(axis=rows)
    dxhat = dy * g
    return rstd * (dxhat - dxhat.sum(axis=-1, keepdims=True) / C)


_erf = np.vectorize(math.erf)


def gelu_forward_keeping_input(self, x, bias=None):
    """GELU's forward, keeping its input for the backward below (the Numba forward keeps only dgelu/dx)."""
    self.input = np.array(x, copy=True)
    return REAL_GELU_FORWARD(self, x, bias)


REAL_GELU_FORWARD = GELU.forward


def gelu_backward_exact_erf(self, dy):
    """The derivative of the exact GELU x * Phi(x), not of the tanh approximation that forward computes."""
    x = self.input
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (cdf + x * pdf)


def softmax_backward_without_scale(da, a, scale):
    """Forgets the 1/sqrt(hs) of s = q k^T / sqrt(hs)."""
    return a * (da - (da * a).sum(axis=-1, keepdims=True))


def test_layernorm_missing_term3_fails(backend, monkeypatch, randomize):
    rng = np.random.default_rng(0)
    layer = randomize(LayerNorm(6, dtype=F64), rng, bias_std=0.5, gain_std=0.5)
    x = 1.0 + 2.0 * rng.standard_normal((3, 4, 6))
    assert all(r.passed for r in npgpt.gradcheck_layer(layer, x))
    monkeypatch.setattr(LayerNorm, "backward", layernorm_backward_without_term3)
    res = by_name(npgpt.gradcheck_layer(layer, x))
    table = format_table(res.values())
    assert not res["input 0"].passed and res["input 0"].max_rel_error > 1e-3, table
    assert res["weight"].passed and res["bias"].passed, table       # those do not use term 3
    assert "FAIL" in table


def test_gelu_exact_erf_derivative_fails(backend, monkeypatch):
    rng = np.random.default_rng(1)
    x = 2.0 * rng.standard_normal((2, 3, 7))
    assert all(r.passed for r in npgpt.gradcheck_layer(GELU(), x))
    monkeypatch.setattr(GELU, "forward", gelu_forward_keeping_input)
    monkeypatch.setattr(GELU, "backward", gelu_backward_exact_erf)
    (res,) = npgpt.gradcheck_layer(GELU(), x)
    # the two derivatives differ by at most ~1e-3: subtle, but far above the 1e-6 tolerance
    assert not res.passed and res.max_rel_error > 1e-5, format_table([res])


def test_attention_softmax_backward_without_scale_fails(backend, monkeypatch, randomize):
    rng = np.random.default_rng(2)
    layer = randomize(CausalSelfAttention(8, 2, dtype=F64, rng=rng, seed=3), rng, weight_std=0.4, bias_std=0.3)
    x = rng.standard_normal((2, 5, 8))
    assert all(r.passed for r in npgpt.gradcheck_layer(layer, x))
    # the softmax kernels are the readable core's; the per-head and fused kernels have their own
    # (tests/test_flash_attention.py holds them to the readable core)
    monkeypatch.setattr(layer, "core", lambda T: "readable")
    monkeypatch.setattr(attention_mod, "causal_softmax_backward_numpy", softmax_backward_without_scale)
    monkeypatch.setattr(npgpt.fast, "causal_softmax_backward",
                        lambda da, a, scale: softmax_backward_without_scale(da, a, scale), raising=False)
    res = by_name(npgpt.gradcheck_layer(layer, x))
    table = format_table(res.values())
    for bad in ("input 0", "c_attn.weight", "c_attn.bias"):      # q and k go through the softmax
        assert not res[bad].passed, table
    for good in ("c_proj.weight", "c_proj.bias"):                # after the softmax: unaffected
        assert res[good].passed, table


def test_model_with_wrong_layernorm_backward_fails(backend, monkeypatch, randomize):
    cfg = npgpt.GPTConfig(n_vocab=13, n_ctx=6, n_embd=8, n_head=2, n_layer=1)
    model = randomize(npgpt.GPT(cfg, dtype=F64, seed=0), np.random.default_rng(1), weight_std=0.3, bias_std=0.2,
                      gain_std=0.2)
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 13, size=(2, 6)), rng.integers(0, 13, size=(2, 6))
    monkeypatch.setattr(LayerNorm, "backward", layernorm_backward_without_term3)
    results = npgpt.gradcheck_model(model, idx, targets, max_checks=40)
    table = format_table(results)
    for r in results:
        if r.layer == "transformer.ln_f":
            assert r.passed, table        # ln_f's own gain/bias gradients do not use term 3
        else:
            assert not r.passed, table    # everything below ln_f receives a wrong dx


def test_wrong_linear_bias_grad_fails(backend, monkeypatch):
    """Forgetting to sum the bias gradient over the batch (only the first row)."""
    rng = np.random.default_rng(3)
    layer = Linear(4, 5, dtype=F64, rng=rng)
    layer.bias.data[:] = rng.standard_normal(5)
    x = rng.standard_normal((2, 3, 4))
    good_backward = Linear.backward

    def backward(self, dy):
        before = self.bias.grad.copy()
        dx = good_backward(self, dy)
        self.bias.grad[...] = before + dy.reshape(-1, dy.shape[-1])[0]
        return dx

    monkeypatch.setattr(Linear, "backward", backward)
    res = by_name(npgpt.gradcheck_layer(layer, x))
    assert res["input 0"].passed and res["weight"].passed and not res["bias"].passed


def test_nan_gradient_fails(backend, monkeypatch):
    x = np.random.default_rng(4).standard_normal((2, 3))
    monkeypatch.setattr(GELU, "backward", lambda self, dy: np.full_like(dy, np.nan))
    (res,) = npgpt.gradcheck_layer(GELU(), x)
    assert not res.passed


# ----------------------------------------------------------------------------- refusing float32

def test_gradcheck_model_refuses_float32(backend):
    cfg = npgpt.GPTConfig(n_vocab=13, n_ctx=6, n_embd=8, n_head=2, n_layer=1)
    model = npgpt.GPT(cfg, dtype=np.float32, seed=0)
    idx = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="float64"):
        npgpt.gradcheck_model(model, idx, idx)


def test_gradcheck_layer_refuses_float32(backend):
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="float64"):
        npgpt.gradcheck_layer(Linear(3, 4, dtype=np.float32, rng=rng), rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match="float64"):               # float64 layer, float32 input
        npgpt.gradcheck_layer(Linear(3, 4, dtype=F64, rng=rng), rng.standard_normal((2, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="float64"):
        npgpt.gradcheck_layer(GELU(), np.ones((2, 3), dtype=np.float32))
