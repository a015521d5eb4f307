"""`npgpt train`: pretrain (or continue training) a GPT-2 on text, on the CPU.

    npgpt train                                            # small GPT on the-verdict (ships with npgpt), offline
    npgpt train --data tinyshakespeare --tokenizer char --config tiny --context 64 --steps 2000
    npgpt train --init gpt2 --data notes.txt --lr 1e-4 --steps 200 --out runs/notes
    npgpt train --out runs/notes --resume                  # continue where a run stopped

Everything is checked before anything is written: bad input prints one line and exits with status 2.
Ctrl-C finishes the update in progress, writes a checkpoint and exits (status 130); --resume then
ends bit for bit where the uninterrupted run would have. A resume may change how long the run is
(--steps/--epochs: the learning-rate schedule follows the new total) and when it evaluates, samples
and saves; anything else must stay as the run has it. One run at a time holds a run directory.

Data-parallel over MPI: `mpiexec -n K npgpt train ...` (pip install -e ".[mpi]"); --batch stays the
global batch, each rank computes batch / K rows of it; only rank 0 prints, evaluates and writes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

from . import CLIError

from ..config import PRESETS, SMALL_SHAPES
RUN_FILE = "run.json"
# What a --resume may change: the run's length and its evaluation, sampling and saving cadence. Every
# other flag of run.json shapes the model, the data or the optimisation, and must stay as it was.
MAY_CHANGE_ON_RESUME = ("steps", "epochs", "eval_every", "eval_batches", "sample_every", "prompt", "sample_tokens",
                        "save_every")
THIS_INVOCATION = ("resume", "overwrite", "out", "no_progress", "threads", "max_bytes")   # this command's, not the run's
_ACTIONS: dict = {}            # dest -> the train parser's action (its type and choices)
_DEFAULTS: dict = {}           # dest -> its default


def add_parser(sub):
    p = sub.add_parser("train", help="pretrain a GPT-2 on text (file, directory, URL, the-verdict, tinyshakespeare)",
                       description="Train a GPT-2 on text with AdamW, warmup + cosine learning rate, evaluation, "
                                   "samples, checkpoints and exact resume.")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="the-verdict",
                   help="a text file, a directory of .txt files, a URL, or a name: the-verdict (bundled, "
                        "default), tinyshakespeare (downloaded once)")
    d.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="the most a --data URL download may bring (default 8 GiB); a larger one stops, deleted")
    d.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2",
                   help="gpt2 BPE (default) or a character vocabulary built from the text")
    d.add_argument("--train-ratio", type=float, default=0.9, help="the first fraction of characters trains (0.9)")
    d.add_argument("--stride", type=int, default=None, help="window start stride in tokens (default: the context)")
    d.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="reshuffle the windows every epoch (seeded; default on)")
    m = p.add_argument_group("model")
    m.add_argument("--init", default=None, metavar="gpt2|PATH",
                   help="start from a checkpoint: a model name, a checkpoint path or a run directory")
    m.add_argument("--config", default=None, choices=[*SMALL_SHAPES, *PRESETS],
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
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (--steps/--epochs and the evaluation, "
                        "sample and save cadence may change; nothing else)")
    r.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that already holds one (its checkpoints go), or write npgpt's "
                        "files beside the files of a non-empty directory")
    r.add_argument("--save-every", type=int, default=None, help="checkpoint every N updates (default: each eval)")
    r.add_argument("--seed", type=int, default=0, help="initial weights, shuffling and dropout (0)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--threads", type=int, default=None,
                   help="BLAS and Numba threads of this process (under mpiexec default: cores // ranks on the "
                        "machine, unless OMP_NUM_THREADS / NUMBA_NUM_THREADS are set)")
    p.set_defaults(func=run)
    for a in p._actions:       # a flag not typed stays out of args, so that a resume knows what was typed
        if a.dest != "help":
            _ACTIONS[a.dest], _DEFAULTS[a.dest] = a, a.default
            a.default = argparse.SUPPRESS
    return p


def _typed(args) -> set:
    """Fill in the defaults of the flags not typed; return the flags typed."""
    typed = {k for k in vars(args) if k in _DEFAULTS}
    for dest, default in _DEFAULTS.items():
        if dest not in typed:
            setattr(args, dest, default)
    return typed


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

    from ..io.pretrained import load_model
    from . import refuse_packed
    try:
        refuse_packed(args.init)
        model = load_model(args.init, dtype=np.dtype(args.dtype))
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
        _check_memory(args, model.config, model.num_parameters(), dtype.itemsize, f"--init {args.init}")
        set_dropout(model, args.dropout)
        return model
    name = args.config or "small"
    shape = dict(SMALL_SHAPES[name]) if name in SMALL_SHAPES else GPTConfig.from_preset(name).to_hparams()
    typed = [k for k in ("n_layer", "n_head", "n_embd") if getattr(args, k) is not None]
    shape.update({k: getattr(args, k) for k in typed})
    try:
        config = GPTConfig(n_vocab=n_vocab, n_ctx=args.context, n_embd=shape["n_embd"], n_head=shape["n_head"],
                           n_layer=shape["n_layer"], dropout=args.dropout)
    except ValueError as e:
        raise CLIError(str(e)) from None
    flags = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in typed) or f"--config {name}"
    n_params = _gpt_parameters(config)
    _check_memory(args, config, n_params, dtype.itemsize, flags)
    try:
        return GPT(config, dtype=dtype, seed=args.seed)
    except MemoryError:              # the check is a lower bound: memory other processes hold can still run out
        raise CLIError(f"{flags}: not enough memory for the model's {n_params:,} parameters") from None


def _gpt_parameters(config) -> int:
    """The parameters of a GPT of this config (wte tied to the LM head): V C + n_ctx C + L (12 C^2 + 13 C) + 2 C."""
    V, T, C, L = config.n_vocab, config.n_ctx, config.n_embd, config.n_layer
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def _training_bytes(config, n_params: int, itemsize: int, rows: int, eval_rows: int, T: int) -> tuple:
    """Lower bounds of what training allocates, in bytes: (weights, activations).
    weights: every parameter 4 times: itself, its gradient and AdamW's two moments.
    activations: a micro-batch of `rows` windows of T tokens keeps, for backward, at least its logits (V per
    token) and 16 C per token in each block (the inputs of both layernorms and of both projections, q k v,
    and the MLP's 4C hidden layer before and after GELU); an evaluation batch of eval_rows holds its logits.
    A training step's traced peak is at least this (tests/test_cli_errors.py), so a run that this bound
    does not fit cannot run. gpt2-xl in float32 needs 23.2 GiB for its weights, gradients and moments
    alone: refused on a 24 GiB machine without swap, where it could not take one step."""
    V, C, L = config.n_vocab, config.n_embd, config.n_layer
    activations = max(rows * T * (V + 16 * L * C), eval_rows * T * V)
    return 4 * n_params * itemsize, activations * itemsize


def _memory_capacity() -> int | None:
    """The most memory this process could get, in bytes: RAM + swap (/proc/meminfo), less under a cgroup
    memory limit; None where the system does not say (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)}
        total, swap = info["MemTotal"], info.get("SwapTotal", 0)
    except (OSError, ValueError, KeyError, IndexError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, encoding="ascii") as f:
                total = min(total, int(f.read().strip()))          # "max": no limit (ValueError)
            break
        except (OSError, ValueError):
            continue
    return total + swap


