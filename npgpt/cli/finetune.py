"""`npgpt finetune classify`: fine-tune a GPT-2 as a text classifier (the book's chapter 6).

    npgpt finetune classify --data SMSSpamCollection.tsv --init gpt2 --out runs/spam --trainable-blocks 1
    npgpt finetune classify --data SMSSpamCollection.tsv --init gpt2 --out runs/spam-lora --lora-rank 16 --lora-alpha 16
    npgpt classify --model runs/spam "You won a prize! Text WIN to 80082"

The table is TSV/CSV (`label<TAB>text` with no header works as is); classes are balanced by
undersampling and split 70/10/20 (seeded). Bad input prints one line and exits with status 2.

    npgpt finetune instruct --data instruction-data.json --init gpt2-medium --out runs/instruct
    npgpt chat --model runs/instruct

Instruction fine-tuning (the book's chapter 7): see npgpt/finetune/instruct.py.
"""
from __future__ import annotations

import contextlib
import math
import os

from . import CLIError, refuse_packed
from ..io.peft import BASE_REF, save_adapter
from ..io.pretrained import save_model
from ..layers.lora import apply_lora, merge


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune a GPT-2 (classify: a text classifier; instruct: instruction following)")
    tasks = p.add_subparsers(dest="task", required=True)
    _add_instruct(tasks)
    c = tasks.add_parser("classify", help="train a classification head (and the last blocks) on labelled texts")
    c.add_argument("--data", required=True, help="a TSV/CSV file of labelled texts")
    c.add_argument("--init", required=True, help="the GPT: a model name, a checkpoint or an npgpt train run directory")
    c.add_argument("--out", required=True, help="the run directory (metrics.json, the model)")
    c.add_argument("--text-col", default=None, help="text column: a number, or a header name (default 1)")
    c.add_argument("--label-col", default=None, help="label column: a number, or a header name (default 0)")
    c.add_argument("--epochs", type=int, default=5, help="passes over the training rows (5)")
    c.add_argument("--batch", type=int, default=8, help="rows per update (8)")
    c.add_argument("--lr", type=float, default=5e-5, help="learning rate, constant (5e-5)")
    c.add_argument("--weight-decay", type=float, default=0.1)
    c.add_argument("--trainable-blocks", default="1", metavar="K|all",
                   help="train the last K blocks, the final layernorm and the head; all: every parameter (1)")
    c.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens (default: n_ctx)")
    c.add_argument("--limit", type=int, default=None, help="use only the first N rows of the file")
    c.add_argument("--seed", type=int, default=0, help="split, shuffling and the head's initial weights (0)")
    c.add_argument("--no-progress", action="store_true")
    add_lora_args(c)                                   # --lora-rank --lora-alpha --lora-targets --merge (below)
    _add_overwrite(c)
    c.set_defaults(func=run)
    return p


def _add_overwrite(c):
    c.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds, or write npgpt's files beside the files of a non-empty "
                        "directory (without it --out must be new or empty)")


def _check_out(args):
    """--out: new or empty, or --overwrite (npgpt.train.run.check_run_dir); nothing is written yet."""
    from ..train.run import RunDirError, check_run_dir
    try:
        check_run_dir(args.out, overwrite=args.overwrite)
    except RunDirError as e:
        raise CLIError(f"--out {e}") from None


def _hold_run(args, hold, main: bool) -> None:
    """Make --out this process's run (lock, run.json with the settings) until the command returns."""
    from ..train.run import RunDirError, open_run
    if main:
        try:
            hold.enter_context(open_run(args.out, {k: v for k, v in vars(args).items() if k != "func"},
                                        overwrite=args.overwrite))
        except RunDirError as e:
            raise CLIError(f"--out {e}") from None


