"""Crossover of the attention core: materialised (B, NH, T, T) path against the fused kernel.

Forward + backward of the attention core only (no qkv / output projections), float32, q, k, v and
dy handed over as the strided (B, NH, T, hs) views CausalSelfAttention uses, both paths in the same
process and run, alternating, best of --reps after a warm-up:

  materialised  s = q k^T (BLAS), causal softmax kernel, y = a v; backward da = dy v^T, dv = a^T dy,
                softmax backward kernel, dq = ds k, dk = ds^T q (exactly the layer's readable path)
  fused         npgpt/fast/flash_attention.py forward + backward

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_flash_attention.py
"""
import argparse
import math
import time

from npgpt.fast import settings
settings.apply()   # first: OpenBLAS's short idle spin must be set before NumPy loads it
import numpy as np

from npgpt import fast
from npgpt.bench import blas_info


def views(buf, NH, hs):
    B, T, W = buf.shape
    n = W // (NH * hs)
    b = buf.reshape(B, T, n, NH, hs)
    return [b[:, :, i].transpose(0, 2, 1, 3) for i in range(n)]


def materialised(q, k, v, dy, scale, y, dq, dk, dv):
    s = q @ k.transpose(0, 1, 3, 2)
    a = fast.causal_softmax_forward(s, scale)
    y[...] = a @ v
    da = dy @ v.transpose(0, 1, 3, 2)
    np.matmul(a.transpose(0, 1, 3, 2), dy, out=dv)
    ds = fast.causal_softmax_backward(da, a, scale)
    np.matmul(ds, k, out=dq)
    np.matmul(ds.transpose(0, 1, 3, 2), q, out=dk)


def fused(q, k, v, dy, scale, y, dq, dk, dv):
    _, L = fast.flash_attention_forward(q, k, v, scale, out=y)
    fast.flash_attention_backward(q, k, v, y, L, dy, scale, dq, dk, dv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--B", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--NH", type=int, default=12)
    ap.add_argument("--hs", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"BLAS: {blas_info()}")
    print("| B | T | materialised fwd+bwd | fused fwd+bwd | fused / materialised | (B, NH, T, T) float32 arrays avoided |")
    print("|---|---|---|---|---|---|")
    NH, hs = args.NH, args.hs
    scale = 1.0 / math.sqrt(hs)
    for B in args.B:
        for T in args.T:
            rng = np.random.default_rng(0)
            qkv = rng.standard_normal((B, T, 3 * NH * hs), dtype=np.float32)
            dy_buf = rng.standard_normal((B, T, NH * hs), dtype=np.float32)
            y_buf = np.empty((B, T, NH * hs), np.float32)
            dqkv = np.empty((B, T, 3 * NH * hs), np.float32)
            q, k, v = views(qkv, NH, hs)
            (dy,), (y,) = views(dy_buf, NH, hs), views(y_buf, NH, hs)
            dq, dk, dv = views(dqkv, NH, hs)
            best = {}
            for rep in range(args.reps + 1):             # rep 0 warms up (compile / cache load, first touch)
                for name, fn in (("materialised", materialised), ("fused", fused)):
                    t0 = time.perf_counter()
                    fn(q, k, v, dy, scale, y, dq, dk, dv)
                    dt = time.perf_counter() - t0
                    if rep:
                        best[name] = min(best.get(name, float("inf")), dt)
            m, f = best["materialised"], best["fused"]
            mb = B * NH * T * T * 4 / 2 ** 20
            print(f"| {B} | {T} | {1e3 * m:.1f} ms | {1e3 * f:.1f} ms | {f / m:.2f}x | {mb:.0f} MiB each |", flush=True)


if __name__ == "__main__":
    main()
