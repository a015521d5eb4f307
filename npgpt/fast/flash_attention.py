"""Fused causal attention for training (FlashAttention-2's tiling, written for a CPU). It mirrors
npgpt/layers/attention.py (CausalSelfAttention.attend and the attention part of its backward):

    s  = q @ k^T                                   (B, NH, T, T)
    a  = softmax(scale * s), key j masked out for query i when j > i
    y  = a @ v                                     (B, NH, T, hs)
    # backward, from dy:
    da = dy @ v^T;  dv = a^T @ dy
    ds = scale * a * (da - rowsum(da * a))
    dq = ds @ k;    dk = ds^T @ q

without ever holding the (B, NH, T, T) scores or probabilities. Per (batch row, head), in
parallel over B * NH (prange), q * scale, k and v are first copied into contiguous arrays (k and v
straight into a KV cache's buffers when a prompt fills one: kv_out), then the queries are cut into
blocks of `block` rows and the keys into blocks of `block` columns; a (block x block) tile of scores
lives only while it is used:

  forward   for each query block: for each key block left of (or on) the diagonal (blocks above
            it are skipped, every key there is masked):
                S = (scale q_i) k_j^T; online softmax: m_new = max(m, rowmax S), P = exp(S - m_new),
                l = l * exp(m - m_new) + rowsum P,  acc = acc * exp(m - m_new) + P v_j
            y_i = acc / l; keep only L = m + log(l) per query row (the row's logsumexp).
  backward  D = rowsum(dy * y) (= rowsum(da * a), since da * a summed over j is dy . (a v));
            for each key block j: for each query block i on or below the diagonal:
                P = exp((scale q_i) k_j^T - L_i)     (recomputed, exactly the forward's a)
                dv_j += P^T dy_i;  dP = dy_i v_j^T;  dS = P * (dP - D_i)
                dq_i += scale dS k_j;  dk_j += dS^T (scale q_i)

The products of tiles go through np.dot on contiguous tile slices (BLAS: a 128 x 128 x 64 product
is one small, single-threaded GEMM; Numba takes it from SciPy, so the kernel needs SciPy installed:
without it CausalSelfAttention keeps the readable path); the softmax parts are loops over the tile. The forward's
row sums are kept in the input dtype (float32 or float64), as the reference does (a float64 sum over
float32 tiles ran at half the SIMD width); the backward's D, a dot product of hs terms per row, is
summed in float64. exp is the vectorised one of npgpt/fast/_math.py.

Dropout on the probabilities is not implemented here: CausalSelfAttention uses this kernel only
when attention dropout is inactive (p = 0 or eval mode) and takes the readable path otherwise.
"""
import numpy as np
from numba import prange

from ._jit import pjit
from ._math import exp, exp_sum_, max_of

BLOCK = 128                         # query and key block size (rows of a tile); measured against 32, 64, 96


