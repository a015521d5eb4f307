"""The fused causal attention kernel (npgpt/fast/flash_attention.py) and the per-head kernel
(npgpt/fast/head_attention.py) against the readable attention path they mirror: the forward output,
dq, dk, dv, and through CausalSelfAttention the layer's output, dx and the c_attn / c_proj gradients. Odd T (a partial last block), several block
sizes, (B, NH, hs) shapes, float64 (tight) and float32, serial and parallel builds."""
import math

import numpy as np
import pytest

from npgpt import fast
from npgpt.layers import CausalSelfAttention
from npgpt.fast import fused_attention as attention_mod
from npgpt.layers.attention import causal_softmax_backward_numpy, causal_softmax_numpy

pytest.importorskip("numba")
pytest.importorskip("scipy")          # Numba's np.dot (the kernel's tile products) runs on SciPy's BLAS


pytestmark = pytest.mark.usefixtures("kernel_threads")     # every test on the serial and the parallel build


DTYPES = [np.float64, np.float32]
# float64: both paths do the same sums in another order; float32: the kernel's tiles add in
# another order than BLAS over whole rows, and the online softmax rescales partial sums.
RTOL = {np.float64: 1e-12, np.float32: 1e-5}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def reference(q, k, v, dy, scale):
    """The readable path's attention core and its backward, in NumPy."""
    s = q @ k.transpose(0, 1, 3, 2)
    a = causal_softmax_numpy(s, scale)
    y = a @ v
    da = dy @ v.transpose(0, 1, 3, 2)
    dv = a.transpose(0, 1, 3, 2) @ dy
    ds = causal_softmax_backward_numpy(da, a, scale)
    return y, ds @ k, ds.transpose(0, 1, 3, 2) @ q, dv


def padded(a):
    """`a`'s values in a view of a buffer one column wider, so that every head view taken of it is strided
    as the layer's views of its (B, T, 3C) buffers are: one Numba specialisation (array layout "A") for
    every shape, instead of a separate compilation (about 10 s a parallel build) where a view happens to be
    contiguous (NH = 1)."""
    buf = np.empty(a.shape[:-1] + (a.shape[-1] + 1,), a.dtype)
    buf[..., :-1] = a
    return buf[..., :-1]


def head_views(buf, NH, hs):
    """(B, T, n*NH*hs) buffer -> n (B, NH, T, hs) strided views, as the layer hands them over."""
    B, T, W = buf.shape
    n = W // (NH * hs)
    b = buf.reshape(B, T, n, NH, hs)
    return [b[:, :, i].transpose(0, 2, 1, 3) for i in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,T,hs,block", [
    (2, 1, 1, 8, 64), (2, 3, 7, 16, 64), (1, 2, 67, 64, 32), (2, 2, 67, 64, 64),
    (1, 4, 130, 12, 32), (1, 1, 64, 64, 64), (2, 1, 33, 5, 16), (1, 2, 300, 64, 128)])
