"""Where a GPT-2 training step's time goes: the training loop's step itself, the same step's GEMMs
replayed alone (the GEMM-only lower bound on this machine and BLAS; npgpt.bench.gemm_replay), and a
per-function profile of one more step.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_train_step.py --B 4 --T 64
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_train_step.py --B 8 --T 256 --steps 3
    python examples/profile_train_step.py --shape nanogpt --B 12 --T 64 --threads 16   # nanoGPT's CPU shape

`npgpt bench --workloads train train-large` reports the same step / GEMM ratio.
"""
import argparse
import cProfile
import os
import pstats

SHAPES = {"gpt2": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
          "small": dict(n_vocab=50257, n_ctx=256, n_embd=384, n_head=6, n_layer=6),        # npgpt train --config small
          "nanogpt": dict(n_vocab=65, n_ctx=64, n_embd=128, n_head=4, n_layer=4)}        # shakespeare_char on a CPU
ap = argparse.ArgumentParser()
ap.add_argument("--shape", choices=list(SHAPES), default="gpt2")
ap.add_argument("--B", type=int, default=4)
ap.add_argument("--T", type=int, default=64)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads (default: all cores)")
ap.add_argument("--rows", type=int, default=25, help="profile rows to print")
args = ap.parse_args()
if args.threads:                             # read when NumPy and Numba load their thread pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)

from npgpt.fast import settings  # noqa: E402
settings.apply()   # first: OpenBLAS's short idle spin must be set before NumPy loads it
import npgpt  # noqa: E402
import numpy as np  # noqa: E402
from npgpt.bench import blas_info, npgpt_train  # noqa: E402
from npgpt.train.lm import count_targets, lm_loss  # noqa: E402
from npgpt.train.loop import train_step  # noqa: E402


def main():
    cfg = SHAPES[args.shape]
    print(f"shape {args.shape} {cfg}; blas: {blas_info()}")
    r = npgpt_train(cfg, args.B, args.T, args.steps)
    print(f"train step B={args.B} T={args.T}: {r['seconds']:.3f} s (median of {args.steps} after 2 warm-up steps), "
          f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB")
    print(f"alternating with its GEMM-only replay: step {r['paired_seconds']:.3f} s, GEMMs {r['gemm_seconds']:.3f} s "
          f"({r['gemm_flops'] / r['gemm_seconds'] / 1e9:.0f} GFLOP/s over {r['gemm_flops'] / 1e9:.0f} GFLOP): "
          f"step / GEMMs = {r['over_gemm']:.3f}x, everything else {r['paired_seconds'] - r['gemm_seconds']:.3f} s")
    print("  steps:", " ".join(f"{t:.3f}" for t in r["paired_all"]), "| GEMMs:", " ".join(f"{t:.3f}" for t in r["gemm_all"]))

    model = npgpt.GPT(npgpt.GPTConfig(**cfg), seed=0)  # a fresh model for the profile (two warm-up steps)
    opt = npgpt.AdamW(model, lr=1e-4)
    rng = np.random.default_rng(0)

    def step():
        idx = rng.integers(0, cfg["n_vocab"], (args.B, args.T))
        train_step(model, opt, (idx, np.roll(idx, -1, axis=1)), 1e-4, loss_fn=lm_loss, count_fn=count_targets)

    step(), step()
    prof = cProfile.Profile()
    prof.runcall(step)
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
