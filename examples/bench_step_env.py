"""The train step's median time under different process settings (environment variables), each in its
own fresh process, the settings alternated round by round: for the knobs read only at start-up
(GOMP_SPINCOUNT, OMP_WAIT_POLICY, OPENBLAS_THREAD_TIMEOUT, NUMBA_NUM_THREADS, ...). An empty variant is
npgpt's defaults.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_step_env.py --rounds 6 \\
        "" GOMP_SPINCOUNT=300 GOMP_SPINCOUNT=1000 GOMP_SPINCOUNT=3000

Defaults: nanoGPT's CPU shape (4 layers, 128 wide, 4 heads, V=65), B=12, T=64.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

STEP = r'''
import json, sys, time
from npgpt.fast import settings
settings.apply()
import numpy as np
import npgpt
from npgpt.train.lm import count_targets, lm_loss
from npgpt.train.loop import train_step
a = json.loads(sys.argv[1])
cfg = npgpt.GPTConfig(n_vocab=a["V"], n_ctx=a["T"], n_embd=a["C"], n_head=a["NH"], n_layer=a["L"])
model = npgpt.GPT(cfg, seed=0)
opt = npgpt.AdamW(model, lr=1e-3)
rng = np.random.default_rng(0)
times = []
for i in range(a["warmup"] + a["steps"]):
    idx = rng.integers(0, a["V"], (a["B"], a["T"]))
    t0 = time.perf_counter()
    train_step(model, opt, (idx, np.roll(idx, -1, 1)), 1e-3, loss_fn=lm_loss, count_fn=count_targets)
    times.append(time.perf_counter() - t0)
print(json.dumps(float(np.median(times[a["warmup"]:]))))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", help='"NAME=VALUE,NAME=VALUE" each; "" for the defaults')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--B", type=int, default=12)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-vocab", type=int, default=65)
    args = ap.parse_args()
    shape = dict(B=args.B, T=args.T, L=args.n_layer, C=args.n_embd, NH=args.n_head, V=args.n_vocab,
                 steps=args.steps, warmup=args.warmup)
    variants = []
    for v in args.variants:
        try:
            variants.append(dict(kv.split("=", 1) for kv in v.split(",") if kv))
        except ValueError:
            sys.exit(f"bench_step_env: variant {v!r} is not NAME=VALUE[,NAME=VALUE...]")
    times = [[] for _ in variants]
    for r in range(args.rounds):
        order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
        for i in order:
            env = dict(os.environ, **variants[i])
            out = subprocess.run([sys.executable, "-c", STEP, json.dumps(shape)], env=env, capture_output=True,
                                 text=True)
            if out.returncode != 0:
                sys.exit(f"bench_step_env: variant {args.variants[i]!r} failed: {out.stderr.strip().splitlines()[-1:]}")
            times[i].append(json.loads(out.stdout.strip().splitlines()[-1]) * 1e3)
    print(f"train step B={args.B} T={args.T}, {args.n_layer} x {args.n_embd}; median of {args.steps} steps a process")
    for v, t in zip(args.variants, times):
        print(f"{v or '(npgpt defaults)':40s} median {statistics.median(t):7.2f} ms   rounds "
              + " ".join(f"{x:.2f}" for x in t))


if __name__ == "__main__":
    main()