def test_kernel_matches_reference(dtype, B, NH, T, hs, block):
    rng = np.random.default_rng(T * 7 + hs)
    qkv = padded((2 * rng.standard_normal((B, T, 3 * NH * hs))).astype(dtype))
    q, k, v = head_views(qkv, NH, hs)
    dy_buf = padded(rng.standard_normal((B, T, NH * hs)).astype(dtype))
    (dy,) = head_views(dy_buf, NH, hs)
    scale = 1.0 / math.sqrt(hs)
    y_ref, dq_ref, dk_ref, dv_ref = reference(*(np.asarray(x, np.float64) for x in (q, k, v, dy)), scale)

    y_buf = padded(np.full((B, T, NH * hs), np.nan, dtype))
    (y,) = head_views(y_buf, NH, hs)
    _, L = fast.flash_attention_forward(q, k, v, scale, out=y, block=block)
    assert L.shape == (B, NH, T) and L.dtype == dtype and y_buf.dtype == dtype
    assert rel_err(y_buf, y_ref.transpose(0, 2, 1, 3).reshape(B, T, -1)) <= RTOL[dtype]
    s = np.asarray(q, np.float64) @ np.asarray(k, np.float64).transpose(0, 1, 3, 2) * scale
    s[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
    L_ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    assert rel_err(L, L_ref) <= RTOL[dtype] * 10

    dqkv = padded(np.full((B, T, 3 * NH * hs), np.nan, dtype))
    dq, dk, dv = head_views(dqkv, NH, hs)
    fast.flash_attention_backward(q, k, v, y, L, dy, scale, dq, dk, dv, block=block)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert rel_err(got, want) <= RTOL[dtype]


def test_kernel_new_arrays():
    """Without out= arrays the kernel allocates contiguous outputs (same values)."""
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.standard_normal((1, 2, 9, 4)) for _ in range(4))
    y, L = fast.flash_attention_forward(q, k, v, 0.5)
    y_ref, dq_ref, dk_ref, dv_ref = reference(q, k, v, dy, 0.5)
    assert rel_err(y, y_ref) <= 1e-12
    for got, want in zip(fast.flash_attention_backward(q, k, v, y, L, dy, 0.5), (dq_ref, dk_ref, dv_ref)):
        assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_stores_k_and_v_into_kv_out(dtype):
    """kv_out (a KV cache's C-contiguous (B, NH, n_ctx, hs) buffers): k and v land at positions 0 .. T-1,
    exactly, and nothing past T is touched; y and L are those of the scratch path."""
    B, NH, T, hs, n_ctx = 2, 3, 67, 16, 80
    rng = np.random.default_rng(5)
    q, k, v = head_views(rng.standard_normal((B, T, 3 * NH * hs)).astype(dtype), NH, hs)
    K, V = np.full((2, B, NH, n_ctx, hs), np.nan, dtype)
    y0, L0 = fast.flash_attention_forward(q, k, v, 0.25, block=32)
    y1, L1 = fast.flash_attention_forward(q, k, v, 0.25, block=32, kv_out=(K, V))
    assert np.array_equal(K[:, :, :T], k) and np.array_equal(V[:, :, :T], v)
    assert np.isnan(K[:, :, T:]).all() and np.isnan(V[:, :, T:]).all()
    assert np.array_equal(y1, y0) and np.array_equal(L1, L0)
    with pytest.raises(ValueError, match="kv_out"):
        fast.flash_attention_forward(q, k, v, 0.25, kv_out=(np.empty((B, NH, T - 1, hs), dtype), V))  # too short
    with pytest.raises(ValueError, match="kv_out"):
        fast.flash_attention_forward(q, k, v, 0.25, kv_out=(K[..., ::2], V))       # not contiguous


def layer_run(dtype, B, T, C, NH, core, seed=0):
    """Output, dx and the parameter gradients of one CausalSelfAttention forward + backward through
    the attention core `core` ("readable", "fused" or "heads")."""
    rng = np.random.default_rng(seed)
    layer = CausalSelfAttention(C, NH, dtype=dtype, rng=np.random.default_rng(1))
    layer.c_attn.weight.data[...] = rng.standard_normal(layer.c_attn.weight.data.shape) * 0.3
    layer.c_attn.bias.data[...] = rng.standard_normal(3 * C) * 0.1
    x = rng.standard_normal((B, T, C)).astype(dtype)
    dout = rng.standard_normal((B, T, C)).astype(dtype)
    layer.flash_min_T = 0 if core == "fused" else 1 << 30
    with fast.use_backend("numpy" if core == "readable" else "numba"):
        assert layer.core(T) == core
        layer.zero_grad()
        out = layer.forward(x)
        assert (layer.a is None) == (core == "fused")
        dx = layer.backward(dout)
    grads = {n: g.copy() for n, g in layer.named_grads()}
    return out, dx, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("core", ["fused", "heads"])
