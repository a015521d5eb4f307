"""`npgpt finetune classify`: fine-tune a GPT-2 as a text classifier (the book's chapter 6).

    npgpt finetune classify --data SMSSpamCollection.tsv --init gpt2 --out runs/spam --trainable-blocks 1
    npgpt finetune classify --data SMSSpamCollection.tsv --init gpt2 --out runs/spam-lora --lora-rank 16 --lora-alpha 16
    npgpt classify --model runs/spam "You won a prize! Text WIN to 80082"

The table is TSV/CSV (`label<TAB>text` with no header works as is); classes are balanced by
undersampling and split 70/10/20 (seeded). Bad input prints one line and exits with status 2.

    npgpt finetune instruct --data instruction-data.json --init gpt2-medium --out runs/instruct
    npgpt chat --model runs/instruct

Instruction fine-tuning (the book's chapter 7): see npgpt/finetune/instruct.py. Both recipes are
npgpt.finetune.recipes (finetune_classify, finetune_instruct), whose ClassifyConfig and InstructConfig
hold the defaults: a flag not typed stays out of args.
"""
from __future__ import annotations

import argparse
import os

from . import interrupted, recipe_errors

INVOCATION = ("out", "overwrite", "no_progress")     # this command's own flags; the others are the run's settings


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune a GPT-2 (classify: a text classifier; instruct: instruction following)")
    tasks = p.add_subparsers(dest="task", required=True)
    _add_instruct(tasks)
    c = tasks.add_parser("classify", argument_default=argparse.SUPPRESS,
                         help="train a classification head (and the last blocks) on labelled texts")
    c.add_argument("--data", required=True, help="a TSV/CSV file of labelled texts")
    c.add_argument("--init", required=True, help="the GPT: a model name, a checkpoint or an npgpt train run directory")
    c.add_argument("--text-col", help="text column: a number, or a header name (default 1)")
    c.add_argument("--label-col", help="label column: a number, or a header name (default 0)")
    c.add_argument("--epochs", type=int, help="passes over the training rows (5)")
    c.add_argument("--batch", type=int, help="rows per update (8)")
    c.add_argument("--lr", type=float, help="learning rate, constant (5e-5)")
    c.add_argument("--weight-decay", type=float)
    c.add_argument("--trainable-blocks", metavar="K|all",
                   help="train the last K blocks, the final layernorm and the head; all: every parameter (1)")
    c.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: n_ctx)")
    c.add_argument("--limit", type=int, help="use only the first N rows of the file")
    c.add_argument("--seed", type=int, help="split, shuffling and the head's initial weights (0)")
    add_lora_args(c)                                   # --lora-rank --lora-alpha --lora-targets --merge (below)
    _add_run_flags(c, "the run directory (metrics.json, the model)")
    c.set_defaults(func=run)
    return p


def _add_run_flags(c, out_help: str):
    c.add_argument("--shard-optimizer", action="store_true",
                   help="under mpiexec -n N: each rank keeps and updates 1/N of AdamW (ZeRO-1): the same updates, "
                        "less memory per rank")
    c.add_argument("--out", required=True, help=out_help)
    c.add_argument("--no-progress", action="store_true", default=False)
    c.add_argument("--overwrite", action="store_true", default=False,
                   help="replace the run that --out holds, or write npgpt's files beside the files of a non-empty "
                        "directory (without it --out must be new or empty)")


def _invocation(args) -> dict:
    """The recipe's arguments: this command's flags, and the settings typed (the recipe has the defaults)."""
    return {"out": args.out, "overwrite": args.overwrite, "progress": not args.no_progress,
            **{k: v for k, v in vars(args).items() if k not in (*INVOCATION, "command", "task", "func")}}


def run(args) -> int:
    from .. import distributed
    from ..finetune.recipes import finetune_classify
    dist = distributed.init()                    # one process, or this rank of `mpiexec -n K npgpt finetune ...`
    with recipe_errors():
        r = finetune_classify(dist=dist, **_invocation(args))
    if r.fit.interrupted:
        if dist.is_main:
            print(f"npgpt finetune classify: {interrupted(r.fit)} after {r.fit.step} updates; model in {r.out}; "
                  "no test accuracy written", flush=True)
        return r.fit.exit_status
    if dist.is_main:                             # rank 0 evaluates and writes
        print(f"npgpt finetune classify: test accuracy {r.metrics['test_accuracy']:.4f}; model in {r.out} "
              f"(npgpt classify --model {r.out} TEXT)")
    return 0


