"""Where a GPT-2 training step's time goes: the step itself, the same step's GEMMs replayed
alone (the GEMM-only lower bound on this machine and BLAS), and a per-function profile.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_train_step.py --B 4 --T 64
"""
import argparse
import cProfile
import pstats
import time

import npgpt  # first: sets OpenBLAS's idle spin before NumPy loads it
import numpy as np
from npgpt.runtime import keep_freed_memory


def gemm_replay(cfg, B, T, dtype=np.float32, reps=3):
    """Every GEMM of one forward + backward, same shapes and layouts, nothing else."""
    rng = np.random.default_rng(0)
    C, V, NH, L = cfg.n_embd, cfg.n_vocab, cfg.n_head, cfg.n_layer
    N, hs = B * T, C // NH
    linears = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * L
    W = [rng.standard_normal(s, dtype=dtype) for s in linears]
    dW = [np.empty_like(w) for w in W]
    act = {n: rng.standard_normal((N, n), dtype=dtype) for n in (C, 3 * C, 4 * C)}
    wte, dwte = rng.standard_normal((V, C), dtype=dtype), np.empty((V, C), dtype)
    logits = np.empty((N, V), dtype)
    q = rng.standard_normal((B, NH, T, hs), dtype=dtype)
    att = rng.standard_normal((B, NH, T, T), dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in W:                                     # forward
            act[w.shape[0]] @ w
        for _ in range(L):
            q @ q.transpose(0, 1, 3, 2)
            att @ q
        np.matmul(act[C], wte.T, out=logits)
        np.matmul(logits, wte)                          # backward of the LM head
        np.matmul(logits.T, act[C], out=dwte)
        for w, dw in zip(W, dW):                        # backward of the linears
            np.matmul(act[w.shape[0]].T, act[w.shape[1]], out=dw)
            act[w.shape[1]] @ w.T
        for _ in range(L):                              # backward of attention
            att @ q
            att.transpose(0, 1, 3, 2) @ q
            att @ q
            att.transpose(0, 1, 3, 2) @ q
        best = min(best, time.perf_counter() - t0)
    flops = 2 * N * sum(a * b for a, b in linears) * 3 + 2 * N * C * V * 3 + L * 6 * 2 * B * NH * T * T * hs
    return best, flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    keep_freed_memory()
    cfg = npgpt.GPTConfig()
    model = npgpt.GPT(cfg, seed=0)
    opt = npgpt.AdamW(model, lr=1e-4)
    rng = np.random.default_rng(0)

    def step():
        idx = rng.integers(0, cfg.n_vocab, (args.B, args.T))
        model.zero_grad()
        logits = model.forward(idx)
        _, dlogits = npgpt.cross_entropy(logits, np.roll(idx, -1, 1), out=logits)
        model.backward(dlogits)
        npgpt.clip_grad_norm(model, 1.0)
        opt.step()

    step()                                              # warm-up: kernels, first-touch memory
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    total = sorted(times)[len(times) // 2]
    gemm, flops = gemm_replay(cfg, args.B, args.T)
    print(f"train step B={args.B} T={args.T}: {total:.3f} s (median of {args.steps})")
    print(f"GEMMs alone (replayed): {gemm:.3f} s = {flops / gemm / 1e9:.0f} GFLOP/s over {flops / 1e9:.0f} GFLOP")
    print(f"everything else: {total - gemm:.3f} s ({(total - gemm) / total:.0%})\n")
    prof = cProfile.Profile()
    prof.runcall(step)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
