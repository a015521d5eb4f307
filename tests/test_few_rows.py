"""npgpt/fast/few_rows.py: float32 products of a few rows, x @ w with w (in, out) and x @ w.T with w (out,
in), against the NumPy lines they mirror, each row the same bits in any batch, and Linear and the tied LM
head routing decoding's rows to them."""
import numpy as np
import pytest

import npgpt
from npgpt import fast
from npgpt.fast.few_rows import COLS, K_CHUNK, few_rows_matmul, few_rows_matmul_t
from npgpt.layers import linear


def _within_sum_bound(y, x, w):
    """|y - x @ w| within the bound of any order of float32 sums of K products, each rounded at most
    twice: (K + 1) u sum_k |x_k w_kj| (u = 2^-24), so no CPU's rounding decides it."""
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bound = (x.shape[1] + 1) * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    assert np.all(np.abs(y - exact) <= bound + 1e-30)


def fma_chain(x, w, start=None):
    """y[n, j] = fma(x[n, K-1], w[K-1, j], ... fma(x[n, 0], w[0, j], start[n, j])) in float32 (start 0), exactly: each step in
    float64, where x * w is exact (24 + 24 bits) and the sum rounds once; rounding that to float32 is
    fma's single rounding unless the float64 value lies exactly halfway between two float32 numbers
    (then the first rounding may have put it there), which the check excludes for the data given."""
    y = np.zeros((x.shape[0], w.shape[1]), np.float32) if start is None else start.astype(np.float32)
    for k in range(x.shape[1]):
        s = x[:, k:k + 1].astype(np.float64) * w[k].astype(np.float64) + y      # (N, out)
        y = s.astype(np.float32)
        for toward in (-np.inf, np.inf):
            neighbour = np.nextafter(y, np.float32(toward)).astype(np.float64)
            assert not np.any(s == (y.astype(np.float64) + neighbour) / 2), "a tie: pick other data"
    return y


def test_each_sum_is_the_fma_chain_in_order():
    """Every output, in the tiles and in the columns past them, is its own chain of fused multiply-adds over
    k = 0..K-1 (across the K_CHUNK boundaries too): IEEE operations, the same bits on every CPU."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((7, 2 * K_CHUNK + 88), dtype=np.float32)   # partial sums resumed from y twice
    w = rng.standard_normal((x.shape[1], 2 * COLS + 11), dtype=np.float32)
    np.testing.assert_array_equal(few_rows_matmul(x, w), fma_chain(x, w))


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 7, 8, 13])                 # 13: serve's wider batches
@pytest.mark.parametrize("K,O", [(768, 2304), (3072, 768), (33, 70), (5, COLS), (9, 13), (0, COLS + 1)])  # tiles; a tail; tail only; empty sums
def test_products_against_numpy(N, K, O):
    rng = np.random.default_rng(N * 1000 + O)
    x = rng.standard_normal((N, K), dtype=np.float32)
    w = rng.standard_normal((K, O), dtype=np.float32)
    y = few_rows_matmul(x, w)
    assert y.shape == (N, O) and y.dtype == np.float32
    _within_sum_bound(y, x, w)
    out = np.full((N, O), np.nan, np.float32)
    assert few_rows_matmul(x, w, out=out) is out
    np.testing.assert_array_equal(out, y)


def test_each_row_the_same_bits_in_any_batch(monkeypatch):
    """A row's values do not depend on how many rows share the call or where it sits among them (the tile
    of four, two or one it falls in), nor on the serial or the parallel build (threads split the columns)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 200), dtype=np.float32)
    w = rng.standard_normal((200, 2 * COLS + 9), dtype=np.float32)
    alone = np.stack([few_rows_matmul(x[n:n + 1], w)[0] for n in range(8)])
    for N in range(1, 9):
        np.testing.assert_array_equal(few_rows_matmul(x[:N], w), alone[:N])
    np.testing.assert_array_equal(few_rows_matmul(x[3:8], w), alone[3:8])
    wt = np.ascontiguousarray(w.T)                                          # (out, in) for the head's kernel
    serial = few_rows_matmul_t(x, wt)
    from npgpt.fast import _jit
    monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 0)                       # the parallel builds, however small
    np.testing.assert_array_equal(few_rows_matmul(x, w), alone)
    np.testing.assert_array_equal(few_rows_matmul_t(x, wt), serial)


def test_inf_and_nan_reach_the_outputs():
    x = np.ones((3, 10), np.float32)
    w = np.ones((10, COLS + 3), np.float32)
    x[1, 4] = np.inf
    w[7, 2] = np.nan
    y = few_rows_matmul(x, w)
    assert np.isnan(y[:, 2]).all()                      # a NaN weight: every row's column 2
    assert np.isposinf(y[1, 3:]).all() and np.isfinite(y[[0, 2]][:, 3:]).all()
    assert (y[[0, 2]][:, 3:] == 10).all()