def _check_common(args, more_ints=()):
    """The flags both tasks share: integer lower bounds, a finite non-negative lr and weight decay, --data."""
    for k, lo in (("epochs", 1), ("batch", 1), ("max_length", 1), ("limit", 1), ("seed", 0), *more_ints):
        v = getattr(args, k)
        if v is not None and v < lo:
            raise CLIError(f"--{k.replace('_', '-')} must be >= {lo}, got {v}")
    for k in ("lr", "weight_decay"):
        v = getattr(args, k)
        if not (math.isfinite(v) and v >= 0):
            raise CLIError(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not os.path.isfile(args.data):
        raise CLIError(f"--data {args.data}: no such file")


def _check(args):
    _check_common(args)
    if args.trainable_blocks != "all" and not (args.trainable_blocks.isdigit()):
        raise CLIError(f"--trainable-blocks must be a number >= 0 or all, got {args.trainable_blocks!r}")
    _check_out(args)


def run(args) -> int:
    with contextlib.ExitStack() as hold:              # the run directory, once it is made, until the end
        return _classify(args, hold)


def _classify(args, hold) -> int:
    from ..finetune.classifier import Classifier
    from ..optim import AdamW
    from ..tokens.bpe import get_tokenizer
    from ..finetune.classify import ClassRows, balance_and_split, classify_evaluator, classify_loss, count_rows, \
        read_table
    from ..train.data import BatchStream
    from ..train.loop import LoopConfig, fit
    from ..io.atomic import write_json
    from .. import distributed

    dist = distributed.init()                    # one process, or this rank of `mpiexec -n K npgpt finetune ...`
    main = dist.is_main
    _check(args)
    if args.batch % dist.world_size:
        raise CLIError(f"--batch {args.batch} must be a multiple of the {dist.world_size} MPI processes")
    try:
        texts, labels = read_table(args.data, args.text_col, args.label_col)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CLIError(f"--data {args.data}: {e}") from None
    if args.limit:
        texts, labels = texts[:args.limit], labels[:args.limit]
    names = sorted(set(labels))
    try:
        train_ix, val_ix, test_ix = balance_and_split(labels, args.seed)
    except ValueError as e:
        raise CLIError(f"--data {args.data}: {e}") from None
    try:
        refuse_packed(args.init)
        model = Classifier.from_pretrained(args.init, names, seed=args.seed)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--init {args.init}: {e}") from None
    n_ctx, V = model.gpt.config.n_ctx, model.gpt.config.n_vocab
    if V < 50257:
        raise CLIError(f"--init {args.init}: its vocabulary has {V} tokens; classification reads GPT-2 BPE (50257)")
    max_length = min(args.max_length or n_ctx, n_ctx)
    L = len(model.gpt.h)
    k = None if args.trainable_blocks == "all" else int(args.trainable_blocks)
    if k is not None and k > L:
        raise CLIError(f"--trainable-blocks {k}: the model has {L} blocks")
    model.set_trainable(k)
    setup_lora(model, args)                      # --lora-rank: only adapters and the head train
    dist.broadcast_parameters(model)             # every rank starts from rank 0's head (and adapters)

    tok = get_tokenizer()
    index = {c: i for i, c in enumerate(names)}
    ids = [tok.encode(t)[:max_length] for t in texts]
    y = [index[c] for c in labels]

    def rows(ix):
        return [ids[i] for i in ix], [y[i] for i in ix]
    splits = {"train": rows(train_ix), "val": rows(val_ix), "test": rows(test_ix)}
    try:
        batches = BatchStream(ClassRows(*splits["train"], max_length), args.batch, seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    bpe = batches.batches_per_epoch
    epoch_rows = []
    evaluate = classify_evaluator(splits, max(args.batch, 16), max_length, rows=epoch_rows,
                                  epoch_of=lambda: batches.epoch + (batches.position == bpe))
    loop = LoopConfig(steps=args.epochs * bpe, lr=args.lr, min_lr=args.lr, eval_every=bpe, save_every=0)
    opt = AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
    trainable = sum(p.data.size for p in model.parameters() if p.requires_grad)
    if main:
        print(f"npgpt finetune classify: {len(train_ix)} train / {len(val_ix)} val / {len(test_ix)} test rows, "
              f"classes {names}; {trainable / 1e6:.2f}M of {model.gpt.num_parameters() / 1e6:.2f}M parameters "
              f"trainable; {args.epochs} epochs of {bpe} batches of {args.batch} -> {args.out}", flush=True)
    _hold_run(args, hold, main)
    result = fit(model, opt, batches, loop, loss_fn=classify_loss, count_fn=count_rows, evaluate=evaluate,
                 run_dir=args.out, progress=not args.no_progress, dist=dist)
    if not main:                                 # rank 0 evaluates and writes
        return 0
    finish_lora(model, args, args.out, result.checkpoint)   # RUN/adapter; --merge: merged checkpoint
    last = epoch_rows[-1]
    write_json(os.path.join(args.out, "metrics.json"),
               {"train_accuracy": last["train_accuracy"], "val_accuracy": last["val_accuracy"],
                "test_accuracy": last["test_accuracy"], "labels": names, "epochs": epoch_rows[1:],
                "before_training": epoch_rows[0], "args": {k: v for k, v in vars(args).items() if k != "func"}})
    print(f"npgpt finetune classify: test accuracy {last['test_accuracy']:.4f}; model in {args.out} "
          f"(npgpt classify --model {args.out} TEXT)")
    return 0


# ----------------------------------------------------------------------------- finetune instruct
def _add_instruct(tasks):
    c = tasks.add_parser("instruct", help="train the whole GPT to follow instructions (Alpaca-style JSON)",
                         description="Instruction fine-tuning: a JSON list of {instruction, input, output} is split "
                                     "85/10/5 (train/test/val, in file order), the model is trained on the train "
                                     "entries in the Alpaca prompt format, and its greedy responses to the test "
                                     "entries are written to OUT/test-responses.json.")
    c.add_argument("--data", required=True, help="a JSON file: a list of {instruction, input, output} objects")
    c.add_argument("--init", required=True, help="the GPT: a model name, a checkpoint or an npgpt run directory")
    c.add_argument("--out", required=True, help="the run directory (model, metrics, test-responses.json)")
    c.add_argument("--epochs", type=int, default=2, help="passes over the training entries (2)")
    c.add_argument("--batch", type=int, default=8, help="entries per update (8)")
    c.add_argument("--lr", type=float, default=5e-5, help="learning rate, constant (5e-5)")
    c.add_argument("--weight-decay", type=float, default=0.1)
    c.add_argument("--max-length", type=int, default=None,
                   help="at most this many input tokens per entry, truncating (default: n_ctx)")
    c.add_argument("--limit", type=int, default=None, help="use only the first N entries of the file")
    c.add_argument("--mask-prompt", action="store_true",
                   help="learn the responses only: the prompt's targets are masked too")
    c.add_argument("--eval-every", type=int, default=5, help="evaluate every this many updates; 0: at the end (5)")
    c.add_argument("--eval-batches", type=int, default=5,
                   help="evaluate on the first N batches of the train and val entries; 0: all (5)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest test response, in tokens (256)")
    c.add_argument("--seed", type=int, default=0, help="shuffling of the training entries (0)")
    c.add_argument("--no-progress", action="store_true")
    add_lora_args(c)                             # --lora-rank --lora-alpha --lora-targets --merge (below)
    _add_overwrite(c)
    c.set_defaults(func=run_instruct)
    return c


def _check_instruct(args):
    _check_common(args, (("eval_every", 0), ("eval_batches", 0), ("max_new_tokens", 0)))
    _check_out(args)


def run_instruct(args) -> int:
    with contextlib.ExitStack() as hold:              # the run directory, once it is made, until the end
        return _instruct(args, hold)


def _instruct(args, hold) -> int:
    from ..io.pretrained import load_model
    from ..optim import AdamW
    from ..tokens.bpe import get_tokenizer
    from ..finetune.instruct import InstructBatches, encode_entry, eval_batches, generate_responses, \
        instruct_evaluator, read_entries, split_entries
    from ..train.lm import count_targets, lm_loss, mean_loss
    from ..train.loop import LoopConfig, fit
    from ..io.atomic import write_json
    from .. import distributed

    dist = distributed.init()                    # one process, or this rank of `mpiexec -n K npgpt finetune ...`
    main = dist.is_main
    _check_instruct(args)
    if args.batch % dist.world_size:
        raise CLIError(f"--batch {args.batch} must be a multiple of the {dist.world_size} MPI processes")
    try:
        entries = read_entries(args.data)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CLIError(f"--data {args.data}: {e}") from None
    if args.limit:
        entries = entries[:args.limit]
    train, test, val = split_entries(entries)
    if len(train) < args.batch:
        raise CLIError(f"--data {args.data}: {len(train)} training entries (85% of {len(entries)}) make no batch "
                       f"of {args.batch}; use more entries or a smaller --batch")
    try:
        refuse_packed(args.init)
        model = load_model(args.init)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--init {args.init}: {e}") from None
    n_ctx, V = model.config.n_ctx, model.config.n_vocab
    if V < 50257:
        raise CLIError(f"--init {args.init}: its vocabulary has {V} tokens; instructions are GPT-2 BPE (50257)")
    max_length = min(args.max_length or n_ctx, n_ctx)
    setup_lora(model, args)                      # --lora-rank: only the adapters train
    dist.broadcast_parameters(model)

    tok = get_tokenizer()

    def encode(split):
        pairs = [encode_entry(tok, e) for e in split]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    splits = {"train": encode(train), "val": encode(val), "test": encode(test)}
    truncated = sum(len(s) > max_length for s in splits["train"][0])   # cut: loses its end token
    batches = InstructBatches(*splits["train"], args.batch, max_length, args.mask_prompt, seed=args.seed)
    bpe = batches.batches_per_epoch
    evaluate = instruct_evaluator({"train": splits["train"], "val": splits["val"]}, args.batch, args.eval_batches,
                                  max_length, args.mask_prompt)
    loop = LoopConfig(steps=args.epochs * bpe, lr=args.lr, min_lr=args.lr, eval_every=args.eval_every, save_every=0)
    opt = AdamW(model, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    trainable = sum(p.data.size for p in model.parameters() if p.requires_grad)
    if main:
        print(f"npgpt finetune instruct: {len(train)} train / {len(test)} test / {len(val)} val entries"
              f"{f' ({truncated} training entries cut at --max-length {max_length})' if truncated else ''}; "
              f"{trainable / 1e6:.2f}M of {model.num_parameters() / 1e6:.2f}M parameters trainable; "
              f"{args.epochs} epochs of {bpe} batches of {args.batch}"
              f"{', prompt masked' if args.mask_prompt else ''} -> {args.out}", flush=True)
    _hold_run(args, hold, main)
    result = fit(model, opt, batches, loop, loss_fn=lm_loss, count_fn=count_targets, evaluate=evaluate,
                 run_dir=args.out, progress=not args.no_progress, dist=dist)
    if not main:                                 # rank 0 generates the test responses and writes
        return 0
    finish_lora(model, args, args.out, result.checkpoint)   # RUN/adapter; --merge: merged checkpoint
    if result.interrupted:
        print(f"npgpt finetune instruct: interrupted after {result.step} updates; model in {args.out}; "
              "no test responses written", flush=True)
        return 130

    from tqdm.auto import tqdm
    bar = tqdm(total=len(test), disable=args.no_progress, desc="test responses", unit="entry")
    responses = generate_responses(model, tok, test, args.max_new_tokens, batch_size=args.batch,
                                   progress=lambda n: bar.update(n - bar.n))
    bar.close()
    out_entries = [{**e, "model_response": r} for e, r in zip(test, responses)]
    path = os.path.join(args.out, "test-responses.json")
    write_json(path, out_entries, indent=4)
    test_loss = mean_loss(model, eval_batches(*splits["test"], args.batch, 0, max_length, args.mask_prompt))
    last = result.last_eval or {}
    write_json(os.path.join(args.out, "metrics.json"),
               {"train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"), "test_loss": test_loss,
                "steps": result.step, "entries": {"train": len(train), "test": len(test), "val": len(val)},
                "truncated_train_entries": truncated,
                "args": {k: v for k, v in vars(args).items() if k != "func"}})
    print(f"npgpt finetune instruct: test loss {test_loss:.4f}; {len(out_entries)} responses in {path}; "
          f"model in {args.out} (npgpt chat --model {args.out})")
    return 0


# ----------------------------------------------------------------------------- LoRA flags
# ----------------------------------------------------------------------------- command-line helpers
def add_lora_args(parser):
    """--lora-rank, --lora-alpha, --lora-targets, --merge (for `npgpt finetune` subcommands)."""
    g = parser.add_argument_group("LoRA (train low-rank adapters; the base model stays frozen)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R on the frozen model instead of its weights (classify: the classification head trains too)")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="the adapters' scale is A/R (default A = R: a scale of 1)")
    g.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated layer names, as PEFT's target_modules (c_attn,c_proj,c_fc); default every Linear")
    g.add_argument("--merge", action="store_true",
                   help="at the end, fold the adapters into the weights and save the merged model")
    return g


def setup_lora(model, args, base=None):
    """Apply LoRA as the arguments ask: nothing without --lora-rank (returns None), else apply_lora with
    the run's seed; returns the trainable parameter count. Raises CLIError on bad arguments."""
    rank, alpha = getattr(args, "lora_rank", None), getattr(args, "lora_alpha", None)
    if rank is None:
        for flag, v in (("--lora-alpha", alpha), ("--lora-targets", getattr(args, "lora_targets", None)),
                        ("--merge", getattr(args, "merge", False) or None)):
            if v is not None:
                raise CLIError(f"{flag} needs --lora-rank")
        return None
    if rank < 1:
        raise CLIError(f"--lora-rank must be >= 1, got {rank}")
    alpha = float(rank) if alpha is None else alpha
    if not (math.isfinite(alpha) and alpha > 0):
        raise CLIError(f"--lora-alpha must be a finite number > 0, got {alpha}")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    try:
        return apply_lora(model, rank, alpha, targets, seed=getattr(args, "seed", 0),
                          base=base if base is not None else getattr(args, "init", None))
    except ValueError as e:
        raise CLIError(f"--lora-rank: {e}") from None


def finish_lora(model, args, run_dir, checkpoint=None) -> None:
    """After training with --lora-rank: the adapter alone into RUN/adapter (small, PEFT-readable); with
    --merge, the adapters folded in and the run's checkpoint re-saved as a whole plain model (which no
    longer refers to its base)."""
    if getattr(args, "lora_rank", None) is None:
        return
    save_adapter(model, os.path.join(os.fspath(run_dir), "adapter"))
    if getattr(args, "merge", False):
        merge(model)
        if checkpoint is not None:
            save_model(model, checkpoint)           # the whole model; the checkpoint's other files are kept,
            stale = os.path.join(checkpoint, BASE_REF)      # base_model.json too, which no longer applies
            if os.path.isfile(stale):
                os.remove(stale)