def _check_memory(args, config, n_params: int, itemsize: int, model_flags: str) -> None:
    """CLIError naming the flag to change when training cannot fit in this machine's memory, judged by
    _training_bytes (a lower bound) against _memory_capacity(), before anything that large is allocated."""
    from .. import distributed
    capacity = _memory_capacity()
    if capacity is None:
        return
    dist = distributed.init()
    rows = max(1, args.batch // (args.grad_accum * dist.world_size))     # one micro-batch of this rank
    eval_rows = args.batch if dist.is_main else 0                         # rank 0 evaluates whole batches
    weights, activations = _training_bytes(config, n_params, itemsize, rows, eval_rows, args.context)
    if weights + activations <= capacity:
        return
    gib = f"this machine has {capacity / 2**30:,.1f} GiB of memory (RAM + swap)"
    if weights > capacity:
        raise CLIError(f"{model_flags}: training a model of {n_params:,} parameters needs at least "
                       f"{weights / 2**30:,.1f} GiB for them, their gradients and AdamW's moments ({args.dtype}), "
                       f"and {gib}; choose a smaller model")
    raise CLIError(f"--batch {args.batch} (--context {args.context}): training needs at least "
                   f"{(weights + activations) / 2**30:,.1f} GiB, {activations / 2**30:,.1f} GiB of it activations, "
                   f"and {gib}; lower --batch or --context")


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
    from ..train.run import RunDirError, check_run_dir, open_run
    from ..tokens.tokenizers import save_tokenizer, tokenizer_files
    from .. import distributed

    typed = _typed(args)
    dist = distributed.init(args.threads)                 # one process, or this rank of mpiexec's job
    main = dist.is_main
    out = args.out or _default_out(args)
    try:
        check_run_dir(out, resume=args.resume, overwrite=args.overwrite)
    except RunDirError as e:
        raise CLIError(f"--out {e}") from None
    if args.resume:
        args = _resumed_args(args, typed, out)
    _check(args, dist.world_size)

    if not main:
        dist.barrier()                                    # rank 0 downloads / caches weights and data first
    init_model = _load_init(args) if args.init is not None else None     # its n_ctx bounds --context
    try:
        data = prepare_data(args.data, tokenizer=_tokenizer(args), context=args.context, stride=args.stride,
                            train_ratio=args.train_ratio, progress=main and not args.no_progress,
                            max_bytes=args.max_bytes)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    if main and dist.world_size > 1:
        dist.barrier()
    model = _build_model(args, data.n_vocab, init_model)
    dist.broadcast_parameters(model)                      # every rank starts from rank 0's weights
    try:
        batches = data.batches(args.batch, shuffle=args.shuffle, seed=args.seed)
    except ValueError as e:                               # fewer windows than one batch
        raise CLIError(f"--batch {args.batch}: {e}") from None
    steps = args.steps or max(1, int(round((args.epochs or 10) * batches.batches_per_epoch)))
    try:
        loop = LoopConfig(steps=steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, clip=args.clip,
                          grad_accum=args.grad_accum, eval_every=args.eval_every,
                          sample_every=args.eval_every if args.sample_every is None else args.sample_every,
                          save_every=args.eval_every if args.save_every is None else args.save_every)
    except ValueError as e:
        raise CLIError(str(e)) from None
    resumed_at, had_steps = _resume_point(out) if args.resume else (0, None)
    if steps < resumed_at:
        raise CLIError(f"--{'epochs' if args.epochs else 'steps'}: the run is already at step {resumed_at}, "
                       f"past the {steps} updates that asks for")
    opt = AdamW(model, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.weight_decay)
    prompt = args.prompt if args.prompt is not None else _default_prompt(data)

    settings = {k: v for k, v in vars(args).items() if k not in ("func", *THIS_INVOCATION)}
    n_params = model.num_parameters()
    procs = f"; {dist.world_size} processes x {args.batch // dist.world_size} rows" if dist.world_size > 1 else ""
    held = open_run(out, settings, resume=args.resume, overwrite=args.overwrite) if main \
        else contextlib.nullcontext()
    try:
        with held:
            if main:
                save_tokenizer(data.tokenizer, out)                     # generation reads it back,
            extra = tokenizer_files(data.tokenizer)                          # and every checkpoint carries a copy
            if main:
                print(f"npgpt train: {data.name}; {len(data.train_ids):,} train / {len(data.val_ids):,} val tokens; "
                      f"{batches.batches_per_epoch} batches of {args.batch}x{args.context} per epoch; "
                      f"{n_params / 1e6:.2f}M parameters, {args.dtype}; {steps} updates{procs} -> {out}", flush=True)
                if args.resume and had_steps not in (None, steps):
                    print(f"npgpt train: resuming at step {resumed_at} of {steps} updates (the run had {had_steps}); "
                          f"the learning-rate schedule is recomputed for {steps}", flush=True)
            result = fit(model, opt, batches, loop, loss_fn=lm_loss, count_fn=count_targets,
                         evaluate=lm_evaluator(data, args.batch, args.eval_batches),
                         sample=lm_sampler(data.tokenizer, prompt, args.sample_tokens, seed=args.seed),
                         run_dir=out, resume=args.resume, overwrite=args.overwrite, extra_files=extra,
                         progress=not args.no_progress, dist=dist)
    except OSError as e:                                  # a full disk, a read-only directory, ...
        raise CLIError(f"--out {out}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; "
                       f"{_last_good(out)}") from None
    except (ValueError, FloatingPointError) as e:         # a damaged checkpoint, a run gone non-finite
        raise CLIError(str(e)) from None
    if result.interrupted:
        if main:
            print(f"npgpt train: interrupted at step {result.step}; checkpoint written. Continue with: "
                  f"npgpt train --out {out} --resume", file=sys.stderr)
        return 130
    if main:
        print(f"npgpt train: done, {result.step} updates; model in {out} (npgpt generate --model {out})")
    return 0


def _last_good(out) -> str:
    from ..train.run import checkpoint_dir
    good = checkpoint_dir(out)
    return f"the last complete checkpoint, {good}, is intact" if good else "no checkpoint was written"


def _resume_point(out) -> tuple:
    """The step of the run's checkpoint, and the number of updates the run then had (None if unknown)."""
    from ..train.run import TRAINER_STATE, checkpoint_dir, read_trainer_state
    try:
        state = read_trainer_state(os.path.join(checkpoint_dir(out), TRAINER_STATE))
    except ValueError as e:
        raise CLIError(str(e)) from None
    had = state.get("loop", {}).get("steps") if isinstance(state.get("loop"), dict) else None
    return state["step"], had if type(had) is int else None


def _tokenizer(args):
    """--tokenizer, or the saved one of the run being resumed or of the --init run/checkpoint (a character
    vocabulary must stay the one the model was trained with)."""
    from ..tokens.tokenizers import find_tokenizer
    for path in ([args.out] if args.resume else []) + ([args.init] if args.init else []):
        tok = find_tokenizer(path) if path and os.path.isdir(path) else None
        if tok is not None:
            if args.init and not args.resume and tok.name != args.tokenizer:
                raise CLIError(f"--tokenizer {args.tokenizer}, but --init {args.init} was trained with {tok.name}")
            return tok
    return args.tokenizer


def _default_prompt(data) -> str:
    """The first few words of the training text."""
    head = data.tokenizer.decode(data.train_ids[:min(len(data.train_ids), 64)].tolist())
    words = head.strip().split("\n")[0].split()
    return " ".join(words[:4]) or head[:1]


def _resumed_args(args, typed: set, out):
    """--resume continues with the run's saved settings (run.json), changed only by the typed flags that
    may change (MAY_CHANGE_ON_RESUME); a typed flag that differs from the run and may not change is a
    CLIError naming it."""
    path = os.path.join(out, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"--resume: {path} is unreadable ({e})") from None
    if not isinstance(saved, dict):
        raise CLIError(f"--resume: {path} is not a JSON object")
    saved = {k: v for k, v in saved.items() if k in _DEFAULTS and k not in THIS_INVOCATION}
    for k, v in saved.items():
        if not _fits(_ACTIONS[k], v):
            raise CLIError(f"--resume: {path} holds {k}={v!r}, not a value --{k.replace('_', '-')} takes")
    for k in sorted(typed - set(THIS_INVOCATION) - set(MAY_CHANGE_ON_RESUME)):
        if getattr(args, k) != saved.get(k, _DEFAULTS[k]):
            raise CLIError(f"--{k.replace('_', '-')} cannot change when resuming: the run in {out} has "
                           f"--{k.replace('_', '-')} {saved.get(k, _DEFAULTS[k])}")
    merged = argparse.Namespace(**{**_DEFAULTS, **saved})
    for k in typed & set(MAY_CHANGE_ON_RESUME):
        setattr(merged, k, getattr(args, k))
    if "steps" in typed:                                  # the new length replaces the old, however it was given
        merged.epochs = None
    elif "epochs" in typed:
        merged.steps = None
    for k in THIS_INVOCATION + ("func",):
        setattr(merged, k, getattr(args, k))
    return merged


def _fits(action, v) -> bool:
    """Whether v is a value `action` could have parsed (run.json is read back into the flags)."""
    if action.choices is not None and v is not None and v not in action.choices:
        return False
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return isinstance(v, bool)
    if v is None:
        return _DEFAULTS[action.dest] is None
    if action.type is int:
        return type(v) is int
    if action.type is float:
        return type(v) in (int, float)
    return isinstance(v, str)