def test_linear_routes_few_float32_rows(monkeypatch):
    """Linear takes the kernel for 2..FEW_ROWS float32 rows with the Numba backend, BLAS otherwise; the
    values agree with the NumPy backend's to the sum bound."""
    calls = []
    real = fast.few_rows_matmul
    monkeypatch.setattr(fast, "few_rows_matmul", lambda *a: calls.append(len(a[0])) or real(*a))
    layer = linear.Linear(48, 130, rng=np.random.default_rng(1))
    rng = np.random.default_rng(2)
    with npgpt.no_grad():
        top = min(linear.Linear.FEW_ROWS, fast.rows_limit())         # 8 rows with AVX-512, 4 without
        for N, routed in ((1, False), (2, True), (top, True), (top + 1, False)):
            x = rng.standard_normal((N, 48), dtype=np.float32)
            calls.clear()
            y = layer.forward_without_bias(x)
            assert calls == ([N] if routed else [])
            _within_sum_bound(y, x, layer.weight.data)
            with fast.use_backend("numpy"):
                calls.clear()
                layer.forward_without_bias(x)
                assert calls == []
        wide = linear.Linear(48, 130, rng=np.random.default_rng(1), dtype=np.float64)
        calls.clear()
        wide.forward_without_bias(rng.standard_normal((4, 48)))
        assert calls == []                                               # float64 (gradient checks): BLAS


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 6, 7, 8])       # 5-8: four rows of w at a time with AVX-512
@pytest.mark.parametrize("K,O", [(768, 1000), (37, 5), (16, 3), (7, 130), (0, 4)])   # whole vectors; tails; tail only
def test_transposed_products_against_numpy(N, K, O):
    rng = np.random.default_rng(N * 100 + K)
    x = rng.standard_normal((N, K), dtype=np.float32)
    w = rng.standard_normal((O, K), dtype=np.float32)                  # (out, in), as wte
    y = few_rows_matmul_t(x, w)
    assert y.shape == (N, O) and y.dtype == np.float32
    _within_sum_bound(y, x, w.T)
    alone = np.stack([few_rows_matmul_t(x[n:n + 1], w)[0] for n in range(N)])
    np.testing.assert_array_equal(y, alone)                            # each row the same bits in any batch


def test_transposed_inf_and_nan():
    x = np.ones((3, 40), np.float32)
    w = np.ones((5, 40), np.float32)
    x[1, 38] = np.inf                                                  # in the tail past the last whole vector
    w[2, 3] = np.nan
    y = few_rows_matmul_t(x, w)
    assert np.isnan(y[:, 2]).all() and np.isposinf(y[1, [0, 1, 3, 4]]).all()
    assert (y[[0, 2]][:, [0, 1, 3, 4]] == 40).all()


def test_lm_head_routes_few_float32_rows(monkeypatch):
    """The tied head: 1..FEW_ROWS rows to the packed-row kernels (fast.quant.packed_matmul: the dot products up
    to DOT_ROWS rows, bit for bit, with one weight row at a time), more to BLAS; the NumPy backend always
    BLAS; all within the sum bound."""
    from npgpt.fast import quant
    from npgpt.layers.embedding import Embedding, TiedLMHead
    calls = []
    real_q = quant.packed_matmul
    monkeypatch.setattr(quant, "packed_matmul", lambda *a, **k: calls.append("rows") or real_q(*a, **k))
    monkeypatch.setattr(quant, "_SIDE_BY_SIDE", 1)       # 4 (Intel): one row runs the older loop instead
    head = TiedLMHead(Embedding(97, 40, rng=np.random.default_rng(3)))
    rng = np.random.default_rng(4)
    with npgpt.no_grad():
        for N, way in ((1, "rows"), (quant.DOT_ROWS, "rows"), (TiedLMHead.FEW_ROWS, "rows"),
                       (TiedLMHead.FEW_ROWS + 1, None)):
            x = rng.standard_normal((1, N, 40), dtype=np.float32)
            calls.clear()
            y = head(x)
            assert y.shape == (1, N, 97) and calls == ([way] if way else [])
            _within_sum_bound(y[0], x[0], head.weight.data.T)
            if N <= quant.DOT_ROWS:
                np.testing.assert_array_equal(y[0], few_rows_matmul_t(x[0], head.weight.data))
            with fast.use_backend("numpy"):
                calls.clear()
                head(x)
                assert calls == []


