"""Which ops of a GPT-2 training step use every core: each op's own time at 1 and at 2 (or N) threads,
in one process, the thread counts alternated round by round (issue 22).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_ops.py --shape gpt2 --B 4 --T 64
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_ops.py --shape gpt2 --B 8 --T 256
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_ops.py --shape nanogpt --B 12 --T 64

An op is a layer's forward or backward (its own time: what it runs itself, not the ops it calls), a
Numba kernel, the weight-gradient GEMM (Parameter.add_matmul) or a step of the optimizer; "step glue"
is the step's wall time minus every op's. Each op's speed-up from 1 to N threads says whether it uses
the cores: an op near 1.0x runs on one core while the others wait. The table gives each op's share of
the N-thread step; the last lines sum the time of ops that gain less than --serial-below.

The last line extrapolates to --predict threads op by op with Amdahl's law: an op taking t1 on one
thread and tN on N has a serial fraction f = (tN / t1 - 1/N) / (1 - 1/N) (clipped to [0, 1]), and is
predicted to take t1 (f + (1 - f) / P) on P threads. It ignores what only shows with more cores
(memory bandwidth, cache sizes, GEMMs that split better or worse), so it is a forecast, not a figure.

The timers cost about a microsecond a call, so the step is also timed without them ("bare").
"""
import argparse
import os
import time
from collections import defaultdict

SHAPES = {"gpt2": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
          "small": dict(n_vocab=50257, n_ctx=256, n_embd=384, n_head=6, n_layer=6),        # npgpt train --config small
          "nanogpt": dict(n_vocab=65, n_ctx=64, n_embd=128, n_head=4, n_layer=4)}        # shakespeare_char on a CPU
ap = argparse.ArgumentParser()
ap.add_argument("--shape", choices=list(SHAPES), default="gpt2")
ap.add_argument("--B", type=int, default=4)
ap.add_argument("--T", type=int, default=64)
ap.add_argument("--threads", type=int, default=os.cpu_count(), help="the many-thread count compared with 1")
ap.add_argument("--steps", type=int, default=5, help="timed steps per round and thread count")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--serial-below", type=float, default=1.25, help="speed-up under which an op counts as serial")
ap.add_argument("--rows", type=int, default=30)
ap.add_argument("--predict", type=int, default=16, help="thread count to extrapolate the step to (Amdahl, op by op)")
args = ap.parse_args()

from npgpt.fast import settings  # noqa: E402
settings.apply()   # as `npgpt train` runs: before NumPy loads OpenBLAS
import numba  # noqa: E402
import numpy as np  # noqa: E402
from threadpoolctl import ThreadpoolController  # noqa: E402

import npgpt  # noqa: E402
from npgpt import fast, layers  # noqa: E402
from npgpt.bench import OpClock, blas_info  # noqa: E402
from npgpt.layers.module import Parameter  # noqa: E402
from npgpt.train.lm import count_targets, lm_loss  # noqa: E402
from npgpt.train.loop import train_step  # noqa: E402


class TrainClock(OpClock):
    """npgpt.bench.OpClock over a train step's ops."""

    def instrument(self):
        """Time every layer's forward/backward, every Numba kernel, the weight-gradient GEMM, AdamW."""
        for cls in (layers.Embedding, layers.PositionEmbedding, layers.Dropout, layers.Block, layers.LayerNorm,
                    layers.CausalSelfAttention, layers.MLP, layers.Linear, layers.GELU, layers.TiedLMHead, npgpt.GPT):
            for meth in ("forward", "forward_without_bias", "backward", "attend", "backward_hidden", "forward_hidden"):
                if meth in vars(cls):
                    setattr(cls, meth, self.wrap(f"{cls.__name__}.{meth}", vars(cls)[meth]))
        for name in fast._KERNELS:
            setattr(fast, name, self.wrap(f"kernel {name}", getattr(fast, name)))
        Parameter.add_matmul = self.wrap("weight-grad GEMM (add_matmul)", Parameter.add_matmul)
        Parameter.zero_grad = self.wrap("Parameter.zero_grad", Parameter.zero_grad)
        npgpt.AdamW.step = self.wrap("AdamW.step", npgpt.AdamW.step)


