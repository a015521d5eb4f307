"""Decoding with each block one compiled call (npgpt/inference/fused.py) against the same model through its
modules (GPT.forward_cached), in one process, alternated in pairs: GPT-2 124M shapes, random weights, a
`--prompt`-token prompt (32), then `--new` greedy tokens a round; ms a decoded token and the ratio of each pair.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_fused_decode.py --weights int8 bf16 \\
        [--B 1 2 8] [--rounds 8] [--new 64] [--prompt 32]

Batches wider than fused.max_rows (int8 16 rows, bf16 64) run the modules either way.
"""
import argparse
import time

from npgpt.fast import settings

settings.apply(inference=True)   # as `npgpt generate` runs: before NumPy loads OpenBLAS

import numpy as np  # noqa: E402

import npgpt  # noqa: E402
from npgpt.bench import blas_info, cpu_model  # noqa: E402
from npgpt.inference import fused  # noqa: E402
from npgpt.inference.decode import Decoder  # noqa: E402
from npgpt.inference.quant import quantize  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--weights", nargs="+", default=["int8", "bf16"], choices=["bf16", "int8"])
ap.add_argument("--B", nargs="+", type=int, default=[1])
ap.add_argument("--rounds", type=int, default=8)
ap.add_argument("--new", type=int, default=64)
ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (the cache's length before decoding)")
args = ap.parse_args()


def per_token(model, prompts, compiled, new):
    """ms a decoded token over `new` greedy steps after the prompts (compiled False: through the modules)."""
    dec = Decoder(model, len(prompts), len(prompts[0]) + new + 1, compiled=compiled)
    logits = dec.prefill(prompts)
    t = time.perf_counter()
    for _ in range(new):
        logits = dec.step(logits.argmax(-1))
    return (time.perf_counter() - t) / new * 1e3


print(f"CPU: {cpu_model()}; BLAS: {blas_info()}; GPT-2 124M shapes; {args.rounds} rounds of {args.new} tokens "
      f"after {args.prompt}")
cfg = npgpt.GPTConfig.from_preset("gpt2")
base = npgpt.GPT(cfg, seed=0).eval()
state = {k: v.copy() for k, v in base.state_dict().items()}
print("| weights | B | compiled blocks, ms a token | modules, ms a token | modules / compiled, pairs: median (spread) |")
print("|---|---|---|---|---|")
for kind in args.weights:
    model = npgpt.GPT(cfg, seed=0)
    model.load_state_dict(state)
    model = quantize(model.eval(), kind)
    for B in args.B:
        prompts = list(np.random.default_rng(B).integers(0, cfg.n_vocab, (B, args.prompt)))
        per_token(model, prompts, True, 4), per_token(model, prompts, False, 4)        # compile, fault pages in
        runs = {True: [], False: []}
        for r in range(args.rounds):
            for compiled in ((True, False) if r % 2 == 0 else (False, True)):
                runs[compiled].append(per_token(model, prompts, compiled, args.new))
        c, m = np.array(runs[True]), np.array(runs[False])
        ratio = m / c
        print(f"| {kind} | {B} | {np.median(c):.2f} ({c.min():.2f}-{c.max():.2f}) | {np.median(m):.2f} "
              f"({m.min():.2f}-{m.max():.2f}) | {np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f}) |", flush=True)