@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 8, 2), (2, 7, 12, 3), (1, 67, 128, 2), (2, 130, 48, 4)])
def test_layer_kernels_match_readable(dtype, core, B, T, C, NH):
    out_ref, dx_ref, g_ref = layer_run(dtype, B, T, C, NH, "readable")
    out, dx, g = layer_run(dtype, B, T, C, NH, core)
    assert out.dtype == dx.dtype == dtype
    assert rel_err(out, out_ref) <= RTOL[dtype]
    assert rel_err(dx, dx_ref) <= RTOL[dtype]
    assert set(g) == set(g_ref) == {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}
    for name in g:
        assert rel_err(g[name], g_ref[name]) <= RTOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,T,hs", [(2, 1, 1, 4), (2, 3, 9, 8), (3, 2, 64, 32)])
def test_head_kernel_matches_reference(dtype, B, NH, T, hs):
    """The per-head kernel on strided views (as the layer passes them) against the NumPy lines."""
    rng = np.random.default_rng(0)
    q, k, v = head_views(padded(rng.standard_normal((B, T, 3 * NH * hs)).astype(dtype)), NH, hs)
    (dy,) = head_views(padded(rng.standard_normal((B, T, NH * hs)).astype(dtype)), NH, hs)
    scale = 1.0 / math.sqrt(hs)
    y_ref, dq_ref, dk_ref, dv_ref = reference(q, k, v, dy, scale)
    y, a = fast.head_attention_forward(q, k, v, scale)
    assert rel_err(y, y_ref) <= RTOL[dtype]
    assert rel_err(a, causal_softmax_numpy(q @ k.transpose(0, 1, 3, 2), scale)) <= RTOL[dtype]
    assert np.all(np.triu(a, k=1) == 0)                                 # masked keys exactly 0
    dq, dk, dv = head_views(padded(np.full((B, T, 3 * NH * hs), np.nan, dtype)), NH, hs)
    fast.head_attention_backward(q, k, v, a, dy, scale, dq, dk, dv)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert rel_err(got, want) <= RTOL[dtype]


def test_which_core_runs(monkeypatch):
    layer = CausalSelfAttention(8, 2, dtype=np.float64, rng=np.random.default_rng(0), dropout=0.1, seed=0)
    monkeypatch.setattr(attention_mod, "FLASH_MIN_T", 16)
    with fast.use_backend("numba"):
        assert layer.core(64) == "readable"                 # attention dropout active: readable path
        layer.eval()
        assert layer.core(64) == layer.core(16) == "fused" and layer.core(15) == "heads"   # module threshold
        layer.flash_min_T = 100                        # the layer's own threshold wins
        assert layer.core(64) == "heads" and layer.runs_fused(100)
    with fast.use_backend("numpy"):
        assert layer.core(4096) == "readable"               # NPGPT_KERNELS=numpy: always readable
    layer.train()
    layer.attn_dropout.p = 0.0
    with fast.use_backend("numba"):
        assert layer.runs_fused(100)                        # dropout p = 0 in training: fused