@pytest.mark.parametrize("N", [3, 7])                    # 7: four rows of w at a time (with AVX-512), 70 % 4 alone
def test_transposed_sums_in_their_fixed_order(N):
    """few_rows_matmul_t's order, emulated exactly: lane l chains the terms k = l, l + 16, ... (FMA), the
    16 lanes are added in halves (l + 8, then l + 4, ...), and the last in % 16 terms continue by FMA."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N, 16 * 9 + 5), dtype=np.float32)
    w = rng.standard_normal((70, x.shape[1]), dtype=np.float32)             # (out, in)
    whole = x.shape[1] // 16 * 16
    lanes = [fma_chain(x[:, l:whole:16], w.T[l:whole:16]) for l in range(16)]   # (N, out) each
    while len(lanes) > 1:
        half = len(lanes) // 2
        lanes = [lanes[l] + lanes[l + half] for l in range(half)]           # float32 adds
    expected = fma_chain(x[:, whole:], w.T[whole:], start=lanes[0])
    np.testing.assert_array_equal(few_rows_matmul_t(x, w), expected)


def test_bad_shapes_are_refused():
    """The kernels index raw memory, so what BLAS would refuse they refuse too, before touching it."""
    x, w = np.ones((2, 10), np.float32), np.ones((8, 64), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        few_rows_matmul(x, w)                                               # K 10 against w's 8 rows
    with pytest.raises(ValueError, match="do not match"):
        few_rows_matmul_t(x, w)                                             # K 10 against w's 64 columns
    with pytest.raises(ValueError, match="out must be"):
        few_rows_matmul(np.ones((2, 8), np.float32), w, out=np.empty((2, 32), np.float32))
    sq = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="out must be"):
        few_rows_matmul(sq, sq.copy(), out=sq)                              # out overlapping x
    with pytest.raises(ValueError, match="C-ordered 2-D float32"):
        few_rows_matmul(np.ones((2, 8)), w)                                 # float64
    with pytest.raises(ValueError, match="C-ordered 2-D float32"):
        few_rows_matmul_t(x, np.ones((10, 8), np.float32).T)               # a transposed view
    with pytest.raises(ValueError, match="float32 or bf16 bits"):
        few_rows_matmul_t(x, np.ones((3, 10), np.int8))                     # int8 rows: fast.quant's kernels


def test_four_rows_of_w_at_a_time_on_any_cpu():
    """The four-rows-of-w dot products (used for 5-8 rows of x with AVX-512) run here whatever the CPU: each
    output the same bits as one row of w at a time."""
    from numba import njit
    from npgpt.fast import few_rows
    kernels = {1: (few_rows._dots1, few_rows._dots1x4), 2: (few_rows._dots2, few_rows._dots2x4),
               4: (few_rows._dots4, few_rows._dots4x4)}
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 16 * 3 + 7), dtype=np.float32)
    for w in (rng.standard_normal((8, x.shape[1]), dtype=np.float32),
              few_rows_bf16(rng.standard_normal((8, x.shape[1]), dtype=np.float32))):
        for R, (one, four) in kernels.items():
            @njit
            def run(x, w, y1, y4, one=one, four=four, R=R):
                for o in range(w.shape[0]):
                    one(x, w, y1, 0, o)
                for o in range(0, w.shape[0], 4):
                    four(x, w, y4, 0, o)
            y1, y4 = np.zeros((R, 8), np.float32), np.ones((R, 8), np.float32)
            run(np.ascontiguousarray(x[:R]), w, y1, y4)
            np.testing.assert_array_equal(y4, y1)
            np.testing.assert_array_equal(y1, few_rows_matmul_t(np.ascontiguousarray(x[:R]), w))


def few_rows_bf16(w):
    from npgpt.inference.quant import to_bf16
    return to_bf16(w)


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8])
def test_bf16_rows_are_their_float32_values(N, monkeypatch):
    """bf16 bits (uint16) are widened exactly in registers: the same sums as on the float32 values they stand
    for, bit for bit, and decoding's packed products (up to fast.quant.DOT_ROWS rows; one row streaming one
    weight row at a time, side_by_side() 1) are these plus the bias."""
    from npgpt.fast import quant
    monkeypatch.setattr(quant, "_SIDE_BY_SIDE", 1)       # 4 (Intel): one row runs the older loop instead
    from npgpt.inference.quant import to_bf16, unpack
    rng = np.random.default_rng(N)
    x = rng.standard_normal((N, 16 * 5 + 3), dtype=np.float32)
    w16 = to_bf16(rng.standard_normal((37, x.shape[1]), dtype=np.float32))
    b = rng.standard_normal(37, dtype=np.float32)
    y = few_rows_matmul_t(x, w16)
    np.testing.assert_array_equal(y, few_rows_matmul_t(x, np.ascontiguousarray(unpack(w16))))
    _within_sum_bound(y, x, unpack(w16).T)
    if N <= quant.DOT_ROWS:
        np.testing.assert_array_equal(quant.packed_matmul(x, w16, None, b), y + b)
