"""Each Numba kernel against the NumPy reference it mirrors: odd shapes, float32 and float64,
and each backward fed by the other implementation's forward cache."""
import decimal
import math

import numpy as np
import pytest

from npgpt import fast
from npgpt.layers import GELU, LayerNorm
from npgpt.layers.attention import causal_softmax_backward_numpy, causal_softmax_numpy
from npgpt.loss import cross_entropy_numpy
from npgpt.optim import adamw_update_numpy

pytest.importorskip("numba")


pytestmark = pytest.mark.usefixtures("kernel_threads")     # every test on the serial and the parallel build

DTYPES = [np.float32, np.float64]
# float32 kernels accumulate in float64 while NumPy reduces in float32 (pairwise), so they
# agree to a few float32 ulps of the values involved; float64 agrees to a few float64 ulps.
RTOL = {np.float32: 2e-6, np.float64: 1e-13}


def close(a, b, dtype, scale=None):
    scale = np.abs(b).max() if scale is None else scale
    err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / max(scale, 1e-30)
    assert err <= RTOL[dtype], f"max error {err:.2e} relative to {scale:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 5), (3, 7, 13), (2, 17, 96), (3, 700, 128)])   # the last: parallel builds
def test_layernorm_kernels(dtype, shape):
    rng = np.random.default_rng(0)
    C = shape[-1]
    x = (3 * rng.standard_normal(shape) + 1.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ln = LayerNorm(C, dtype=dtype)
    ln.weight.data[...] = 1 + 0.3 * rng.standard_normal(C)
    ln.bias.data[...] = 0.3 * rng.standard_normal(C)
    g, b = ln.weight.data, ln.bias.data

    y_ref = ln.forward_numpy(x)
    xhat_ref, rstd_ref = ln.xhat, ln.rstd
    y, xhat, rstd = fast.layernorm_forward(x, g, b, ln.eps)
    assert y.dtype == xhat.dtype == rstd.dtype == dtype
    close(y, y_ref, dtype)
    close(xhat, xhat_ref, dtype)
    close(rstd, rstd_ref, dtype)

    # each backward fed by the *other* forward's cache
    ln.zero_grad()
    ln.xhat, ln.rstd = xhat, rstd
    dx_ref = ln.backward_numpy(dy)
    dg_ref, db_ref = ln.weight.grad.copy(), ln.bias.grad.copy()
    dg, db = np.zeros_like(g), np.zeros_like(b)
    dx = fast.layernorm_backward(dy, xhat_ref, rstd_ref, g, dg, db)
    close(dx, dx_ref, dtype)
    close(dg, dg_ref, dtype)
    close(db, db_ref, dtype)
    # gradients are added into, never overwritten
    fast.layernorm_backward(dy, xhat_ref, rstd_ref, g, dg, db)
    close(dg, 2 * dg_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (4, 1031)])
def test_gelu_kernels(dtype, shape):
    rng = np.random.default_rng(1)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = fast.gelu_forward(x)
    assert y.dtype == dtype
    close(y, GELU.forward_numpy(x), dtype)
    y2, d = fast.gelu_forward(x, slope=True)               # a training forward: y and dgelu/dx
    np.testing.assert_array_equal(y2, y)
    assert d.dtype == dtype and d.shape == shape
    with pytest.raises(ValueError, match="gelu_backward"):
        fast.gelu_backward(dy.reshape(-1)[:-1] if dy.size > 1 else np.zeros(2, dtype), d)
    dy_kept = dy.copy()
    dx = fast.gelu_backward(dy, d)
    np.testing.assert_array_equal(dy, dy_kept)
    close(dx, GELU.backward_numpy(dy, x), dtype)
    np.testing.assert_array_equal(fast.gelu_backward(dy, d), dx)             # d left intact
    out = fast.gelu_backward(dy, d, out=dy)                                   # in place
    assert np.shares_memory(out, dy)
    np.testing.assert_array_equal(dy, dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7), (2, 300, 512)])   # the last takes the parallel builds