def main():
    cfg = SHAPES[args.shape]
    N = args.threads
    print(f"shape {args.shape} {cfg}, B={args.B} T={args.T}; threads 1 vs {N}; blas: {blas_info()}")
    clock = TrainClock()
    clock.instrument()
    model = npgpt.GPT(npgpt.GPTConfig(**cfg), seed=0)
    opt = npgpt.AdamW(model, lr=1e-4)
    rng = np.random.default_rng(0)

    def step():
        idx = rng.integers(0, cfg["n_vocab"], (args.B, args.T))
        train_step(model, opt, (idx, np.roll(idx, -1, axis=1)), 1e-4, loss_fn=lm_loss, count_fn=count_targets)

    def steps(n, timed_ops):
        clock.on = timed_ops
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            t.append(time.perf_counter() - t0)
        clock.on = False
        return t

    # NumPy's BLAS only: the fused attention keeps SciPy's (its tiles' np.dot) on one thread
    numpy_blas = [lib for lib in ThreadpoolController().lib_controllers if "numpy" in lib.filepath]

    def set_threads(threads):
        for lib in numpy_blas:
            lib.set_num_threads(threads)
        numba.set_num_threads(threads)

    own = {1: defaultdict(list), N: defaultdict(list)}     # threads -> op -> per-round seconds per step
    wall, bare = {1: [], N: []}, {1: [], N: []}
    for threads in (1, N):                                  # warm-up: compile both kernel builds
        set_threads(threads)
        steps(2, False)
    for r in range(args.rounds):
        for threads in ((1, N) if r % 2 == 0 else (N, 1)):
            set_threads(threads)
            clock.own.clear(), clock.calls.clear()
            t = steps(args.steps, True)
            bare[threads].append(np.median(steps(args.steps, False)))
            wall[threads].append(sum(t) / args.steps)
            timed = 0.0
            for name, s in clock.own.items():
                own[threads][name].append(s / args.steps)
                timed += s / args.steps
            own[threads]["step glue (untimed Python)"].append(sum(t) / args.steps - timed)

    med = {th: {name: float(np.median(v)) for name, v in ops.items()} for th, ops in own.items()}
    step1, stepN = np.median(wall[1]), np.median(wall[N])
    print(f"step, bare: 1 thread {np.median(bare[1]) * 1e3:.1f} ms, {N} threads {np.median(bare[N]) * 1e3:.1f} ms "
          f"({np.median(bare[1]) / np.median(bare[N]):.2f}x); timed: {step1 * 1e3:.1f} ms, {stepN * 1e3:.1f} ms "
          f"(median of {args.rounds} rounds x {args.steps} steps)")
    print(f"| op | calls/step | 1 thread ms | {N} threads ms | speed-up | share of the {N}-thread step |")
    print("|---|---|---|---|---|---|")
    serial = 0.0
    for name in sorted(med[N], key=lambda k: -med[N][k])[:args.rows]:
        t1, tN = med[1].get(name, 0.0), med[N][name]
        gain = t1 / tN if tN > 0 else float("inf")
        mark = " (serial)" if gain < args.serial_below else ""
        if gain < args.serial_below:
            serial += tN
        calls = clock.calls.get(name, 0) / args.steps
        print(f"| {name}{mark} | {calls:.0f} | {t1 * 1e3:.2f} | {tN * 1e3:.2f} | {gain:.2f}x | {tN / stepN:.1%} |")
    print(f"ops gaining under {args.serial_below}x from {N} threads: {serial * 1e3:.2f} ms, {serial / stepN:.1%} of the step")
    P, predicted, serial_P = args.predict, 0.0, 0.0
    for name, t1 in med[1].items():
        tN = med[N].get(name, t1)
        f = min(1.0, max(0.0, (tN / t1 - 1 / N) / (1 - 1 / N))) if t1 > 0 and N > 1 else 1.0
        predicted += t1 * (f + (1 - f) / P)
        serial_P += t1 * f
    print(f"Amdahl, op by op, at {P} threads: {predicted * 1e3:.1f} ms a step ({step1 / predicted:.1f}x one thread), "
          f"of which {serial_P * 1e3:.1f} ms serial ({serial_P / predicted:.0%})")


if __name__ == "__main__":
    main()