def test_switching_paths_between_calls():
    """One layer, fused then per-head then readable then fused: each backward uses its own forward's state."""
    rng = np.random.default_rng(0)
    layer = CausalSelfAttention(8, 2, dtype=np.float64, rng=rng)
    x, dout = rng.standard_normal((2, 2, 9, 8))
    dxs = []
    for threshold, backend in ((0, "numba"), (1 << 30, "numba"), (0, "numpy"), (0, "numba")):
        layer.flash_min_T = threshold
        with fast.use_backend(backend):
            layer.forward(x)
            dxs.append(layer.backward(dout))
    assert rel_err(dxs[0], dxs[1]) <= 1e-12 and rel_err(dxs[0], dxs[2]) <= 1e-12 and np.array_equal(dxs[0], dxs[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_uses_fused_kernel(dtype, monkeypatch):
    """GPT.forward_cached on an empty cache (a prompt) matches the readable path: every position, then
    with last_only (the fused blocks, then the last block's one query a row), also right-padded."""
    import npgpt
    from npgpt.inference.kvcache import KVCache
    cfg = npgpt.GPTConfig(n_vocab=50, n_ctx=80, n_embd=16, n_head=2, n_layer=2)
    model = npgpt.GPT(cfg, dtype=dtype, seed=0)
    idx = np.random.default_rng(0).integers(0, 50, (2, 70))
    outs = []
    for threshold in (1 << 30, 0):
        monkeypatch.setattr(attention_mod, "FLASH_MIN_T", threshold)
        cache = KVCache.for_model(model, 2)
        first = model.forward_cached(idx, cache, last_only=False)
        nxt = model.forward_cached(idx[:, :1], cache)          # then one decode step (readable path)
        cache = KVCache.for_model(model, 2)                    # last_only: fused blocks, then one query a row
        last = model.forward_cached(idx, cache)
        cache = KVCache.for_model(model, 2)                    # right-padded prompts of 70 and 41 tokens
        padded = model.forward_cached(idx, cache, n_valid=[70, 41])
        outs.append((first, nxt, last, padded))
    assert rel_err(outs[1][2], outs[1][0][:, -1]) <= RTOL[dtype] * 10
    assert rel_err(outs[1][3][0], outs[1][0][0, -1]) <= RTOL[dtype] * 10
    short = model.forward(idx[1:, :41])[0, -1]                  # row 1 alone, its 41 real tokens
    assert rel_err(outs[1][3][1], short) <= RTOL[dtype] * 10
    for a, b in zip(outs[0], outs[1]):
        assert rel_err(b, a) <= RTOL[dtype] * 10


def test_prefill_fills_the_cache_it_is_given(monkeypatch):
    """The fused prefill writes keys and values straight into the cache's buffers (no second copy), and
    a cache whose buffers cannot take the kernel's writes (another dtype) is filled by store() instead:
    both hold what the readable path stores, and decode the same next token."""
    import npgpt
    from npgpt.inference.kvcache import KVCache, LayerKV
    stores = []
    store = LayerKV.store
    monkeypatch.setattr(LayerKV, "store", lambda self, *a, **kw: stores.append(1) or store(self, *a, **kw))
    cfg = npgpt.GPTConfig(n_vocab=50, n_ctx=80, n_embd=16, n_head=2, n_layer=2)
    model = npgpt.GPT(cfg, dtype=np.float32, seed=0)
    idx = np.random.default_rng(1).integers(0, 50, (2, 70))
    runs = {}
    # store() calls in the prefill: every layer on the readable path; only the last (one query a
    # row, not fused) when the kernel fills the cache; every layer again for a float64 cache
    for name, threshold, dtype, n_store in (("readable", 1 << 30, np.float32, 2), ("fused", 0, np.float32, 1),
                                            ("fused, float64 cache", 0, np.float64, 2)):
        monkeypatch.setattr(attention_mod, "FLASH_MIN_T", threshold)
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_ctx, cfg.n_embd // cfg.n_head, dtype=dtype)
        stores.clear()
        with fast.use_backend("numba"):
            model.forward_cached(idx, cache)
            assert len(stores) == n_store, name
            runs[name] = cache, model.forward_cached(idx[:, :1], cache)
    ref, ref_next = runs["readable"]
    for name in ("fused", "fused, float64 cache"):
        cache, nxt = runs[name]
        assert (cache.lengths == 71).all(), name
        for l in range(cfg.n_layer):
            assert rel_err(cache.k[l][:, :, :71], ref.k[l][:, :, :71]) <= 1e-5, name
            assert rel_err(cache.v[l][:, :, :71], ref.v[l][:, :, :71]) <= 1e-5, name
        assert rel_err(nxt, ref_next) <= 1e-4, name


def test_tile_blas_is_single_threaded_after_first_use():
    """The BLAS Numba's np.dot calls (SciPy's bundled OpenBLAS) runs one thread once the kernel ran."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from npgpt.fast.flash_attention import flash_attention_forward
    q = np.ones((1, 1, 8, 4), np.float32)
    flash_attention_forward(q, q, q, 0.5)
    scipy_blas = [i for i in threadpoolctl.threadpool_info()
                  if i["internal_api"] == "openblas" and "scipy.libs" in i["filepath"]]
    if not scipy_blas:
        pytest.skip("SciPy is not using a bundled OpenBLAS here")
    assert all(i["num_threads"] == 1 for i in scipy_blas), scipy_blas