# ----------------------------------------------------------------------------- finetune instruct
def _add_instruct(tasks):
    c = tasks.add_parser("instruct", argument_default=argparse.SUPPRESS,
                         help="train the whole GPT to follow instructions (Alpaca-style JSON)",
                         description="Instruction fine-tuning: a JSON list of {instruction, input, output} is split "
                                     "85/10/5 (train/test/val, in file order), the model is trained on the train "
                                     "entries in the Alpaca prompt format, and its greedy responses to the test "
                                     "entries are written to OUT/test-responses.json.")
    c.add_argument("--data", required=True, help="a JSON file: a list of {instruction, input, output} objects")
    c.add_argument("--init", required=True, help="the GPT: a model name, a checkpoint or an npgpt run directory")
    c.add_argument("--epochs", type=int, help="passes over the training entries (2)")
    c.add_argument("--batch", type=int, help="entries per update (8)")
    c.add_argument("--lr", type=float, help="learning rate, constant (5e-5)")
    c.add_argument("--weight-decay", type=float)
    c.add_argument("--max-length", type=int, help="at most this many input tokens per entry, truncating (default: n_ctx)")
    c.add_argument("--limit", type=int, help="use only the first N entries of the file")
    c.add_argument("--mask-prompt", action="store_true",
                   help="learn the responses only: the prompt's targets are masked too")
    c.add_argument("--eval-every", type=int, help="evaluate every this many updates; 0: at the end (5)")
    c.add_argument("--eval-batches", type=int,
                   help="evaluate on the first N batches of the train and val entries; 0: all (5)")
    c.add_argument("--max-new-tokens", type=int, help="longest test response, in tokens (256)")
    c.add_argument("--seed", type=int, help="shuffling of the training entries (0)")
    add_lora_args(c)                             # --lora-rank --lora-alpha --lora-targets --merge (below)
    _add_run_flags(c, "the run directory (model, metrics, test-responses.json)")
    c.set_defaults(func=run_instruct)
    return c


def run_instruct(args) -> int:
    from .. import distributed
    from ..finetune.recipes import RESPONSES, finetune_instruct
    dist = distributed.init()                    # one process, or this rank of `mpiexec -n K npgpt finetune ...`
    with recipe_errors():
        r = finetune_instruct(dist=dist, **_invocation(args))
    if not dist.is_main:                         # rank 0 generates the test responses and writes
        return 0
    if r.fit.interrupted:
        print(f"npgpt finetune instruct: {interrupted(r.fit)} after {r.fit.step} updates; model in {r.out}; "
              "no test responses written", flush=True)
        return r.fit.exit_status
    print(f"npgpt finetune instruct: test loss {r.metrics['test_loss']:.4f}; {r.metrics['entries']['test']} "
          f"responses in {os.path.join(r.out, RESPONSES)}; model in {r.out} (npgpt chat --model {r.out})")
    return 0


# ----------------------------------------------------------------------------- LoRA flags
def add_lora_args(parser):
    """--lora-rank, --lora-alpha, --lora-targets, --merge (for `npgpt finetune` subcommands; the recipes'
    lora_* and merge settings, npgpt.finetune.recipes.setup_lora)."""
    g = parser.add_argument_group("LoRA (train low-rank adapters; the base model stays frozen)")
    g.add_argument("--lora-rank", type=int, metavar="R",
                   help="train LoRA adapters of rank R on the frozen model instead of its weights (classify: the classification head trains too)")
    g.add_argument("--lora-alpha", type=float, metavar="A",
                   help="the adapters' scale is A/R (default A = R: a scale of 1)")
    g.add_argument("--lora-targets", metavar="NAMES",
                   help="comma-separated layer names, as PEFT's target_modules (c_attn,c_proj,c_fc); default every Linear")
    g.add_argument("--merge", action="store_true",
                   help="at the end, fold the adapters into the weights and save the merged model")
    return g
