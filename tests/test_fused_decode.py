"""npgpt.inference.fused: a packed-weight model's (bf16, int8, or float32 rows: decode_layout) decoded token with each block one compiled call
(npgpt.fast.decode.decode_block) gives the model's own modules' logits (GPT.forward_cached), token for
token, and the plan refuses every model it does not mirror.

The two paths run the same kernels' code, but compiled into different functions: where a kernel lets the
compiler reassociate its sums (bf16's products of many rows, LayerNorm, attention), the two builds may round a sum
differently, and int8's products round their inputs to 16 bits, which turns such a difference into one
step of 1/32767 of a block's largest value now and then. So the logits are held to 1e-4 of their size
(the check of decoding against the full forward), not to the bit. Both paths are fed the same tokens,
so that one rounding cannot change what follows."""
from __future__ import annotations

import os

import numpy as np
import pytest

import npgpt
from npgpt import fast
from npgpt.fast import decode as decode_kernels
from npgpt.inference import fused
from npgpt.inference.decode import Decoder
from npgpt.inference.quant import decode_layout, quantize

KINDS = ["bf16", "int8", "fp32 rows"]


def _model(kind, seed=3, **cfg):
    """A packed model whose every parameter is random: LayerNorm gains away from 1, biases away from 0 (a
    fresh GPT's are 1 and 0, which would hide a gain or a bias read from the wrong place)."""
    base = dict(n_layer=2, n_embd=48, n_head=4, n_ctx=40, n_vocab=97)
    model = npgpt.GPT(npgpt.GPTConfig(**{**base, **cfg}), seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.data.ndim == 1:                   # LayerNorm gains
            p.data[...] = rng.uniform(0.5, 1.5, p.data.shape)
        elif name.endswith(".bias"):
            p.data[...] = rng.normal(0, 0.1, p.data.shape)
    return decode_layout(model) if kind == "fp32 rows" else quantize(model, kind)


def _decode(model, prompts, tokens, compiled):
    """Logits after the prompts and after each step of tokens (steps, B), (steps + 1, B, V), how many
    block calls ran (decode_block's, with the constants the plan prepared), and the Decoder (its cache)."""
    calls = []
    real = decode_kernels.run_block

    def counted(*a):
        calls.append(1)
        return real(*a)
    dec = Decoder(model, len(prompts), max(map(len, prompts)) + len(tokens), compiled=compiled)
    out = [dec.prefill(prompts)]
    fast.run_block = counted                    # fast's attribute is what fused.step calls
    try:
        for step in tokens:
            out.append(dec.step(step))
    finally:
        fast.run_block = real
    return np.stack(out), len(calls), dec


def _same_cache(a, b):
    """Two Decoders' caches: the same lengths, and the same keys and values where they are filled."""
    np.testing.assert_array_equal(a.cache.lengths, b.cache.lengths)
    for l in range(len(a.cache.k)):
        for kv_a, kv_b in ((a.cache.k[l], b.cache.k[l]), (a.cache.v[l], b.cache.v[l])):
            for r, n in enumerate(a.cache.lengths):
                _close(kv_a[r, :, :n], kv_b[r, :, :n])


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    assert np.isfinite(a).all()


@pytest.mark.parametrize("kind, lengths", [(k, n) for k in KINDS for n in ([5], [7, 3, 6])] +  # one row; ragged rows
                         [(k, [4, 9, 2, 6, 5, 3, 8]) for k in ("fp32 rows", "bf16", "int8")] +  # 7: 4 + 2 + 1 (int8: 4 + 3)
                         [("int8", [4, 9, 2, 6, 5, 3, 8, 7, 5])] +                               # int8: 4 + 4 + 1
                         [("bf16", [4, 9, 2, 6, 5, 3, 8, 7, 5, 6])])     # 10 rows: the block built with the loops
def test_compiled_blocks_give_the_modules_logits(kind, lengths):
    model = _model(kind)
    lengths = lengths[:fused.max_rows(fused.plan(model)[0][3][0])]     # float32 rows: 4 without AVX-512
    rng = np.random.default_rng(len(lengths))
    prompts = [rng.integers(0, 97, n) for n in lengths]
    tokens = rng.integers(0, 97, (45, len(lengths)))     # past n_ctx = 40: the window slides (a re-prefill)
    compiled, calls, dec_c = _decode(model, prompts, tokens, True)
    modules, none, dec_m = _decode(model, prompts, tokens, False)
    assert none == 0 and calls >= model.config.n_layer * (len(tokens) - 2)      # it did run, block by block
    _close(compiled, modules)
    _same_cache(dec_c, dec_m)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_blocks_parallel_products(kind):
    """A model wide enough that its MLP products (4C x C >= 2^18) and attention run the parallel builds."""
    model = _model(kind, n_layer=1, n_embd=256, n_head=4, n_ctx=16, n_vocab=50)
    prompts = [np.arange(4), np.arange(6)]
    tokens = np.random.default_rng(0).integers(0, 50, (6, 2))
    compiled, calls, dec_c = _decode(model, prompts, tokens, True)
    modules, _, dec_m = _decode(model, prompts, tokens, False)
    assert calls == 6
    _close(compiled, modules)
    _same_cache(dec_c, dec_m)


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_plans_at_every_prefill(kind):
    """New parameters put into the model between two sequences (load_state_dict with assign=True makes
    the given arrays the parameters: here every LayerNorm and bias; the packed weights are not parameters):
    the next prefill's plan holds them, so the compiled blocks follow."""
    model, other = _model(kind), _model(kind, seed=4)
    prompts, tokens = [np.arange(5)], np.random.default_rng(5).integers(0, 97, (4, 1))
    dec = Decoder(model, 1, 5 + len(tokens))
    before = dec.prefill(prompts)
    model.load_state_dict({k: v.copy() for k, v in other.state_dict().items()}, assign=True)
    after = [dec.prefill(prompts)] + [dec.step(t) for t in tokens]
    assert dec._blocks[0][0][0] is model.h[0].ln_1.weight.data             # the plan holds the new arrays,
    assert dec._blocks[0][-1][0][0] is model.h[0].ln_1.weight.data         # in the call's prepared arguments too
    reference, _, _ = _decode(model, prompts, tokens, False)
    _close(np.stack(after), reference)
    assert np.abs(before - after[0]).max() > 1e-2                          # the new parameters did matter


@pytest.mark.parametrize("kind", KINDS)
def test_prepared_block_call_is_decode_block(kind):
    """The plan's prepared arguments (block_constants, run_block) make the very call of the kernel that its
    arguments spelled out here make: the same x and cache, bit for bit; decode_block (the arguments made on
    the spot) too."""
    model = _model(kind)
    dec = Decoder(model, 2, 8)
    dec.prefill([np.arange(5), np.arange(3)])
    block = dec._blocks[0]
    x = np.random.default_rng(6).normal(0, 1, (2, model.config.n_embd)).astype(np.float32)
    pos = np.array([5, 3], dtype=np.int64)
    (g1, b1), (g2, b2), eps, *weights, scale = block[:8]
    from npgpt.fast import gelu, quant as fast_quant
    spelled = [g1, b1, g2, b2, float(eps)]
    for w, s, b in weights:
        spelled += [w, np.ones(1, np.float32) if s is None else s, b]
    outs = []
    for call in ("spelled out", "run_block", "decode_block"):
        y, k, v = x.copy(), dec.cache.k[0].copy(), dec.cache.v[0].copy()
        if call == "spelled out":
            kernel = decode_kernels.block_kernel(len(y), fast_quant.side_by_side(), kind == "int8")
            kernel(y, *spelled, k, v, pos, np.float32(scale), *gelu._constants(np.float32),
                   fast_quant.side_by_side(), *(fast_quant.prefetch_ahead(w) for w, _, _ in weights))
        elif call == "run_block":
            decode_kernels.run_block(y, block[-1], k, v, pos)
        else:
            decode_kernels.decode_block(y, *block[:7], k, v, pos, block[7])
        outs.append((y, k, v))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(outs[0][0], x)                                 # the block did run


def test_plan_refuses_what_it_does_not_mirror():
    assert fused.plan(npgpt.GPT(npgpt.GPTConfig(n_layer=1, n_embd=16, n_head=2, n_ctx=8, n_vocab=11))) is None  # float32
    model = _model("int8")
    assert len(fused.plan(model)) == model.config.n_layer
    with fast.use_backend("numpy"):
        assert fused.plan(model) is None
    swapped = _model("int8")
    swapped.h[1].mlp.gelu = type("Other", (npgpt.layers.GELU,), {})()      # a subclass: its own forward may differ
    assert fused.plan(swapped) is None
    assert len(fused.plan(_model("bf16"))) == model.config.n_layer          # bf16 is planned as it is
    assert len(fused.plan(_model("fp32 rows"))) == model.config.n_layer     # float32 once laid out as rows
    eps = _model("bf16")
    eps.h[0].ln_2.eps = 1e-3
    assert fused.plan(eps) is None
    dropout = _model("bf16")
    dropout.h[0].attn.resid_dropout = type("Other", (npgpt.layers.Dropout,), {})(0.0)
    assert fused.plan(dropout) is None
    sub = _model("int8")
    sub.__class__ = type("MyGPT", (npgpt.GPT,), {})                        # its forward_cached may be its own
    assert fused.plan(sub) is None


@pytest.mark.parametrize("kind", ["int8", "fp32 rows"])
def test_step_leaves_wide_batches_to_the_modules(kind):
    """More rows than step() takes (int8: the packed kernels' 16, float32 rows: fast.dots_limit()): it
    declines, the Decoder runs the modules."""
    model = _model(kind, n_layer=1, n_ctx=8)
    blocks = fused.plan(model)
    from npgpt.inference.kvcache import KVCache
    B = fused.max_rows(blocks[0][3][0]) + 1
    cache = KVCache.for_model(model, B)
    model.forward_cached(np.zeros((B, 2), np.int64), cache)
    assert fused.step(model, blocks, np.zeros((B, 1), np.int64), cache) is None
    wide, calls, _ = _decode(model, [np.arange(3)] * B, np.zeros((3, B), np.int64), True)
    assert calls == 0 and np.isfinite(wide).all()
    small = KVCache.for_model(model, 2)
    model.forward_cached(np.zeros((2, 2), np.int64), small)
    assert fused.step(model, blocks, np.zeros((2, 2), np.int64), small) is None            # T = 2: not a decode step
    with fast.use_backend("numpy"):
        assert fused.step(model, blocks, np.zeros((2, 1), np.int64), small) is None


def test_the_block_build_follows_the_rows_and_the_weights():
    """decode_block's two builds (quant.uses_dots): few_rows's dot products up to DOT_ROWS rows of x, except
    one row where side_by_side() says 4; the Numba loops above; int8 runs its own products in either, and
    takes the dot products' build."""
    from npgpt.fast import quant as fast_quant
    for sbs in (1, 4):
        for rows in range(1, fast_quant.DOT_ROWS + 3):
            dots = rows <= fast_quant.DOT_ROWS and not (rows == 1 and sbs == 4)
            assert decode_kernels.block_kernel(rows, sbs, False) is decode_kernels.BLOCKS[dots]
            assert decode_kernels.block_kernel(rows, sbs, True) is decode_kernels.BLOCKS[True]


def test_a_one_row_generate_compiles_only_the_builds_it_runs():
    """What the two builds are for: a first `npgpt generate` (one row) compiles the block and the float
    product with the dot products or with the loops, not both (in a fresh process: nothing else ran there)."""
    import subprocess
    import sys
    if not fast.use_numba():
        pytest.skip("the NumPy kernels compile nothing")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = os.path.join(root, "tests", "fixtures", "tiny_hf")
    code = ("from npgpt.cli import main; from npgpt.fast import decode, quant\n"
            f"assert main(['generate', '--model', {tiny!r}, '-n', '3', '1+1']) == 0\n"
            "dots = quant.uses_dots(1, quant.side_by_side())\n"
            "other = quant._MATMUL[not dots]\n"
            "print(len(decode.BLOCKS[dots].signatures), len(decode.BLOCKS[not dots].signatures),\n"
            "      len(other.serial.signatures) + len(other.parallel.signatures),\n"
            "      len((quant._chunk if dots else quant._dots).signatures))")        # the other kind's own code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stderr[-2000:]
    ran, other_block, other_product, other_code = map(int, r.stdout.split()[-4:])
    assert ran >= 1 and other_block == other_product == other_code == 0
