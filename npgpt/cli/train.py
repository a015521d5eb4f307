"""`npgpt train`: pretrain (or continue training) a GPT-2 on text, on the CPU.

    npgpt train                                            # small GPT on the-verdict (ships with npgpt), offline
    npgpt train --data tinyshakespeare --tokenizer char --config tiny --context 64 --steps 2000
    npgpt train --init gpt2 --data notes.txt --lr 1e-4 --steps 200 --out runs/notes
    npgpt train --out runs/notes --resume                  # continue where a run stopped

Everything is checked before anything is written: bad input prints one line and exits with status 2.
Ctrl-C finishes the update in progress, writes a checkpoint and exits (status 130); --resume then
ends bit for bit where the uninterrupted run would have.

Data-parallel over MPI: `mpiexec -n K npgpt train ...` (pip install -e ".[mpi]"); --batch stays the
global batch, each rank computes batch / K rows of it; only rank 0 prints, evaluates and writes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import CLIError

CONFIGS = {"tiny": dict(n_layer=2, n_head=2, n_embd=64), "small": dict(n_layer=6, n_head=6, n_embd=384)}
PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
RUN_FILE = "run.json"


def add_parser(sub):
    p = sub.add_parser("train", help="pretrain a GPT-2 on text (file, directory, URL, the-verdict, tinyshakespeare)",
                       description="Train a GPT-2 on text with AdamW, warmup + cosine learning rate, evaluation, "
                                   "samples, checkpoints and exact resume.")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="the-verdict",
                   help="a text file, a directory of .txt files, a URL, or a name: the-verdict (bundled, "
                        "default), tinyshakespeare (downloaded once)")
    d.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2",
                   help="gpt2 BPE (default) or a character vocabulary built from the text")
    d.add_argument("--train-ratio", type=float, default=0.9, help="the first fraction of characters trains (0.9)")
    d.add_argument("--stride", type=int, default=None, help="window start stride in tokens (default: the context)")
    d.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="reshuffle the windows every epoch (seeded; default on)")
    m = p.add_argument_group("model")
    m.add_argument("--init", default=None, metavar="gpt2|PATH",
                   help="start from a checkpoint: a model name, a checkpoint path or a run directory")
    m.add_argument("--config", default=None, choices=[*CONFIGS, *PRESETS],
                   help="start from random weights of this shape: tiny (2 layers, 2 heads, 64 wide), small "
                        "(6, 6, 384; the default), gpt2 ... gpt2-xl")
    m.add_argument("--n-layer", type=int, default=None)
    m.add_argument("--n-head", type=int, default=None)
    m.add_argument("--n-embd", type=int, default=None)
    m.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout on embeddings, attention, residuals (0.0)")
    s = p.add_argument_group("shape")
    s.add_argument("--context", type=int, default=256, help="tokens per window, the model's n_ctx when new (256)")
    s.add_argument("--batch", type=int, default=2, help="windows per update (global batch; default 2, the book's)")
    s.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (batch / grad-accum rows each)")
    s.add_argument("--steps", type=int, default=None, help="updates in the run (default: --epochs 10 of them)")
    s.add_argument("--epochs", type=float, default=None, help="passes over the training windows (default 10)")
    o = p.add_argument_group("optimiser")
    o.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (4e-4)")
    o.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr / 10)")
    o.add_argument("--warmup", type=int, default=0, help="linear warmup updates (0)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of >= 2-D parameters (0.1)")
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--eps", type=float, default=1e-8)
    o.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip; 0 = off (1.0)")
    e = p.add_argument_group("evaluation and samples")
    e.add_argument("--eval-every", type=int, default=50, help="evaluate every N updates and after the last (50)")
    e.add_argument("--eval-batches", type=int, default=20,
                   help="batches per split per evaluation; 0 = every window of the split (20)")
    e.add_argument("--sample-every", type=int, default=None, help="print a sample every N updates (default: each eval)")
    e.add_argument("--prompt", default=None, help="the samples' prompt (default: the text's first words)")
    e.add_argument("--sample-tokens", type=int, default=50, help="tokens per sample (50)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="the run directory (default runs/<data>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r.add_argument("--save-every", type=int, default=None, help="checkpoint every N updates (default: each eval)")
    r.add_argument("--seed", type=int, default=0, help="initial weights, shuffling and dropout (0)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--threads", type=int, default=None,
                   help="BLAS and Numba threads of this process (under mpiexec default: cores // ranks on the "
                        "machine, unless OMP_NUM_THREADS / NUMBA_NUM_THREADS are set)")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------- checks
def _check(args, world_size: int = 1):
    """Every flag on its own, before any file is read or written."""
    ints = {"context": 1, "batch": 1, "grad_accum": 1, "steps": 1, "warmup": 0, "eval_every": 0, "eval_batches": 0,
            "sample_every": 0, "save_every": 0, "sample_tokens": 0, "seed": 0, "n_layer": 1, "n_head": 1,
            "n_embd": 1, "stride": 1, "threads": 1}
    for k, lo in ints.items():
        v = getattr(args, k)
        if v is not None and v < lo:
            raise CLIError(f"--{k.replace('_', '-')} must be >= {lo}, got {v}")
    for k in ("lr", "min_lr", "weight_decay", "eps", "clip", "epochs"):
        v = getattr(args, k)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise CLIError(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.epochs is not None and args.epochs <= 0:
        raise CLIError(f"--epochs must be > 0, got {args.epochs}")
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, k) < 1.0:
            raise CLIError(f"--{k} must be in [0, 1), got {getattr(args, k)}")
    if not 0.0 <= args.dropout < 1.0:
        raise CLIError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 < args.train_ratio < 1.0:
        raise CLIError(f"--train-ratio must be in (0, 1), got {args.train_ratio}")
    if args.steps is not None and args.epochs is not None:
        raise CLIError("give --steps or --epochs, not both")
    if args.init is not None and args.config is not None:
        raise CLIError("give --init (start from a checkpoint) or --config (random weights), not both")
    if args.init is not None and any(getattr(args, k) is not None for k in ("n_layer", "n_head", "n_embd")):
        raise CLIError("--n-layer/--n-head/--n-embd shape a new model; they cannot change an --init checkpoint")
    if args.batch % args.grad_accum:
        raise CLIError(f"--batch {args.batch} must be a multiple of --grad-accum {args.grad_accum}")
    if args.batch % (world_size * args.grad_accum):
        raise CLIError(f"--batch {args.batch} must be a multiple of {world_size} processes x --grad-accum "
                       f"{args.grad_accum} = {world_size * args.grad_accum} (--batch is the global batch)")
    if not str(args.data).strip():
        raise CLIError("--data is empty")


def _default_out(args) -> str:
    name = os.path.basename(os.path.normpath(str(args.data))) or "data"
    name = os.path.splitext(name)[0] if os.path.isfile(str(args.data)) else name
    return os.path.join("runs", "".join(c if c.isalnum() or c in "-_." else "-" for c in name))


# ----------------------------------------------------------------------------- model
def _load_init(args):
    import numpy as np

    from ..model import GPT
    try:
        model = GPT.from_pretrained(args.init, dtype=np.dtype(args.dtype))
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--init {args.init}: {e}") from None
    if args.context > model.config.n_ctx:
        raise CLIError(f"--context {args.context} is beyond the model's n_ctx={model.config.n_ctx} (--init {args.init})")
    return model


def _build_model(args, n_vocab: int, model=None):
    import numpy as np

    from ..config import GPTConfig
    from ..model import GPT
    dtype = np.dtype(args.dtype)
    if model is not None:
        if n_vocab > model.config.n_vocab:
            raise CLIError(f"the {args.tokenizer} tokenizer has {n_vocab} tokens but the model's vocabulary holds "
                           f"{model.config.n_vocab} (--init {args.init})")
        set_dropout(model, args.dropout)
        return model
    name = args.config or "small"
    shape = dict(CONFIGS[name]) if name in CONFIGS else GPTConfig.from_preset(name).to_hparams()
    shape.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k) is not None})
    try:
        config = GPTConfig(n_vocab=n_vocab, n_ctx=args.context, n_embd=shape["n_embd"], n_head=shape["n_head"],
                           n_layer=shape["n_layer"], dropout=args.dropout)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return GPT(config, dtype=dtype, seed=args.seed)


def set_dropout(model, p: float) -> None:
    """Every dropout layer's probability (a checkpoint's model comes with the dropout it was built with)."""
    from ..layers.dropout import Dropout
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = p


# ----------------------------------------------------------------------------- the command
def run(args) -> int:
    from ..optim import AdamW
    from ..train.data import prepare_data
    from ..train.lm import count_targets, lm_evaluator, lm_loss, lm_sampler
    from ..train.loop import LoopConfig, fit
    from ..train.run import checkpoint_dir
    from ..train.tokenizers import tokenizer_file
    from .. import distributed

    dist = distributed.init(args.threads)                 # one process, or this rank of mpiexec's job
    main = dist.is_main
    out = args.out or _default_out(args)
    if args.resume:
        args = _resumed_args(args, out)
    _check(args, dist.world_size)
    if not args.resume and checkpoint_dir(out) is not None:
        raise CLIError(f"--out {out} already holds a run; continue it with --resume or choose another --out")

    if not main:
        dist.barrier()                                    # rank 0 downloads / caches weights and data first
    init_model = _load_init(args) if args.init is not None else None     # its n_ctx bounds --context
    try:
        data = prepare_data(args.data, tokenizer=_tokenizer(args), context=args.context, stride=args.stride,
                            train_ratio=args.train_ratio, progress=main and not args.no_progress)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    if main and dist.world_size > 1:
        dist.barrier()
    model = _build_model(args, data.n_vocab, init_model)
    dist.broadcast_parameters(model)                      # every rank starts from rank 0's weights
    batches = data.batches(args.batch, shuffle=args.shuffle, seed=args.seed)
    steps = args.steps or max(1, int(round((args.epochs or 10) * batches.batches_per_epoch)))
    try:
        loop = LoopConfig(steps=steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, clip=args.clip,
                          grad_accum=args.grad_accum, eval_every=args.eval_every,
                          sample_every=args.eval_every if args.sample_every is None else args.sample_every,
                          save_every=args.eval_every if args.save_every is None else args.save_every)
    except ValueError as e:
        raise CLIError(str(e)) from None
    opt = AdamW(model, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.weight_decay)
    prompt = args.prompt if args.prompt is not None else _default_prompt(data)

    if not args.resume and main:
        os.makedirs(out, exist_ok=True)
        from ..train.run import write_json
        write_json(os.path.join(out, RUN_FILE), {k: v for k, v in vars(args).items() if k not in ("func",)})
    if main:
        data.tokenizer.save(os.path.join(out, "tokenizer.json"))  # generation reads it back,
    extra = tokenizer_file(data.tokenizer)                           # and every checkpoint carries a copy
    n_params = model.num_parameters()
    procs = f"; {dist.world_size} processes x {args.batch // dist.world_size} rows" if dist.world_size > 1 else ""
    if main:
        print(f"npgpt train: {data.name}; {len(data.train_ids):,} train / {len(data.val_ids):,} val tokens; "
              f"{batches.batches_per_epoch} batches of {args.batch}x{args.context} per epoch; "
              f"{n_params / 1e6:.2f}M parameters, {args.dtype}; {steps} updates{procs} -> {out}", flush=True)
    try:
        result = fit(model, opt, batches, loop, loss_fn=lm_loss, count_fn=count_targets,
                     evaluate=lm_evaluator(data, args.batch, args.eval_batches),
                     sample=lm_sampler(data.tokenizer, prompt, args.sample_tokens, seed=args.seed),
                     run_dir=out, resume=args.resume, extra_files=extra, progress=not args.no_progress,
                     dist=dist)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    if result.interrupted:
        if main:
            print(f"npgpt train: interrupted at step {result.step}; checkpoint written. Continue with: "
                  f"npgpt train --out {out} --resume", file=sys.stderr)
        return 130
    if main:
        print(f"npgpt train: done, {result.step} updates; model in {out} (npgpt generate --model {out})")
    return 0


def _tokenizer(args):
    """--tokenizer, or the saved one of the run being resumed or of the --init run/checkpoint (a character
    vocabulary must stay the one the model was trained with)."""
    from ..train.tokenizers import load_tokenizer
    for path in ([args.out] if args.resume else []) + ([args.init] if args.init else []):
        saved = os.path.join(path, "tokenizer.json") if path else ""
        if saved and os.path.isfile(saved):
            tok = load_tokenizer(saved)
            if args.init and not args.resume and tok.name != args.tokenizer:
                raise CLIError(f"--tokenizer {args.tokenizer}, but --init {args.init} was trained with {tok.name}")
            return tok
    return args.tokenizer


def _default_prompt(data) -> str:
    """The first few words of the training text."""
    head = data.tokenizer.decode(data.train_ids[:min(len(data.train_ids), 64)].tolist())
    words = head.strip().split("\n")[0].split()
    return " ".join(words[:4]) or head[:1]


def _resumed_args(args, out):
    """--resume continues with the run's saved settings (run.json); only --no-progress may differ."""
    from ..train.run import checkpoint_dir
    path = os.path.join(out, RUN_FILE)
    if checkpoint_dir(out) is None or not os.path.isfile(path):
        raise CLIError(f"--resume: no checkpoint in {out} (start the run without --resume)")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    merged = argparse.Namespace(**{**vars(args), **saved})
    merged.resume, merged.out, merged.no_progress, merged.func = True, out, args.no_progress, args.func
    merged.threads = args.threads
    return merged
