"""`npgpt bench`: speed and memory of prefill, decode, train steps and start-up, optionally side by side
with PyTorch (`--compare torch`); with --grid, the train step over ranks x threads splits. The
workloads themselves are in npgpt/bench.py."""
from __future__ import annotations

import json
import os

from . import CLIError
from ..bench import SHAPE, WORKLOADS, _config, blas_info, cpu_model, int8_products, run_grid
from ..bench import run as run_bench
from ..fast.settings import cores


def add_parser(sub):
    b = sub.add_parser("bench", help="measure prefill/decode tokens/s, train-step time, memory, start-up")
    b.add_argument("--model", default="gpt2",
                   help="shape preset: gpt2 (default), gpt2-medium, ..., or tiny / small (`npgpt train --config` "
                        "bodies with GPT-2's vocabulary and context); random weights")
    for k in SHAPE:
        b.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None)
    b.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=None,
                   help=f"default: all but train-large ({', '.join(WORKLOADS)})")
    b.add_argument("--compare", choices=["torch"], default=None, help="run the same workloads in PyTorch too")
    b.add_argument("--weights", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="npgpt's weights for the prefill/decode workloads (npgpt.inference.quant); torch stays float32")
    b.add_argument("--decode-batch", type=int, default=1, help="rows decoded together in the decode workload")
    b.add_argument("--prefill-T", dest="prefill_T", type=int, default=None, help="prompt length of prefill (default 256)")
    b.add_argument("--train-large-B", dest="train_large_B", type=int, default=None, help="batch of train-large (default 8)")
    b.add_argument("--train-large-T", dest="train_large_T", type=int, default=None, help="context of train-large (default 256)")
    b.add_argument("--attention", choices=["auto", "fused", "materialised"], default="auto",
                   help="npgpt's attention core: auto (fused kernel from NPGPT_FLASH_MIN_T / the layer's "
                        "threshold up), always fused, or always the materialised (B, NH, T, T) path")
    b.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    b.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up)")
    b.add_argument("--reps", type=int, default=3, help="timed prefill/decode repetitions (after one warm-up)")
    b.add_argument("--rounds", type=int, default=1,
                   help="run each workload this many times, npgpt and PyTorch alternately, and report the "
                        "median of the same-round ratios (on a machine whose speed drifts from minute to minute)")
    b.add_argument("--grid", nargs="?", const="auto", default=None, metavar="RxT,...",
                   help="measure the train step at each RANKSxTHREADS split (such as 1x8,2x4,8x1; alone: every "
                        "split of this machine's cores): npgpt under mpiexec -n RANKS, with --compare torch PyTorch "
                        "in one process or DDP over gloo; global batch --batch x --context")
    b.add_argument("--shard-optimizer", action="store_true",
                   help="--grid: npgpt's ranks each keep and update 1/RANKS of AdamW (ZeRO-1, as npgpt train "
                        "--shard-optimizer); the parameters' all-gather after the update counts as exposed")
    b.add_argument("--batch", type=int, default=16, help="--grid: the global batch, split over the ranks (default 16)")
    b.add_argument("--context", type=int, default=128, help="--grid: tokens per row (default 128)")
    b.add_argument("--timeout", type=float, default=1800,
                   help="--grid: seconds one run (one split, one framework) may take before it is ended (default 1800)")
    b.add_argument("--torch-python", default=None, metavar="PYTHON",
                   help="the Python that runs PyTorch's workers (default: this one), for a torch in another environment")
    b.add_argument("--json", action="store_true", help="print one JSON report instead of the table")
    b.set_defaults(func=run)


def run(args) -> int:
    try:
        cfg = _config(args)
    except ValueError as e:
        raise CLIError(str(e)) from None
    env = f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}"
    if args.grid is not None:
        if not args.json:
            print(f"CPU: {cpu_model()}, {cores()} cores; BLAS: {blas_info().split(' threads=')[0]}; {env}\n"
                  f"train step of {cfg['n_layer']} layers x {cfg['n_embd']} wide, {cfg['n_head']} heads, vocabulary "
                  f"{cfg['n_vocab']}; global batch {args.batch} x {args.context}; median of {args.steps} steps after "
                  f"2 warm-up steps; {args.rounds} round(s)", flush=True)
        report = run_grid(args, cfg)
    else:
        if not args.json:
            int8 = f"; int8 products on {int8_products()}" if args.weights == "int8" else ""
            print(f"BLAS: {blas_info()}; threads {args.threads}{int8}; {env}", flush=True)
        report = run_bench(args, cfg)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