@pjit(reductions=True)
def _forward(q, k, v, scale, block, y, L, K_out, V_out, to_out):
    """q, k, v, y (B, NH, T, hs) any strides; L (B, NH, T) logsumexp of scale * s per query row.
    to_out: k and v are copied into K_out, V_out (B, NH, >= T, hs) C-contiguous (a KV cache's
    buffers) and the tiles are cut from there; else into scratch of the kernel's own."""
    B, NH, T, hs = q.shape
    dt = q.dtype
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        Q = np.empty((T, hs), dt)                  # this head's q * scale, k, v, contiguous
        if to_out:
            K, V = K_out[b, h], V_out[b, h]
        else:
            K, V = np.empty((T, hs), dt), np.empty((T, hs), dt)
        for t in range(T):
            for d in range(hs):
                Q[t, d] = q[b, h, t, d] * scale
                K[t, d] = k[b, h, t, d]
                V[t, d] = v[b, h, t, d]
        m = np.empty(block, dt)                    # running row max of scale * s
        l = np.empty(block, dt)                    # running row sum of exp(scale * s - m)
        for i0 in range(0, T, block):
            i1 = min(i0 + block, T)
            nr = i1 - i0
            Qi = Q[i0:i1]
            acc = np.zeros((nr, hs), dt)           # unnormalised y rows
            for r in range(nr):
                m[r] = -np.inf
                l[r] = 0.0
            for j0 in range(0, i1, block):         # key blocks above the diagonal are skipped
                j1 = min(j0 + block, i1)
                nc = j1 - j0
                S = np.dot(Qi, K[j0:j1].T)         # (nr, nc) scores, already scaled
                for r in range(nr):
                    last = min(nc, i0 + r - j0 + 1)    # keys j0 .. j0 + last - 1 are visible
                    mx = max(m[r], max_of(S[r], 0, last))
                    alpha = exp(m[r] - mx)      # 0 on the first block (m = -inf)
                    rs = exp_sum_(S[r, :last], mx)     # P = exp(S - m_new) in place, and its row sum
                    for c in range(last, nc):
                        S[r, c] = 0.0
                    l[r] = l[r] * alpha + rs
                    m[r] = mx
                    for d in range(hs):
                        acc[r, d] *= alpha
                acc += np.dot(S, V[j0:j1])
            for r in range(nr):
                inv = 1.0 / l[r]
                for d in range(hs):
                    y[b, h, i0 + r, d] = acc[r, d] * inv
                L[b, h, i0 + r] = m[r] + np.log(l[r])


@pjit(reductions=True)
def _backward(q, k, v, y, L, dy, scale, block, dq, dk, dv):
    """Writes dq, dk, dv (B, NH, T, hs) (any strides) from dy and the forward's y and L."""
    B, NH, T, hs = q.shape
    dt = q.dtype
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        Q = np.empty((T, hs), dt)                  # q * scale
        K = np.empty((T, hs), dt)
        V = np.empty((T, hs), dt)
        dO = np.empty((T, hs), dt)
        D = np.empty(T, dt)                        # rowsum(dy * y) = rowsum(da * a)
        for t in range(T):
            acc = 0.0
            for d in range(hs):
                Q[t, d] = q[b, h, t, d] * scale
                K[t, d] = k[b, h, t, d]
                V[t, d] = v[b, h, t, d]
                g = dy[b, h, t, d]
                dO[t, d] = g
                acc += g * y[b, h, t, d]
            D[t] = acc
        dQ = np.zeros((T, hs), dt)                 # without the factor scale (applied when written)
        dK = np.zeros((T, hs), dt)
        dV = np.zeros((T, hs), dt)
        for j0 in range(0, T, block):
            j1 = min(j0 + block, T)
            nc = j1 - j0
            Kj = K[j0:j1]
            Vj = V[j0:j1]
            for i0 in range(j0, T, block):         # query blocks on or below the diagonal
                i1 = min(i0 + block, T)
                nr = i1 - i0
                P = np.dot(Q[i0:i1], Kj.T)         # (nr, nc) scaled scores -> probabilities
                for r in range(nr):
                    last = min(nc, i0 + r - j0 + 1)
                    Li = L[b, h, i0 + r]
                    for c in range(last):
                        P[r, c] = exp(P[r, c] - Li)
                    for c in range(last, nc):
                        P[r, c] = 0.0
                dOi = dO[i0:i1]
                dV[j0:j1] += np.dot(P.T, dOi)
                dS = np.dot(dOi, Vj.T)             # dP, then dS = P * (dP - D) in place
                for r in range(nr):
                    Di = D[i0 + r]
                    for c in range(nc):
                        dS[r, c] = P[r, c] * (dS[r, c] - Di)
                dQ[i0:i1] += np.dot(dS, Kj)
                dK[j0:j1] += np.dot(dS.T, Q[i0:i1])    # = scale * ds^T q
        for t in range(T):
            for d in range(hs):
                dq[b, h, t, d] = dQ[t, d] * scale
                dk[b, h, t, d] = dK[t, d]
                dv[b, h, t, d] = dV[t, d]


