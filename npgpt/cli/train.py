"""`npgpt train`: pretrain (or continue training) a GPT-2 on text, on the CPU.

    npgpt train                                            # small GPT on the-verdict (ships with npgpt), offline
    npgpt train --data tinyshakespeare --tokenizer char --config tiny --context 64 --steps 2000
    npgpt train --init gpt2 --data notes.txt --lr 1e-4 --steps 200 --out runs/notes
    npgpt train --out runs/notes --resume                  # continue where a run stopped

Everything is checked before anything is written: bad input prints one line and exits with status 2.
Ctrl-C (or SIGTERM) finishes the update in progress, writes a checkpoint and exits (status 130; 143); --resume then
ends bit for bit where the uninterrupted run would have. A resume may change how long the run is
(--steps/--epochs: the learning-rate schedule follows the new total) and when it evaluates, samples
and saves; anything else must stay as the run has it. One run at a time holds a run directory.

Data-parallel over MPI: `mpiexec -n K npgpt train ...` (pip install -e ".[mpi]"); --batch stays the
global batch, each rank computes batch / K rows of it; only rank 0 prints, evaluates and writes.
"""
from __future__ import annotations

import argparse
import sys

from . import CLIError, interrupted, recipe_errors
from ..config import PRESETS, SMALL_SHAPES

# This command's own flags; every other flag is a setting of the run (npgpt.train.recipe.PretrainConfig,
# which holds the defaults: a flag not typed stays out of args, so that a resume knows what was typed).
INVOCATION = ("out", "resume", "overwrite", "no_progress", "threads", "max_bytes")


def add_parser(sub):
    p = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="pretrain a GPT-2 on text (file, directory, URL, the-verdict, tinyshakespeare)",
                       description="Train a GPT-2 on text with AdamW, warmup + cosine learning rate, evaluation, "
                                   "samples, checkpoints and exact resume.")
    d = p.add_argument_group("data")
    d.add_argument("--data",
                   help="a text file, a directory of .txt files, a URL, or a name: the-verdict (bundled, "
                        "default), tinyshakespeare (downloaded once)")
    d.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="the most a --data URL download may bring (default 8 GiB); a larger one stops, deleted")
    d.add_argument("--tokenizer", choices=["gpt2", "char"],
                   help="gpt2 BPE (default) or a character vocabulary built from the text")
    d.add_argument("--train-ratio", type=float, help="the first fraction of characters trains (0.9)")
    d.add_argument("--stride", type=int, help="window start stride in tokens (default: the context)")
    d.add_argument("--shuffle", action=argparse.BooleanOptionalAction,
                   help="reshuffle the windows every epoch (seeded; default on)")
    m = p.add_argument_group("model")
    m.add_argument("--init", metavar="gpt2|PATH",
                   help="start from a checkpoint: a model name, a checkpoint path or a run directory")
    m.add_argument("--config", choices=[*SMALL_SHAPES, *PRESETS],
                   help="start from random weights of this shape: tiny (2 layers, 2 heads, 64 wide), small "
                        "(6, 6, 384; the default), gpt2 ... gpt2-xl")
    m.add_argument("--n-layer", type=int)
    m.add_argument("--n-head", type=int)
    m.add_argument("--n-embd", type=int)
    m.add_argument("--dtype", choices=["float32", "float64"])
    m.add_argument("--dropout", type=float, help="dropout on embeddings, attention, residuals (0.0)")
    s = p.add_argument_group("shape")
    s.add_argument("--context", type=int, help="tokens per window, the model's n_ctx when new (256)")
    s.add_argument("--batch", type=int, help="windows per update (global batch; default 2, the book's)")
    s.add_argument("--grad-accum", type=int, help="micro-batches per update (batch / grad-accum rows each)")
    s.add_argument("--steps", type=int, help="updates in the run (default: --epochs 10 of them)")
    s.add_argument("--epochs", type=float, help="passes over the training windows (default 10)")
    o = p.add_argument_group("optimiser")
    o.add_argument("--lr", type=float, help="peak learning rate (4e-4)")
    o.add_argument("--min-lr", type=float, help="cosine floor (default lr / 10)")
    o.add_argument("--warmup", type=int, help="linear warmup updates (0)")
    o.add_argument("--weight-decay", type=float, help="AdamW decay of >= 2-D parameters (0.1)")
    o.add_argument("--beta1", type=float)
    o.add_argument("--beta2", type=float)
    o.add_argument("--eps", type=float)
    o.add_argument("--clip", type=float, help="gradient-norm clip; 0 = off (1.0)")
    o.add_argument("--shard-optimizer", action=argparse.BooleanOptionalAction,
                   help="under mpiexec -n N: each rank keeps and updates 1/N of AdamW's moments (ZeRO-1): the same "
                        "updates, 3 (N - 1) / N copies of the parameters less memory per rank (default off)")
    e = p.add_argument_group("evaluation and samples")
    e.add_argument("--eval-every", type=int, help="evaluate every N updates and after the last (50)")
    e.add_argument("--eval-batches", type=int,
                   help="batches per split per evaluation; 0 = every window of the split (20)")
    e.add_argument("--sample-every", type=int, help="print a sample every N updates (default: each eval)")
    e.add_argument("--prompt", help="the samples' prompt (default: the text's first words)")
    e.add_argument("--sample-tokens", type=int, help="tokens per sample (50)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="the run directory (default runs/<data>)")
    r.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out from its checkpoint (--steps/--epochs and the evaluation, "
                        "sample and save cadence may change; nothing else)")
    r.add_argument("--overwrite", action="store_true", default=False,
                   help="start a new run in an --out that already holds one (its checkpoints go), or write npgpt's "
                        "files beside the files of a non-empty directory")
    r.add_argument("--save-every", type=int, help="checkpoint every N updates (default: each eval)")
    r.add_argument("--seed", type=int, help="initial weights, shuffling and dropout (0)")
    r.add_argument("--no-progress", action="store_true", default=False, help="no progress bar")
    r.add_argument("--threads", type=int, default=None,
                   help="BLAS and Numba threads of this process (under mpiexec default: cores // ranks on the "
                        "machine, unless OMP_NUM_THREADS / NUMBA_NUM_THREADS are set)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from .. import distributed
    from ..train.recipe import pretrain
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    dist = distributed.init(args.threads)                 # one process, or this rank of mpiexec's job
    settings = {k: v for k, v in vars(args).items() if k not in (*INVOCATION, "command", "func")}
    with recipe_errors():
        r = pretrain(out=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                     max_bytes=args.max_bytes, dist=dist, **settings)
    if r.fit.interrupted:
        if dist.is_main:
            print(f"npgpt train: {interrupted(r.fit)} at step {r.fit.step}; checkpoint written. Continue with: "
                  f"npgpt train --out {r.out} --resume", file=sys.stderr)
        return r.fit.exit_status
    if dist.is_main:
        print(f"npgpt train: done, {r.fit.step} updates; model in {r.out} (npgpt generate --model {r.out})")
    return 0
