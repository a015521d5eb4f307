"""npgpt.inference.fused: a packed-weight model's decoded token with each block one compiled call
(npgpt.fast.decode.decode_block) gives the model's own modules' logits (GPT.forward_cached), token for
token, and the plan refuses every model it does not mirror.

The two paths run the same kernels' code, but compiled into different functions: where a kernel lets the
compiler reassociate its sums (bf16's products, LayerNorm, attention), the two builds may round a sum
differently, and int8's products round their inputs to 16 bits, which turns such a difference into one
step of 1/32767 of a block's largest value now and then. So the logits are held to 1e-4 of their size
(the check of decoding against the full forward), not to the bit. Both paths are fed the same tokens,
so that one rounding cannot change what follows."""
from __future__ import annotations

import numpy as np
import pytest

import npgpt
from npgpt import fast
from npgpt.fast import decode as decode_kernels
from npgpt.inference import fused
from npgpt.inference.decode import Decoder
from npgpt.inference.quant import quantize

KINDS = ["bf16", "int8"]


def _model(kind, **cfg):
    base = dict(n_layer=2, n_embd=48, n_head=4, n_ctx=40, n_vocab=97)
    return quantize(npgpt.GPT(npgpt.GPTConfig(**{**base, **cfg}), seed=3), kind)


def _decode(model, prompts, tokens, compiled):
    """Logits after the prompts and after each step of tokens (steps, B), (steps + 1, B, V), and how many
    times decode_block ran."""
    calls = []
    real = decode_kernels.decode_block

    def counted(*a):
        calls.append(1)
        return real(*a)
    dec = Decoder(model, len(prompts), max(map(len, prompts)) + len(tokens))
    if not compiled:
        dec._blocks = None
    out = [dec.prefill(prompts)]
    fast.decode_block = counted                 # fast's attribute is what fused.step calls
    try:
        for step in tokens:
            out.append(dec.step(step))
    finally:
        fast.decode_block = real
    return np.stack(out), len(calls)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    assert np.isfinite(a).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths", [[5], [7, 3, 6]])          # one row; rows of different lengths (a ragged cache)
def test_compiled_blocks_give_the_modules_logits(kind, lengths):
    model = _model(kind)
    rng = np.random.default_rng(len(lengths))
    prompts = [rng.integers(0, 97, n) for n in lengths]
    tokens = rng.integers(0, 97, (45, len(lengths)))     # past n_ctx = 40: the window slides (a re-prefill)
    compiled, calls = _decode(model, prompts, tokens, True)
    modules, none = _decode(model, prompts, tokens, False)
    assert none == 0 and calls >= model.config.n_layer * (len(tokens) - 2)      # it did run, block by block
    _close(compiled, modules)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_blocks_parallel_products(kind):
    """A model wide enough that its MLP products (4C x C >= 2^18) and attention run the parallel builds."""
    model = _model(kind, n_layer=1, n_embd=256, n_head=4, n_ctx=16, n_vocab=50)
    prompts = [np.arange(4), np.arange(6)]
    tokens = np.random.default_rng(0).integers(0, 50, (6, 2))
    compiled, calls = _decode(model, prompts, tokens, True)
    modules, _ = _decode(model, prompts, tokens, False)
    assert calls == 6
    _close(compiled, modules)


def test_plan_refuses_what_it_does_not_mirror(monkeypatch):
    assert fused.plan(npgpt.GPT(npgpt.GPTConfig(n_layer=1, n_embd=16, n_head=2, n_ctx=8, n_vocab=11))) is None  # float32
    model = _model("int8")
    assert len(fused.plan(model)) == model.config.n_layer
    with fast.use_backend("numpy"):
        assert fused.plan(model) is None
    swapped = _model("int8")
    swapped.h[1].mlp.gelu = type("Other", (npgpt.layers.GELU,), {})()      # a subclass: its own forward may differ
    assert fused.plan(swapped) is None
    eps = _model("bf16")
    eps.h[0].ln_2.eps = 1e-3
    assert fused.plan(eps) is None


def test_step_leaves_wide_batches_to_the_modules():
    """More rows than step() takes (int8: fused.INT8_MAX_ROWS): it declines, the Decoder runs the modules."""
    model = _model("int8", n_layer=1, n_ctx=8)
    blocks = fused.plan(model)
    from npgpt.inference.kvcache import KVCache
    B = fused.INT8_MAX_ROWS + 1
    cache = KVCache.for_model(model, B)
    model.forward_cached(np.zeros((B, 2), np.int64), cache)
    assert fused.step(model, blocks, np.zeros((B, 1), np.int64), cache) is None
    wide, calls = _decode(model, [np.arange(3)] * B, np.zeros((3, B), np.int64), True)
    assert calls == 0 and np.isfinite(wide).all()
    small = KVCache.for_model(model, 2)
    model.forward_cached(np.zeros((2, 2), np.int64), small)
    assert fused.step(model, blocks, np.zeros((2, 2), np.int64), small) is None            # T = 2: not a decode step
    with fast.use_backend("numpy"):
        assert fused.step(model, blocks, np.zeros((2, 1), np.int64), small) is None