def test_bias_gelu_kernel(dtype, shape):
    """a += b in place, then gelu(a): the MLP's c_fc bias folded into GELU's pass."""
    rng = np.random.default_rng(2)
    a = (3 * rng.standard_normal(shape)).astype(dtype)
    b = rng.standard_normal(shape[-1]).astype(dtype)
    pre = a + b
    a_train = a.copy()
    y = fast.bias_gelu_forward(a, b)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(a, pre)                 # the one rounding of a + b, as NumPy's
    close(y, GELU.forward_numpy(pre), dtype)
    # a training forward: the same y, and a left holding dgelu/da for the backward
    np.testing.assert_array_equal(fast.bias_gelu_forward(a_train, b, slope=True), y)
    dy = rng.standard_normal(shape).astype(dtype)
    close(fast.gelu_backward(dy, a_train), GELU.backward_numpy(dy, pre), dtype)
    with pytest.raises(ValueError, match="bias_gelu_forward"):
        fast.bias_gelu_forward(a, b[:-1] if shape[-1] > 1 else np.zeros(2, dtype))


def test_gelu_layer_keeps_its_slope_in_the_gemm_output():
    """On the kernels the MLP's GELU keeps dgelu/dx, written over the c_fc GEMM output it was handed (no
    activation more than the NumPy path's x); dx goes into dy only when the caller allows it, and a second
    backward of the same forward gives the same dx. Under no_grad nothing is kept or overwritten."""
    import npgpt
    rng = np.random.default_rng(3)
    a = (2 * rng.standard_normal((4, 6, 16))).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    dy = rng.standard_normal(a.shape).astype(np.float32)
    with fast.use_backend("numpy"):
        ref = GELU()
        y_ref = ref(a.copy(), bias=b)
        dx_ref = ref.backward(dy)
    layer, h = GELU(), a.copy()
    with fast.use_backend("numba"):
        with npgpt.no_grad():
            y0 = layer(h, bias=np.zeros_like(b))
        np.testing.assert_array_equal(h, a)              # + 0, and no slope written over it
        close(y0, GELU.forward_numpy(a), np.float32)
        y = layer(h, bias=b)
        close(y, y_ref, np.float32)
        assert layer.slope is h and layer.x is None
        dy_kept = dy.copy()
        dx = layer.backward(dy)
        np.testing.assert_array_equal(dy, dy_kept)       # the caller's dy untouched
        close(dx, dx_ref, np.float32)
        np.testing.assert_array_equal(layer.backward(dy), dx)
        scratch = dy.copy()
        assert np.shares_memory(layer.backward(scratch, overwrite_dy=True), scratch)
        np.testing.assert_array_equal(scratch, dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (257, 1031)])
