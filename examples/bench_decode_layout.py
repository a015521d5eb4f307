"""float32 decoding with the weights as loaded (Linear's (in, out): BLAS's GEMV at one row, few_rows_matmul's
tiles at 2-8) against the same weights laid out as rows (npgpt.inference.quant.decode_layout: dot products, each
block one compiled call), in one process, alternated in pairs: GPT-2 124M shapes, random weights, a
`--prompt`-token prompt (32), then `--new` greedy tokens a round; ms a decoded token and the ratio of each pair.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_decode_layout.py [--B 1 2 4 8] [--rounds 6]
"""
import argparse
import time

from npgpt.fast import settings

settings.apply(inference=True)   # as `npgpt generate` runs: before NumPy loads OpenBLAS

import numpy as np  # noqa: E402

import npgpt  # noqa: E402
from npgpt.bench import blas_info, cpu_model  # noqa: E402
from npgpt.inference.decode import Decoder  # noqa: E402
from npgpt.inference.quant import decode_layout  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--B", nargs="+", type=int, default=[1, 2, 4, 8])
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--new", type=int, default=64)
ap.add_argument("--prompt", type=int, default=32)
args = ap.parse_args()


def per_token(model, prompts, new):
    """ms a decoded token over `new` greedy steps after the prompts."""
    dec = Decoder(model, len(prompts), len(prompts[0]) + new + 1)
    logits = dec.prefill(prompts)
    t = time.perf_counter()
    for _ in range(new):
        logits = dec.step(logits.argmax(-1))
    return (time.perf_counter() - t) / new * 1e3


print(f"CPU: {cpu_model()}; BLAS: {blas_info()}; GPT-2 124M shapes; {args.rounds} rounds of {args.new} tokens "
      f"after {args.prompt}")
cfg = npgpt.GPTConfig.from_preset("gpt2")
loaded = npgpt.GPT(cfg, seed=0).eval()
rows = decode_layout(npgpt.GPT(cfg, seed=0).eval())
print("| B | as loaded (in, out), ms a token | rows (decode_layout), ms a token | loaded / rows, pairs: median (spread) |")
print("|---|---|---|---|")
for B in args.B:
    prompts = list(np.random.default_rng(B).integers(0, cfg.n_vocab, (B, args.prompt)))
    per_token(loaded, prompts, 4), per_token(rows, prompts, 4)        # compile, fault pages in
    runs = {"loaded": [], "rows": []}
    for r in range(args.rounds):
        for kind in (("loaded", "rows") if r % 2 == 0 else ("rows", "loaded")):
            runs[kind].append(per_token(loaded if kind == "loaded" else rows, prompts, args.new))
    a, b = np.array(runs["loaded"]), np.array(runs["rows"])
    ratio = a / b
    print(f"| {B} | {np.median(a):.2f} ({a.min():.2f}-{a.max():.2f}) | {np.median(b):.2f} ({b.min():.2f}-{b.max():.2f}) "
          f"| {np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f}) |", flush=True)
