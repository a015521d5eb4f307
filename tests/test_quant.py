"""npgpt.inference.quant: packed bf16 / int8 weights, their kernels against the NumPy lines they mirror, the
quantized model against float32, checkpoints and the CLI option."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import npgpt
from npgpt.inference import quant
from npgpt.inference.kvcache import KVCache

KINDS = ["bf16", "int8"]
CFG = dict(n_layer=2, n_embd=48, n_head=4, n_ctx=64, n_vocab=97)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bf16_rounds_to_nearest_even():
    f = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, -2.5, np.inf, np.nan, 0.0], np.float32)
    w = quant.unpack(quant.to_bf16(f))
    # 1 + 2^-8 is a tie: rounds to the even 1.0; 1 + 3*2^-8 is a tie: rounds up to the even 1 + 2^-6
    np.testing.assert_array_equal(w[[0, 1, 2, 3, 4, 5, 7]], [1.0, 1.0, 1.0 + 2 ** -6, 1.0, -2.5, np.inf, 0.0])
    assert np.isnan(w[6])
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    assert np.abs(quant.unpack(quant.to_bf16(x)) - x).max() <= np.abs(x).max() * 2 ** -8


def test_int8_symmetric_per_output_channel():
    w = np.random.default_rng(1).standard_normal((7, 13)).astype(np.float32)
    w[3] = 0.0                                                   # an all-zero channel
    q, s = quant.to_int8(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (7,)
    np.testing.assert_allclose(s, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127 and q.min() >= -127
    assert np.abs(quant.unpack(q, s) - w).max() <= s.max() / 2 + 1e-7
    np.testing.assert_array_equal(quant.unpack(q, s)[3], 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N, side_by_side, ahead", [(1, 4, 8), (1, 1, 0), (1, 1, 3), (3, 4, 0), (4, 4, 8), (9, 4, 2)])
# one row (both ways of streaming the weight rows, with and without the prefetch); fewer than, exactly,
# and more than a block of four rows of x
@pytest.mark.parametrize("parallel", [False, True])
def test_packed_matmul_matches_numpy(kind, N, side_by_side, ahead, parallel, monkeypatch):
    from npgpt.fast import _jit
    from npgpt.fast import quant as fast_quant
    from npgpt.fast.quant import packed_matmul
    if parallel:
        monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(fast_quant, "_SIDE_BY_SIDE", side_by_side)
    monkeypatch.setattr(fast_quant, "_AHEAD", ahead)
    rng = np.random.default_rng(N)
    O, K = 37, 53                                                # odd shapes, O not a multiple of the chunk
    packed, scale = quant.pack(rng.standard_normal((O, K)).astype(np.float32), kind)
    x = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    if kind == "int8":                                           # the NumPy lines the kernel mirrors
        ref = quant.q8_product(x, packed, scale) + b
    else:
        ref = x @ quant.unpack(packed, scale).T + b
    y = packed_matmul(x, packed, scale, b)
    assert y.shape == (N, O) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_quantize_activations_in_blocks_of_32():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 75)).astype(np.float32)           # blocks 32, 32 and a last one of 11
    x[0, 32:64] = 0.0                                             # an all-zero block
    x[1, 5], x[1, 40], x[2, 70] = np.nan, np.inf, -np.inf
    x[2, 32:64] *= np.float32(1e-36)                              # d ~ 3e-41 (subnormal): 1 / d overflows
    x16, d = quant.quantize_activations(x)
    assert x16.dtype == np.int16 and x16.shape == (3, 75) and d.dtype == np.float32 and d.shape == (3, 3)
    assert np.abs(x16).max() == 32767 and x16.min() >= -32767
    # every finite block: the largest |x| maps to 32767 and x within half a step of x16 * d
    for n, b in [(0, 0), (0, 2), (1, 2), (2, 0)]:
        xb, qb = x[n, 32 * b:32 * b + 32], x16[n, 32 * b:32 * b + 32]
        assert d[n, b] == np.abs(xb).max() / np.float32(32767) and np.abs(qb).max() == 32767
        assert np.abs(qb * np.float64(d[n, b]) - xb).max() <= d[n, b] / 2 * (1 + 1e-3)
    assert d[0, 1] == 0 and not x16[0, 32:64].any()
    assert np.isnan(d[1, 0]) and d[1, 1] == np.inf and d[2, 2] == np.inf
    assert not x16[1, :64].any() and not x16[2, 64:].any()      # non-finite blocks hold zeros, their d carries it
    assert 0 < d[2, 1] < 1e-38 and not x16[2, 32:64].any()      # a vanishing block: zeros, never inf * x
    # the kernel quantizes with the same IEEE operations: the same values
    from npgpt.fast.quant import quantize_q8
    f16, fd = quantize_q8(x)
    np.testing.assert_array_equal(f16, x16)
    np.testing.assert_array_equal(fd, d)                          # NaN where d is NaN
    # a NaN or an inf reaches the outputs of every channel as NaN, as in a float product
    q, s = quant.to_int8(rng.standard_normal((5, 75)).astype(np.float32))
    y = quant.q8_product(x, q, s)
    assert np.isfinite(y[0]).all() and np.isnan(y[1:]).all()
    from npgpt.fast.quant import packed_matmul
    yk = packed_matmul(x, q, s, None)
    assert np.isfinite(yk[0]).all() and np.isnan(yk[1:]).all()
    # a weight in another memory order (copied to C order) and no scale (1) give the same
    np.testing.assert_array_equal(packed_matmul(x[:1], np.asfortranarray(q), s, None), yk[:1])
    np.testing.assert_array_equal(packed_matmul(x[:1], q, None, None), packed_matmul(x[:1], q, np.ones(5, np.float32), None))
    # 16 bits: the product is the float one to ~1e-5 of its size (the weights' own rounding is ~1e-2)
    xf = rng.standard_normal((2, 75)).astype(np.float32)
    ref = xf @ quant.unpack(q, s).T
    assert np.abs(quant.q8_product(xf, q, s) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("K", [0 + 7, 32, 96, 160, 768 + 19])    # no whole block, one, three (odd), five, many + a tail
def test_q8_dot_every_instruction_path(K):
    """Each path this CPU runs (vpdpwssd, pmaddwd, plain vectors) gives sum_b d[b] * isum[b] with exact
    integer block sums (a partial last block's too), and all of them the same bits (the same float
    operations on the same integers)."""
    from numba import njit
    from npgpt.fast import _q8
    from npgpt.fast.quant import quantize_q8
    rng = np.random.default_rng(K)
    O = 6
    x = rng.standard_normal((1, K)).astype(np.float32) * np.float32(3.0)
    q, s = quant.to_int8(rng.standard_normal((O, K)).astype(np.float32))
    q[0] = 127                                                    # the largest products and lane sums
    q[1] = -127
    x[0, :min(32, K - K % 32)] = 1.0                              # a block of x16 = 32767: 4 * 32767 * 127 a lane
    x[0, 32:min(64, K - K % 32)] = -1.0                           # and of -32767 (row 1: positive)
    x16, d = quantize_q8(x)
    exact = np.array([sum(float(d[0, b]) * int(np.dot(x16[0, 32 * b:32 * b + 32].astype(np.int64),
                                                      q[o, 32 * b:32 * b + 32].astype(np.int64)))
                          for b in range(d.shape[1])) for o in range(O)])
    results, kernels = {}, {}
    for path in _q8.runnable():
        dot = _q8.q8_dot_using(path)

        @njit
        def rows(x16, d, q, dot=dot):
            return np.array([dot(x16, d, 0, q, o) for o in range(q.shape[0])], np.float32)
        kernels[path] = rows
        results[path] = rows(x16, d, q)
        np.testing.assert_allclose(results[path], exact, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(exact).max()))
    assert "portable" in results and (_q8.instructions() in results)
    for path, y in results.items():
        np.testing.assert_array_equal(y, results["portable"], err_msg=path)
    np.testing.assert_allclose(results["portable"], quant.q8_product(x, q, np.ones(O, np.float32))[0], rtol=1e-5, atol=1e-4)
    # the partial block is added last, in float32, as float32(float64(isum) * float64(d)) (0 without one)
    whole = K - K % 32
    part = np.array([np.float32(float(np.dot(x16[0, whole:].astype(np.int64), q[o, whole:].astype(np.int64)))
                                * np.float64(d[0, -1])) if whole < K else 0.0 for o in range(O)], np.float32)
    for path, rows in kernels.items():
        wholes = rows(x16[:, :whole].copy(), d[:, :whole // 32].copy(), q[:, :whole].copy())
        np.testing.assert_array_equal(results[path], wholes + part, err_msg=path)


@pytest.mark.parametrize("K", [7, 32, 160, 768 + 19])              # a partial block alone, whole ones, both
def test_q8_dot4_gives_each_row_the_bits_of_q8_dot(K):
    """Four rows of x against one weight row, the weights widened once: each row's value bit-equal to
    that row alone (what keeps a batch's rows independent of each other), on every path the CPU runs."""
    from numba import njit
    from npgpt.fast import _q8
    from npgpt.fast.quant import quantize_q8
    rng = np.random.default_rng(K + 1)
    x16, d = quantize_q8(rng.standard_normal((6, K)).astype(np.float32))
    q, _ = quant.to_int8(rng.standard_normal((5, K)).astype(np.float32))
    for path in _q8.runnable():
        dot, dot4 = _q8.q8_dot_using(path), _q8.q8_dot4_using(path)

        @njit
        def both(x16, d, q, first, dot=dot, dot4=dot4):
            four = np.empty((q.shape[0], 4), np.float32)
            alone = np.empty((q.shape[0], 4), np.float32)
            for o in range(q.shape[0]):
                a = dot4(x16, d, first, q, o)
                for r in range(4):
                    four[o, r] = a[r]
                    alone[o, r] = dot(x16, d, first + r, q, o)
            return four, alone
        for first in (0, 2):
            four, alone = both(x16, d, q, first)
            np.testing.assert_array_equal(four, alone, err_msg=path)
    with pytest.raises(ValueError, match="path must be one of"):
        _q8.q8_dot4_using("sse9")


def test_q8_paths_follow_the_cpu_features():
    from npgpt.fast import _q8
    assert _q8.instructions({"avx2", "avx512f", "avx512vl", "avx512vnni"}) == "avx512-vnni"
    assert _q8.instructions({"avx2", "avxvnni"}) == "avx-vnni"
    assert _q8.instructions({"avx2", "fma"}) == "avx2"
    assert _q8.instructions({"neon"}) == "portable" and _q8.runnable(set()) == ["portable"]
    with pytest.raises(ValueError, match="path must be one of"):
        _q8.q8_dot_using("sse9")


@pytest.mark.parametrize("parallel", [False, True])
def test_int8_rows_independent_of_the_batch(parallel, monkeypatch):
    """Each row of an int8 product is computed from that row alone by the same operations: bit-equal
    whatever rows share the call and whichever build (serial or parallel) runs it."""
    from npgpt.fast import _jit
    from npgpt.fast.quant import packed_matmul
    rng = np.random.default_rng(9)
    O, K = 70, 200
    q, s = quant.to_int8(rng.standard_normal((O, K)).astype(np.float32))
    b = rng.standard_normal(O).astype(np.float32)
    x = rng.standard_normal((7, K)).astype(np.float32)
    alone = np.concatenate([packed_matmul(x[i:i + 1], q, s, b) for i in range(7)])
    if parallel:
        monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 0)
    np.testing.assert_array_equal(packed_matmul(x, q, s, b), alone)
    np.testing.assert_array_equal(packed_matmul(x[::-1].copy(), q, s, b), alone[::-1])


