"""float32 decoding's products two ways (issue 25, a measurement for what comes next): BLAS on Linear's own
(in, out) weights, y = x @ W, as npgpt decodes fp32 now, against fast.quant.packed_matmul on the same
weights laid out (out, in), one output channel a row, as the bf16 and int8 kernels read theirs. GPT-2
124M's 48 block matrices (12 layers, distinct arrays, 340 MB: read from memory every pass), N rows of x;
GB/s of float32 weights read, median of the rounds after the first.

One way a process (OpenBLAS's threads spin after each call and take the core a Numba kernel wants, so a
process that runs both measures neither); alternate the processes:

    for r in 1 2 3; do for w in blas rows; do
        env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_fp32_rows.py --way $w --N 1 2 4 8 16
    done; done
"""
import argparse
import time

from npgpt.fast import settings

settings.apply(inference=True)   # as `npgpt generate` runs: before NumPy loads OpenBLAS

import numpy as np  # noqa: E402

from npgpt.bench import blas_info, cpu_model  # noqa: E402
from npgpt.fast.quant import packed_matmul  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--way", choices=["blas", "rows"], required=True)
ap.add_argument("--N", nargs="+", type=int, default=[1, 8])
ap.add_argument("--rounds", type=int, default=6)
args = ap.parse_args()

rng = np.random.default_rng(0)
shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]          # (in, out): c_attn, c_proj, c_fc, mlp.c_proj
weights = [rng.standard_normal(s, dtype=np.float32) for _ in range(12) for s in shapes]
if args.way == "rows":
    weights = [np.ascontiguousarray(w.T) for w in weights]             # (out, in)
nbytes = sum(w.nbytes for w in weights)
print(f"CPU: {cpu_model()}; BLAS: {blas_info()}; {args.way}; {nbytes / 1e6:.0f} MB of float32 weights a pass")
for N in args.N:
    xs = {K: rng.standard_normal((N, K), dtype=np.float32) for K in (768, 3072)}
    bias = {O: np.zeros(O, np.float32) for O in (768, 2304, 3072)}
    ys = {O: np.empty((N, O), np.float32) for O in (768, 2304, 3072)}
    if args.way == "blas":
        def one_pass():
            for w in weights:
                np.matmul(xs[w.shape[0]], w, out=ys[w.shape[1]])            # y = x @ W
    else:
        def one_pass():
            for w in weights:
                packed_matmul(xs[w.shape[1]], w, None, bias[w.shape[0]], out=ys[w.shape[0]])   # y = x @ W^T
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    t = np.array(times[1:])
    print(f"N={N:3d} {args.way}: {np.median(t) * 1e3:7.2f} ms a pass, {nbytes / np.median(t) / 1e9:5.1f} GB/s "
          f"({nbytes / t.max() / 1e9:.1f}-{nbytes / t.min() / 1e9:.1f})", flush=True)