def test_add_bias_kernel(dtype, shape):
    """y += b (Linear.forward's NumPy line), in place: bit for bit the same sums. kernel_threads picks the
    build whatever the size (its thresholds 0 and 2^62 override the one add_bias_ passes)."""
    rng = np.random.default_rng(2)
    y = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape[1]).astype(dtype)
    want = y + b
    out = fast.add_bias_(y, b)
    assert out is y and np.array_equal(y, want)
    with pytest.raises(ValueError, match="add_bias_"):
        fast.add_bias_(y, b[:-1] if b.size > 1 else np.zeros(2, dtype))     # a bias of the wrong length


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,Tq,Tk", [(1, 1, 1, 1), (2, 3, 7, 7), (1, 2, 1, 9), (2, 2, 3, 11), (1, 4, 33, 33)])
def test_causal_softmax_kernels(dtype, B, NH, Tq, Tk):
    rng = np.random.default_rng(2)
    s = (4 * rng.standard_normal((B, NH, Tq, Tk))).astype(dtype)
    da = rng.standard_normal((B, NH, Tq, Tk)).astype(dtype)
    scale = 1.0 / math.sqrt(12)
    a_ref = causal_softmax_numpy(s, scale)
    a = fast.causal_softmax_forward(s.copy(), scale)
    assert a.dtype == dtype
    close(a, a_ref, dtype, scale=1.0)
    future = np.triu(np.ones((Tq, Tk), bool), k=1 + Tk - Tq)
    assert np.all(a[..., future] == 0)                         # masked exactly, not approximately
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=RTOL[dtype] * 10)
    ds_ref = causal_softmax_backward_numpy(da, a, scale)       # numpy backward on the kernel's cache
    ds = fast.causal_softmax_backward(da.copy(), a_ref, scale)  # kernel backward on numpy's cache
    close(ds, ds_ref, dtype)
    assert np.all(ds[..., future] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,hs,lengths", [(1, 1, 1, [0]), (1, 3, 8, [5]), (3, 2, 16, [0, 7, 30]), (2, 4, 64, [31, 31])])
@pytest.mark.parametrize("awake", [False, True])
def test_decode_attention_kernel(dtype, B, NH, hs, lengths, awake):
    # the NumPy lines of the kernel's docstring, per row: append k, v at L, attend keys 0..L
    rng = np.random.default_rng(3)
    C, n_ctx = NH * hs, 40
    qkv = rng.standard_normal((B, 3 * C)).astype(dtype)
    k_cache = rng.standard_normal((B, NH, n_ctx, hs)).astype(dtype)
    v_cache = rng.standard_normal((B, NH, n_ctx, hs)).astype(dtype)
    pos = np.array(lengths, np.int64)
    scale = 1.0 / math.sqrt(hs)
    k_ref, v_ref, y_ref = k_cache.copy(), v_cache.copy(), np.empty((B, C), dtype)
    for b, L in enumerate(lengths):
        q, k, v = qkv[b].reshape(3, NH, hs)
        k_ref[b, :, L], v_ref[b, :, L] = k, v
        s = q[:, None, :] @ k_ref[b, :, :L + 1].transpose(0, 2, 1)            # (NH, 1, L + 1)
        y_ref[b] = (causal_softmax_numpy(s, scale) @ v_ref[b, :, :L + 1]).reshape(C)
    y = fast.decode_attention(qkv, k_cache, v_cache, pos, scale, threads_awake=awake)
    assert y.dtype == dtype
    close(y, y_ref, dtype)
    assert np.array_equal(k_cache, k_ref) and np.array_equal(v_cache, v_ref)   # only position L written, exactly


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 3), (7, 101), (5, 5003)])
def test_cross_entropy_kernel(dtype, N, V):
    rng = np.random.default_rng(3)
    z = (5 * rng.standard_normal((N, V))).astype(dtype)
    t = rng.integers(0, V, N)
    t[::3] = -100
    loss_ref, dz_ref = cross_entropy_numpy(z, t)
    loss, dz = fast.cross_entropy_forward_backward(z, t, -100)
    assert dz.dtype == dtype and np.asarray(loss).dtype == dtype
    assert abs(loss - loss_ref) <= RTOL[dtype] * abs(loss_ref) + 1e-30
    close(dz, dz_ref, dtype)
    # out=logits overwrites the logits with their gradient and gives the same result
    z2 = z.copy()
    loss2, dz2 = fast.cross_entropy_forward_backward(z2, t, -100, out=z2)
    assert dz2 is z2 or np.shares_memory(dz2, z2)
    # the same kernel on the same row values (copied into dz first, or already there): identical results
    assert loss2 == loss
    np.testing.assert_array_equal(dz2, dz)


def test_cross_entropy_out_overlapping_logits_is_refused():
    z = np.random.default_rng(5).standard_normal((4, 7)).astype(np.float32)
    buf = np.concatenate([z.ravel(), np.zeros(7, np.float32)])
    with pytest.raises(ValueError, match="overlaps the logits"):
        fast.cross_entropy_forward_backward(buf[:28].reshape(4, 7), np.zeros(4, np.int64), -100,
                                               out=buf[7:].reshape(4, 7))


def test_cross_entropy_all_ignored():
    z = np.ones((2, 3, 4), np.float32)
    loss, dz = fast.cross_entropy_forward_backward(z, np.full((2, 3), -100), -100)
    assert loss == 0 and not dz.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 3), (7, 101), (5, 5003)])
