"""What a parallel Numba kernel loses to waking its threads: GELU's training forward (y and dgelu/dx; until
2026-12-07 this timed GELU's backward, now a multiply bound by memory) on an
MLP-sized activation, timed back to back at 1 and N threads (issue 22). npgpt's training lets the kernels'
OpenMP threads sleep as soon as a kernel ends (OMP_WAIT_POLICY=PASSIVE, npgpt/fast/settings.py), so each
launch wakes them; with spinning threads it shows what the kernel itself gains:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_kernel_wakeup.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_WAIT_POLICY=ACTIVE python examples/bench_kernel_wakeup.py

The difference between the two N-thread times is about the wake-up a launch pays.
"""
import argparse
import os
import time

from npgpt.fast import settings

settings.apply()   # as `npgpt train` runs; an OMP_WAIT_POLICY already set wins
import numba  # noqa: E402
import numpy as np  # noqa: E402

from npgpt import fast  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=768, help="B*T (nanoGPT's CPU run: 12 x 64)")
ap.add_argument("--cols", type=int, default=512, help="the MLP's width, 4C")
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--calls", type=int, default=300, help="timed calls per round (median kept)")
ap.add_argument("--rounds", type=int, default=2)
args = ap.parse_args()


def median_us(f, n):
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def main():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    res = {1: [], args.threads: []}
    for r in range(args.rounds):
        for th in ((1, args.threads) if r % 2 == 0 else (args.threads, 1)):
            numba.set_num_threads(th)
            res[th].append(median_us(lambda: fast.gelu_forward(x, slope=True), args.calls))
    print(f"gelu_forward(slope=True) ({args.rows}, {args.cols}) float32, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}")
    t1, tn = min(res[1]), min(res[args.threads])
    print(f"1 thread {t1:.0f} us, {args.threads} threads {tn:.0f} us ({t1 / tn:.2f}x); "
          f"rounds: {' '.join(f'{v:.0f}' for v in res[1])} / {' '.join(f'{v:.0f}' for v in res[args.threads])}")


if __name__ == "__main__":
    main()