def test_packed_rows_side_by_side_setting(monkeypatch, capsys):
    """NPGPT_PACKED_ROWS decides (1 or 4); unset, AMD CPUs stream one weight row at a time and the others
    four; anything else is one line from the CLI naming the variable."""
    from npgpt.cli import main
    from npgpt.fast import quant as fast_quant
    from npgpt.fast import settings
    for value, vendor, want in (("1", "GenuineIntel", 1), ("4", "AuthenticAMD", 4), ("", "AuthenticAMD", 1),
                                ("", "GenuineIntel", 4), ("", "", 4)):
        monkeypatch.setattr(fast_quant, "_SIDE_BY_SIDE", None)
        monkeypatch.setenv("NPGPT_PACKED_ROWS", value)
        monkeypatch.setattr(settings, "cpu_vendor", lambda vendor=vendor: vendor)
        assert fast_quant.side_by_side() == want
    monkeypatch.setattr(fast_quant, "_SIDE_BY_SIDE", None)
    monkeypatch.setenv("NPGPT_PACKED_ROWS", "2")
    with pytest.raises(ValueError, match="NPGPT_PACKED_ROWS must be 1 or 4, got '2'"):
        fast_quant.side_by_side()
    assert main(["info", "gpt2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["npgpt info: error: the environment variable NPGPT_PACKED_ROWS must be 1 or 4, got '2'"]


def test_prefetch_rows_setting(monkeypatch, capsys):
    """NPGPT_PREFETCH_ROWS decides (0 to 64); unset, Intel and other CPUs ask 8 rows ahead, AMD CPUs 4 rows
    ahead for rows of up to 1 KB and none for longer ones; anything else is one line from the CLI naming
    the variable."""
    from npgpt.cli import main
    from npgpt.fast import quant as fast_quant
    from npgpt.fast import settings
    int8_768, bf16_768 = np.zeros((2, 768), np.int8), np.zeros((2, 768), np.uint16)
    for value, vendor, w, want in (("0", "GenuineIntel", int8_768, 0), ("16", "AuthenticAMD", bf16_768, 16),
                                   ("", "AuthenticAMD", int8_768, 4), ("", "AuthenticAMD", bf16_768, 0),
                                   ("", "GenuineIntel", bf16_768, 8), ("", "", int8_768, 8)):
        monkeypatch.setattr(fast_quant, "_AHEAD_BY_ROW", {})
        monkeypatch.setenv("NPGPT_PREFETCH_ROWS", value)
        monkeypatch.setattr(settings, "cpu_vendor", lambda vendor=vendor: vendor)
        assert fast_quant.prefetch_ahead(w) == want
    monkeypatch.setattr(fast_quant, "_AHEAD_BY_ROW", {})
    for bad in ("-1", "65", "eight"):
        monkeypatch.setenv("NPGPT_PREFETCH_ROWS", bad)
        with pytest.raises(ValueError, match="NPGPT_PREFETCH_ROWS must be a whole number from 0 to 64"):
            fast_quant.prefetch_ahead(int8_768)
    assert main(["info", "gpt2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["npgpt info: error: the environment variable NPGPT_PREFETCH_ROWS must be a whole number from 0 "
                   "to 64, got 'eight'"]


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 9])       # few_rows' dot products (1..4 rows), the row kernel
@pytest.mark.parametrize("parallel", [False, True])      # (5..8), BLAS; tests/test_few_rows.py checks the routing
def test_tied_head_few_rows_float32(N, parallel, monkeypatch):
    # the tied LM head's few-row paths on the float32 (V, C) weight against x @ w^T
    from npgpt import layers
    from npgpt.fast import _jit
    if parallel:
        monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 0)
    rng = np.random.default_rng(N)
    wte = layers.Embedding(101, 37, dtype=np.float32, rng=rng)
    head = layers.TiedLMHead(wte)
    x = rng.standard_normal((N, 1, 37)).astype(np.float32)
    ref = x @ wte.weight.data.T                                  # the NumPy line it mirrors
    with npgpt.no_grad():
        y = head(x)
    assert y.shape == (N, 1, 101) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_rows_and_blocked_prefill(kind, monkeypatch):
    from npgpt.fast.quant import dequantize_rows
    rng = np.random.default_rng(2)
    O, K = 41, 19
    packed, scale = quant.pack(rng.standard_normal((O, K)).astype(np.float32), kind)
    full = quant.unpack(packed, scale)
    rows = np.array([[3, 0], [40, 3]])
    np.testing.assert_array_equal(dequantize_rows(packed, scale, rows), full[rows.reshape(-1)])
    monkeypatch.setattr(quant, "SCRATCH_FLOATS", 5 * K)          # several blocks of output channels
    x = rng.standard_normal((quant.packed_max_rows(packed) + 7, K)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    np.testing.assert_allclose(quant.packed_linear(x, packed, scale, b), x @ full.T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_model_close_to_float32(kind, backend):
    cfg = npgpt.GPTConfig(**CFG)
    ref_model = npgpt.GPT(cfg, seed=0).eval()
    model = npgpt.inference.quant.quantize(npgpt.GPT(cfg, seed=0), kind)
    assert model.weight_format == kind
    # one packed wte for both uses
    assert model.lm_head.packed is model.wte.packed
    idx = np.random.default_rng(0).integers(0, cfg.n_vocab, (2, 40))
    with npgpt.no_grad():
        ref, out = ref_model.forward(idx), model.forward(idx)      # 80 rows: the blocked BLAS path
    tol = {"bf16": 0.01, "int8": 0.03}[kind]
    assert _rel(out, ref) < tol
    # KV-cached prefill + decode, B=5 (the packed kernels)
    cache, rcache = KVCache.for_model(model, 2), KVCache.for_model(ref_model, 2)
    model.forward_cached(idx[:, :20], cache), ref_model.forward_cached(idx[:, :20], rcache)
    for t in range(20, 25):
        lq, lr = model.forward_cached(idx[:, t:t + 1], cache), ref_model.forward_cached(idx[:, t:t + 1], rcache)
        assert _rel(lq, lr) < tol
    # decoding's int8 products round the activations to 16 bits; the 80-row forward above does not
    np.testing.assert_allclose(lq, out[:, 24], rtol=1e-4, atol=1e-4)


def test_int8_decoding_equals_the_numpy_lines_token_for_token():
    """KV-cached int8 decoding (quantized activations, the kernels) against the readable NumPy path."""
    from npgpt import fast
    cfg = npgpt.GPTConfig(**CFG)
    model = quant.quantize(npgpt.GPT(cfg, seed=3), "int8")
    idx = np.random.default_rng(5).integers(0, cfg.n_vocab, (2, 9))
    logits = {}
    for backend in ("numba", "numpy"):
        with fast.use_backend(backend):
            cache = KVCache.for_model(model, 2)
            steps = [model.forward_cached(idx[:, :5], cache)]                   # (B, V): the last position's
            for t in range(5, 9):
                steps.append(model.forward_cached(idx[:, t:t + 1], cache))
            logits[backend] = np.stack(steps)
    np.testing.assert_allclose(logits["numba"], logits["numpy"], rtol=1e-4, atol=1e-4)


def test_weight_bytes_shrink():
    cfg = npgpt.GPTConfig(**CFG)
    fp = quant.weight_bytes(npgpt.GPT(cfg, seed=0))
    b16 = quant.weight_bytes(quant.quantize(npgpt.GPT(cfg, seed=0), "bf16"))
    i8 = quant.weight_bytes(quant.quantize(npgpt.GPT(cfg, seed=0), "int8"))
    assert b16 < 0.6 * fp and i8 < 0.35 * fp


def test_backward_is_an_error():
    model = quant.quantize(npgpt.GPT(npgpt.GPTConfig(**CFG), seed=0), "int8").train()
    logits = model.forward(np.zeros((1, 4), np.int64))
    with pytest.raises(RuntimeError, match="inference-only"):
        model.backward(np.ones_like(logits))
    with pytest.raises(ValueError, match="already holds int8"):
        quant.quantize(model, "bf16")
    with pytest.raises(ValueError, match="weights must be one of"):
        quant.quantize(npgpt.GPT(npgpt.GPTConfig(**CFG), seed=0), "int4")


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_roundtrip_memory_mapped(kind, tmp_path):
    from npgpt.io import read_safetensors
    cfg = npgpt.GPTConfig(**CFG)
    npgpt.save_model(npgpt.GPT(cfg, seed=0), tmp_path / "fp32")
    model = npgpt.load_model(tmp_path / "fp32", weights=kind)
    assert model.weight_format == kind
    npgpt.save_model(model, tmp_path / "q")
    tensors, meta = read_safetensors(tmp_path / "q" / "model.safetensors", raw_bf16=True)
    assert meta["npgpt.weights"] == kind
    w = tensors["transformer.h.0.mlp.c_fc.weight"]
    assert w.shape == (4 * cfg.n_embd, cfg.n_embd)                   # packed (out, in)
    if kind == "int8":
        assert w.dtype == np.int8 and tensors["transformer.h.0.mlp.c_fc.weight.scale"].dtype == np.float32
    else:
        assert w.dtype == np.uint16
    loaded = npgpt.load_model(tmp_path / "q")
    assert loaded.weight_format == kind
    packed = loaded.h[1].mlp.c_proj.packed
    base = packed
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)                                   # copy-free: a view of the file
    np.testing.assert_array_equal(packed, model.h[1].mlp.c_proj.packed)
    idx = np.arange(10)[None]
    np.testing.assert_array_equal(loaded.forward(idx), model.forward(idx))
    other = "int8" if kind == "bf16" else "bf16"
    with pytest.raises(ValueError, match=f"holds {kind}"):
        npgpt.load_model(tmp_path / "q", weights=other)


def test_cli_generate_weights(tmp_path, capsys, monkeypatch):
    """`generate --weights W` decodes with the weights packed as W: the model that generates holds W's
    packed matrices (and W's bytes), and the text is that model's greedy continuation."""
    from npgpt.cli import main
    from npgpt.tokens.bpe import get_tokenizer
    path = tmp_path / "m"
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, n_vocab=50257), seed=0), path)
    want = {}
    for w in ["fp32", "bf16", "int8"]:
        model = npgpt.load_model(path, weights=w)
        want[w] = (quant.weight_bytes(model), "hi" + npgpt.generate_text(model, get_tokenizer(), "hi", 3) + "\n")
    assert want["int8"][0] < want["bf16"][0] < want["fp32"][0]
    used = []
    generate = importlib.import_module("npgpt.inference.decode")        # the module (npgpt.inference.decode is also a function)
    real = generate.stream_tokens
    monkeypatch.setattr(generate, "stream_tokens", lambda model, *a, **kw: used.append(model) or real(model, *a, **kw))
    for w in ["fp32", "bf16", "int8"]:
        assert main(["generate", "--model", str(path), "--weights", w, "-n", "3", "--temperature", "0", "hi"]) == 0
        (model,) = used
        used.clear()
        assert model.weight_format == w
        assert (quant.weight_bytes(model), capsys.readouterr().out) == want[w]