def test_token_nll_kernel(dtype, N, V):
    from npgpt.eval.score import token_nll_numpy
    rng = np.random.default_rng(4)
    z = (5 * rng.standard_normal((N, V))).astype(dtype)
    z[0, [1, V - 1]] = z[0].max() + 1             # a tie: the first maximum counts, as argmax
    t = rng.integers(0, V, N)
    t[0] = V - 1                                    # the tie's second place: not a hit
    t[-1] = z[-1].argmax()                          # a hit
    nll_ref, hit_ref = token_nll_numpy(z.copy(), t)
    nll, hit = fast.token_nll(z.copy(), t)
    assert nll.dtype == np.float64 and hit.dtype == np.bool_
    close(nll, nll_ref, dtype)
    np.testing.assert_array_equal(hit, hit_ref)
    assert hit[-1] and (N == 1 or not hit[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_backward_kernel(dtype):
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 11, (3, 9))
    idx[0, :4] = 5                                             # repeated ids must accumulate
    dout = rng.standard_normal((3, 9, 6)).astype(dtype)
    dw_ref = np.ones((11, 6), dtype)
    np.add.at(dw_ref, idx.reshape(-1), dout.reshape(-1, 6))
    dw = np.ones((11, 6), dtype)
    fast.embedding_backward(idx, dout, dw)
    close(dw, dw_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd,c", [(0.0, 1.0), (0.1, 1.0), (0.1, 0.37)])
def test_adamw_kernel(dtype, wd, c):
    rng = np.random.default_rng(5)
    shape = (37, 13)
    p_ref = rng.standard_normal(shape).astype(dtype)
    m_ref, v_ref = np.zeros(shape, dtype), np.zeros(shape, dtype)
    p, m, v = p_ref.copy(), m_ref.copy(), v_ref.copy()
    b1, b2, eps, lr = 0.9, 0.95, 1e-8, 3e-3
    for t in range(1, 5):
        g = rng.standard_normal(shape).astype(dtype)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        g_before = g.copy()
        adamw_update_numpy(p_ref, g * dtype(c), m_ref, v_ref, lr, b1, b2, eps, wd, bc1, bc2)
        fast.adamw_update(p, g, m, v, lr, b1, b2, eps, wd, bc1, bc2, grad_scale=c)
        np.testing.assert_array_equal(g, g_before)            # the scale is applied as g is read
    assert p.dtype == dtype
    close(p, p_ref, dtype)
    close(m, m_ref, dtype)
    close(v, v_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_kernel(dtype):
    g = np.random.default_rng(6).standard_normal((101, 7)).astype(dtype)
    ref = float(np.sum(g.astype(np.float64) ** 2))
    assert abs(fast.sum_of_squares(g) - ref) <= 1e-12 * ref


# ----------------------------------------------------------------------------- npgpt/fast/_math.py
def _exp_kernel():
    from numba import njit

    from npgpt.fast._math import exp

    @njit
    def run(x, out):
        for i in range(x.size):
            out[i] = exp(x[i])
    return run


def test_vectorised_exp_float32_within_1_2_ulp():
    """Over the whole float32 range (normal results) the kernels' exp is within 1.2 ulp of the
    correctly rounded exp; denormal results are within one denormal step; specials are IEEE's."""
    run = _exp_kernel()
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-105, 89, 1_000_001, dtype=np.float32),
                        (30 * rng.standard_normal(200_000)).astype(np.float32),
                        np.linspace(-1e-3, 1e-3, 2001, dtype=np.float32)])
    y = np.empty_like(x)
    run(x, y)
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        exact32 = exact.astype(np.float32)
    normal = (exact32 >= np.finfo(np.float32).tiny) & np.isfinite(exact32)
    ulp = np.abs(y[normal] - exact[normal]) / np.spacing(exact32[normal]).astype(np.float64)
    assert ulp.max() <= 1.2, f"max error {ulp.max():.2f} ulp"
    small = ~normal & (exact < 1)
    assert np.abs(y[small].astype(np.float64) - exact[small]).max() <= 2 * 1.4013e-45
    assert np.all(np.isinf(y[~normal & (exact >= 1)]))
    specials = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, -104.5, 88.8], np.float32)
    out = np.empty_like(specials)
    run(specials, out)
    np.testing.assert_array_equal(out, np.array([0.0, np.inf, np.nan, 1.0, 1.0, 0.0, np.inf], np.float32))


def doubles_around_exp(x):
    """(lo, hi): the float64s just below and above exp(x), from exp(x) to 50 digits (Python's decimal
    rounds it correctly) rounded to float64 (float() of a Decimal is correctly rounded too). The two
    roundings give the correctly rounded exp(x) unless it lies within 1e-50 (relative) of a midpoint of
    two float64s, far closer than the hardest cases for exp in float64 (Lefevre and Muller's tables).
    lo == hi where the 50 digits are a float64 (x = 0, or |x| < 1e-49): that float64."""
    ctx = decimal.Context(prec=50)
    exact = [ctx.exp(decimal.Decimal(v)) for v in x.tolist()]
    near = np.array([float(e) for e in exact])
    side = np.array([(decimal.Decimal(c) > e) - (decimal.Decimal(c) < e) for c, e in zip(near.tolist(), exact)])
    return (np.where(side > 0, np.nextafter(near, -np.inf), near),
            np.where(side < 0, np.nextafter(near, np.inf), near))