_tile_blas_checked = False


def single_threaded_tile_blas() -> bool:
    """Make the BLAS the tiles' np.dot runs on single-threaded, once per process.

    Numba takes np.dot from SciPy (scipy.linalg.cython_blas), and SciPy's wheels bundle an OpenBLAS of
    their own, apart from NumPy's, with a thread per core. Called from inside the prange loop, it
    would start threads inside threads: on 2 cores that made the backward at B=2, T=1024 168 ms
    instead of 117 (with 64-row tiles). Returns True if a SciPy
    OpenBLAS was found and set to one thread (a SciPy built on another BLAS is left as it is).
    SciPy's own linear algebra in this process then runs on one thread."""
    global _tile_blas_checked
    if _tile_blas_checked:
        return False
    _tile_blas_checked = True
    import ctypes
    import glob
    import os

    import scipy
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba calls)
    libs = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")     # where the wheel keeps it
    done = False
    for path in glob.glob(os.path.join(os.path.normpath(libs), "libscipy_openblas*.so*")):
        try:
            lib = ctypes.CDLL(path)                    # already loaded: the same library, no second copy
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(1)
                done = True
                break
    return done


def _work(q):
    B, NH, T, hs = q.shape
    return B * NH * T * (T + 1) // 2 * hs // 64    # ~ elements of the causal score triangle (hs = 64)


def flash_attention_forward(q, k, v, scale, out=None, block=BLOCK, kv_out=None):
    """y = causal softmax(scale * q k^T) v for q, k, v (B, NH, T, hs) (views of any strides, one dtype).

    Writes y into `out` (B, NH, T, hs) when given (e.g. a transposed view of the (B, T, C) buffer the
    heads are re-assembled in), else a new array. kv_out: a pair of C-contiguous (B, NH, >= T, hs)
    buffers (a KV cache's) that receive k and v at positions 0 .. T-1 on the way. Returns (y, L) with
    L (B, NH, T) the logsumexp of each query row's scaled scores, all that flash_attention_backward
    needs besides q, k, v, y."""
    B, NH, T, hs = q.shape
    single_threaded_tile_blas()
    y = np.empty(q.shape, q.dtype) if out is None else out
    L = np.empty((B, NH, T), q.dtype)
    if kv_out is None:
        K = V = np.empty((1, 1, 1, hs), q.dtype)     # unused: the kernel copies into scratch of its own
    else:
        K, V = kv_out
        for a in (K, V):
            if not (a.flags.c_contiguous and a.dtype == q.dtype and a.shape[:2] == (B, NH)
                    and a.shape[2] >= T and a.shape[3] == hs):
                raise ValueError(f"kv_out must be C-contiguous {q.dtype} (B, NH, >= T, hs) = ({B}, {NH}, "
                                 f">= {T}, {hs}) buffers, got {a.dtype} {a.shape}")
    _forward(_work(q), q, k, v, scale, int(block), y, L, K, V, kv_out is not None)
    return y, L


def flash_attention_backward(q, k, v, y, L, dy, scale, dq=None, dk=None, dv=None, block=BLOCK):
    """(dq, dk, dv) of the forward above from dy (B, NH, T, hs); written into dq, dk, dv when given
    (e.g. views of the (B, T, 3, NH, hs) gradient of the fused qkv projection), else new arrays."""
    single_threaded_tile_blas()
    dq = np.empty(q.shape, q.dtype) if dq is None else dq
    dk = np.empty(q.shape, q.dtype) if dk is None else dk
    dv = np.empty(q.shape, q.dtype) if dv is None else dv
    _backward(2 * _work(q), q, k, v, y, L, dy, scale, int(block), dq, dk, dv)
    return dq, dk, dv
