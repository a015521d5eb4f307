"""float32 decoding of a few rows with npgpt/fast/few_rows.py's products against the same decoding as it ran
before them, in one process, alternated in pairs: GPT-2 124M shapes, random weights, a `--prompt`-token
prompt (32) a row, then `--new` greedy tokens a round; ms a decoded step and each pair's ratio.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_few_rows.py [--B 1 2 4 8] [--rounds 6] [--new 32]

"Before" sets Linear.FEW_ROWS to 1 (the blocks' products through BLAS, `x @ w`) and TiedLMHead.FEW_ROWS to
0 (the head through BLAS). Until the sixth session (docs/performance.md) "before" kept fast.quant's row kernel
for the head's 2-8 rows; since the head runs the packed-row kernels for 1-8 rows, it is BLAS at every width.
"""
import argparse
import time

from npgpt.fast import settings

settings.apply(inference=True)   # as `npgpt generate` runs: before NumPy loads OpenBLAS

import numpy as np  # noqa: E402

import npgpt  # noqa: E402
from npgpt.bench import blas_info, cpu_model  # noqa: E402
from npgpt.inference.decode import Decoder  # noqa: E402
from npgpt.layers.embedding import TiedLMHead  # noqa: E402
from npgpt.layers.linear import Linear  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--B", nargs="+", type=int, default=[1, 2, 4, 8])
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--new", type=int, default=32)
ap.add_argument("--prompt", type=int, default=32)
args = ap.parse_args()
ROWS, HEAD = Linear.FEW_ROWS, TiedLMHead.FEW_ROWS


def per_step(model, prompts, tiled, new):
    """ms a decoded step (all rows) over `new` greedy steps after the prompts."""
    Linear.FEW_ROWS, TiedLMHead.FEW_ROWS = (ROWS, HEAD) if tiled else (1, 0)
    dec = Decoder(model, len(prompts), len(prompts[0]) + new + 1)
    logits = dec.prefill(prompts)
    t = time.perf_counter()
    for _ in range(new):
        logits = dec.step(logits.argmax(-1))
    return (time.perf_counter() - t) / new * 1e3


print(f"CPU: {cpu_model()}; BLAS: {blas_info()}; GPT-2 124M shapes, float32; {args.rounds} rounds of {args.new} "
      f"steps after {args.prompt} tokens")
cfg = npgpt.GPTConfig.from_preset("gpt2")
model = npgpt.GPT(cfg, seed=0).eval()
print("| B | few_rows kernels, ms a step | before, ms a step | before / now, pairs: median (spread) |")
print("|---|---|---|---|")
for B in args.B:
    prompts = list(np.random.default_rng(B).integers(0, cfg.n_vocab, (B, args.prompt)))
    per_step(model, prompts, True, 4), per_step(model, prompts, False, 4)            # compile, fault pages in
    runs = {True: [], False: []}
    for r in range(args.rounds):
        for tiled in ((True, False) if r % 2 == 0 else (False, True)):
            runs[tiled].append(per_step(model, prompts, tiled, args.new))
    t, b = np.array(runs[True]), np.array(runs[False])
    ratio = b / t
    print(f"| {B} | {np.median(t):.2f} ({t.min():.2f}-{t.max():.2f}) | {np.median(b):.2f} ({b.min():.2f}-{b.max():.2f}) "
          f"| {np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f}) |", flush=True)
Linear.FEW_ROWS, TiedLMHead.FEW_ROWS = ROWS, HEAD