def test_vectorised_exp_float64_is_faithfully_rounded():
    """float64 goes to libm's exp (np.exp inside Numba), which is within 1 ulp of exp(x): one of the two
    float64s around it, over the whole range (overflow and denormal results included). Not bit for bit
    NumPy's: NumPy's own SIMD exp (AVX-512) rounds some results the other way."""
    run = _exp_kernel()
    rng = np.random.default_rng(1)
    tiny, huge = np.log(np.finfo(np.float64).smallest_subnormal), np.log(np.finfo(np.float64).max)
    x = np.concatenate([50 * rng.standard_normal(1000), rng.uniform(tiny - 1, huge + 1, 4000),
                        rng.uniform(tiny - 1, np.log(np.finfo(np.float64).tiny), 500)])
    y = np.empty_like(x)
    run(x, y)
    lo, hi = doubles_around_exp(x)
    off = np.flatnonzero(~((lo <= y) & (y <= hi)))
    assert off.size == 0, [(x[i], y[i], lo[i], hi[i]) for i in off[:3].tolist()]     # x, exp(x), around exp(x)
    specials = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0])
    out = np.empty_like(specials)
    run(specials, out)
    np.testing.assert_array_equal(out, [0.0, np.inf, np.nan, 1.0, 1.0])


def test_bits_to_float32():
    from numba import njit

    from npgpt.fast._math import bits_to_float32

    @njit
    def cast(u16, out):
        for i in range(u16.size):
            out[i] = bits_to_float32(np.uint32(u16[i]) << 16)
    w = np.random.default_rng(2).standard_normal(100).astype(np.float32)
    top = (w.view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty(100, np.float32)
    cast(top, out)
    np.testing.assert_array_equal(out, (top.astype(np.uint32) << 16).view(np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.float32, np.float64])
def test_prefetch_row_is_only_a_hint(dtype):
    from numba import njit

    from npgpt.fast._math import prefetch_row

    @njit
    def touch_all(a):
        for i in range(a.shape[0]):
            prefetch_row(a, i)
        return a.sum()
    a = np.arange(7 * 300).reshape(7, 300).astype(dtype)
    before = a.copy()
    assert touch_all(a) == before.sum() and touch_all(a[:, ::2]) == before[:, ::2].sum()   # C order and strided
    np.testing.assert_array_equal(a, before)


def test_parallel_min_work_setting(monkeypatch, capsys, tmp_path):
    """NPGPT_PARALLEL_MIN_WORK sets the elements from which a kernel runs its parallel build, read when the
    kernels load; unset, 2^18; anything else is one line from the CLI naming the variable, before a file
    is written."""
    import os
    import subprocess
    import sys

    from npgpt.cli import main
    from npgpt.fast import settings
    monkeypatch.delenv("NPGPT_PARALLEL_MIN_WORK", raising=False)
    assert settings.parallel_min_work() == settings.DEFAULT_PARALLEL_MIN_WORK == 1 << 18
    for value, want in (("0", 0), ("65536", 65536), (" 7 ", 7)):
        monkeypatch.setenv("NPGPT_PARALLEL_MIN_WORK", value)
        assert settings.parallel_min_work() == want
    for bad in ("x", "-1", "1e5", "2.5"):
        monkeypatch.setenv("NPGPT_PARALLEL_MIN_WORK", bad)
        with pytest.raises(ValueError, match=f"NPGPT_PARALLEL_MIN_WORK must be a whole number .*got '{bad}'"):
            settings.parallel_min_work()
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--steps", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["npgpt train: error: the environment variable NPGPT_PARALLEL_MIN_WORK must be a whole number "
                   "of elements (0: always parallel), got '2.5'"]
    assert not out.exists()
    env = dict(os.environ, NPGPT_PARALLEL_MIN_WORK="12345")
    loaded = subprocess.run([sys.executable, "-c", "from npgpt.fast import _jit; print(_jit.PARALLEL_MIN_WORK)"],
                            env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "12345"
