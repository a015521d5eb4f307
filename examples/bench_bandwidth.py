"""Is an op slow because of its code or because of the memory? The machine's streaming bandwidth at 1
and N threads (a Numba triad, a = b + s c) beside AdamW's packed update over as many parameters as
GPT-2 124M has (npgpt.fast.adamw_update: reads p, g, m, v and writes p, m, v, 28 bytes a float32
parameter), each in GB/s. An update that gains little from more threads while the triad gains little
too is bound by the memory, not serial (issue 22).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_bandwidth.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_bandwidth.py --n 10000000 --threads 4

GB/s counts the bytes the loop reads and writes once each; a store into memory not in cache also reads
the line first (write-allocate), so the memory moves more than that.
"""
import argparse
import os
import time

from npgpt.fast import settings

settings.apply()   # as `npgpt train` runs (the kernels' threads sleep between launches)
import numba  # noqa: E402
import numpy as np  # noqa: E402

from npgpt import fast  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=124_439_808, help="float32 elements (GPT-2 124M's parameter count)")
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--reps", type=int, default=5, help="timed calls per round; the best is kept")
ap.add_argument("--rounds", type=int, default=2, help="rounds, the thread counts alternated")
args = ap.parse_args()


@numba.njit(parallel=True, fastmath=True, cache=True)
def triad(a, b, c, s):
    for i in numba.prange(a.size):
        a[i] = b[i] + s * c[i]


def best(f, reps):
    f()                                   # compile / touch every page
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    n = args.n
    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    p, g, m, v = (np.full(n, 0.01, np.float32) for _ in range(4))

    def adamw():
        fast.adamw_update(p, g, m, v, 1e-4, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05, 1.0)

    print(f"{n} float32 elements")
    res = {}
    for r in range(args.rounds):
        for th in ((1, args.threads) if r % 2 == 0 else (args.threads, 1)):
            numba.set_num_threads(th)
            t_triad = best(lambda: triad(a, b, c, np.float32(0.5)), args.reps)
            t_adamw = best(adamw, args.reps)
            res.setdefault(th, []).append((t_triad, t_adamw))
    print(f"threading layer: {numba.threading_layer()}")
    print("| threads | triad ms | triad GB/s (12 B an element) | AdamW update ms | AdamW GB/s (28 B a parameter) |")
    print("|---|---|---|---|---|")
    for th in (1, args.threads):
        t_triad = min(x[0] for x in res[th])
        t_adamw = min(x[1] for x in res[th])
        print(f"| {th} | {t_triad * 1e3:.1f} | {12 * n / t_triad / 1e9:.1f} | {t_adamw * 1e3:.1f} | "
              f"{28 * n / t_adamw / 1e9:.1f} |")


if __name__ == "__main__":
    main()
