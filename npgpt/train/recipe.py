"""Pretraining as one call: `pretrain`, the recipe that `npgpt train` runs.

    from npgpt.train import pretrain
    r = pretrain(data="the-verdict", config="tiny", context=64, steps=100, out="runs/verdict")
    r = pretrain(out="runs/verdict", resume=True, steps=200)          # the same run, made longer
    r.out, r.model, r.fit.step                                        # where, what, how far

A run's settings are the fields of PretrainConfig, each the `npgpt train` flag of the same name
(underscores for dashes), with its default there and nowhere else; run.json keeps them and a resume
reads them back. What the user gives that cannot work raises ValueError (OSError: a file that cannot
be written) before anything is written, as one line naming the argument the way the command line
spells it (`--lr must be a finite number >= 0, got -1.0`). The helpers below the recipe (run
directory, --init, argument checks) are the fine-tuning recipes' too (npgpt/finetune/recipes.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .. import distributed
from ..config import PRESETS, SMALL_SHAPES, GPTConfig
from ..io.pretrained import load_model
from ..io.quantized import checkpoint_kind
from ..layers.dropout import Dropout
from ..layers.lora import lora_layers, merge
from ..model import GPT
from ..optim import AdamW, ShardedAdamW
from ..tokens.tokenizers import find_tokenizer, save_tokenizer, tokenizer_files
from .data import prepare_data
from .lm import count_targets, lm_evaluator, lm_loss, lm_sampler
from .loop import FitResult, LoopConfig, fit
from .run import RUN_FILE, TRAINER_STATE, RunDirError, check_run_dir, checkpoint_dir, open_run, read_trainer_state

# What a resume may change: the run's length, its evaluation, sampling and saving cadence, and whether
# AdamW is sharded over the processes (checkpoints hold it whole). Every other setting shapes the model,
# the data or the optimisation, and must stay as run.json has it.
MAY_CHANGE_ON_RESUME = ("steps", "epochs", "eval_every", "eval_batches", "sample_every", "prompt", "sample_tokens",
                        "save_every", "shard_optimizer")
CHOICES = {"tokenizer": ("gpt2", "char"), "config": (*SMALL_SHAPES, *PRESETS), "dtype": ("float32", "float64")}


@dataclass
class PretrainConfig:
    """What a pretraining run is (run.json). Each field is the `npgpt train` flag of that name."""
    # data
    data: str = "the-verdict"            # a text file, a directory of .txt files, a URL, the-verdict, tinyshakespeare
    tokenizer: str = "gpt2"              # gpt2 BPE, or char: a character vocabulary built from the text
    train_ratio: float = 0.9             # the first fraction of characters trains
    stride: int | None = None            # window start stride in tokens (None: the context)
    shuffle: bool = True                 # reshuffle the windows every epoch (seeded)
    # model: an --init checkpoint, or random weights of a --config shape (default small)
    init: str | None = None              # a model name, a checkpoint path or a run directory
    config: str | None = None            # tiny, small, gpt2 ... gpt2-xl
    n_layer: int | None = None           # overrides of the --config shape
    n_head: int | None = None
    n_embd: int | None = None
    dtype: str = "float32"               # or float64
    dropout: float = 0.0                 # on embeddings, attention, residuals
    # shape
    context: int = 256                   # tokens per window; a new model's n_ctx
    batch: int = 2                       # windows per update (the global batch over MPI processes)
    grad_accum: int = 1                  # micro-batches per update
    steps: int | None = None             # updates in the run (None: epochs of them)
    epochs: float | None = None          # passes over the training windows (None and no steps: 10)
    # optimiser: AdamW, linear warmup then cosine to min_lr
    lr: float = 4e-4
    min_lr: float | None = None          # None: lr / 10
    warmup: int = 0
    weight_decay: float = 0.1            # of >= 2-D parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0                    # gradient-norm clip; 0 = off
    shard_optimizer: bool = False        # under mpiexec: each rank keeps 1/N of AdamW (ZeRO-1; same updates)
    # evaluation, samples, checkpoints
    eval_every: int = 50                 # and after the last update
    eval_batches: int = 20               # per split; 0 = every window
    sample_every: int | None = None      # None: at each evaluation
    prompt: str | None = None            # None: the text's first words
    sample_tokens: int = 50
    save_every: int | None = None        # None: at each evaluation
    seed: int = 0                        # initial weights, shuffling, dropout

    def __post_init__(self):
        paths_as_str(self, "data", "init")


DEFAULTS = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}


@dataclass
class RunResult:
    """What a recipe leaves: its run directory, the trained model, fit's result and, for fine-tuning,
    what it wrote to OUT/metrics.json (None on MPI ranks other than 0, which write nothing)."""
    out: str
    model: object
    fit: FitResult
    metrics: dict | None = None


def takes(config_cls):
    """A recipe `f(*, <its own arguments>, **settings)` whose settings are config_cls's fields gets the
    signature of both, so help() and editors show every setting with its default."""
    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                    default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
                  for f in dataclasses.fields(config_cls)]
        fn.__signature__ = sig.replace(parameters=own + fields)
        return fn
    return wrap


# ----------------------------------------------------------------------------- the recipe
@takes(PretrainConfig)
def pretrain(*, out=None, resume: bool = False, overwrite: bool = False, progress: bool = True,
             max_bytes: int | None = None, dist=None, log=None, **settings) -> RunResult:
    """Pretrain (or continue training) a GPT-2 on text, writing the run directory `out` (default
    runs/<data name>): what `npgpt train` does. `settings` are PretrainConfig's fields.

    resume=True continues the run in `out` with the settings run.json holds; of those given here only
    MAY_CHANGE_ON_RESUME may differ (a new steps or epochs replaces the old length; the learning-rate
    schedule follows it). overwrite=True starts a new run in an `out` that holds one, or writes beside
    the files of a directory that is not a run. max_bytes caps a `data` URL download. dist: the
    process's npgpt.distributed object (default distributed.init()); every rank calls pretrain alike.
    log(msg) gets the run's lines (default print). Ctrl-C or SIGTERM ends the update in progress and writes
    a checkpoint: the result's fit.interrupted is then True (fit.signal names which)."""
    cfg = PretrainConfig(**settings)
    dist = dist or distributed.init()
    main = dist.is_main
    say = log or _print
    out = os.fspath(out) if out is not None else default_out(cfg.data)
    check_out(out, resume=resume, overwrite=overwrite)
    if resume:
        cfg = resumed_config({k: getattr(cfg, k) for k in settings}, out)
    check_pretrain(cfg, dist.world_size)

    if not main:
        dist.barrier()                                    # rank 0 downloads / caches weights and data first
    init_model = _load_init(cfg) if cfg.init is not None else None      # its n_ctx bounds the context
    data = prepare_data(cfg.data, tokenizer=_tokenizer(cfg, out, resume), context=cfg.context, stride=cfg.stride,
                        train_ratio=cfg.train_ratio, progress=main and progress, max_bytes=max_bytes)
    if main and dist.world_size > 1:
        dist.barrier()
    model = _build_model(cfg, data.n_vocab, init_model, dist)
    dist.broadcast_parameters(model)                      # every rank starts from rank 0's weights
    try:
        batches = data.batches(cfg.batch, shuffle=cfg.shuffle, seed=cfg.seed)
    except ValueError as e:                               # fewer windows than one batch
        raise ValueError(f"--batch {cfg.batch}: {e}") from None
    steps = cfg.steps or max(1, int(round((cfg.epochs or 10) * batches.batches_per_epoch)))
    loop = LoopConfig(steps=steps, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, clip=cfg.clip,
                      grad_accum=cfg.grad_accum, eval_every=cfg.eval_every,
                      sample_every=cfg.eval_every if cfg.sample_every is None else cfg.sample_every,
                      save_every=cfg.eval_every if cfg.save_every is None else cfg.save_every)
    resumed_at, had_steps = _resume_point(out) if resume else (0, None)
    if steps < resumed_at:
        raise ValueError(f"--{'epochs' if cfg.epochs else 'steps'}: the run is already at step {resumed_at}, "
                         f"past the {steps} updates that asks for")
    hyper = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    sharded = _sharded(cfg, dist)
    opt = ShardedAdamW(model, dist, **hyper) if sharded else AdamW(model, **hyper)
    prompt = cfg.prompt if cfg.prompt is not None else _default_prompt(data)

    procs = f"; {dist.world_size} processes x {cfg.batch // dist.world_size} rows" if dist.world_size > 1 else ""
    procs += f", each with 1/{dist.world_size} of AdamW (ZeRO-1)" if sharded else ""
    settings = run_settings(cfg, command="train")
    held = open_run(out, settings, resume=resume, overwrite=overwrite) if main \
        else contextlib.nullcontext()
    try:
        with held:
            if main:
                save_tokenizer(data.tokenizer, out)                     # generation reads it back,
            extra = tokenizer_files(data.tokenizer)                          # and every checkpoint carries a copy
            if main:
                say(f"npgpt train: {data.name}; {len(data.train_ids):,} train / {len(data.val_ids):,} val tokens; "
                    f"{batches.batches_per_epoch} batches of {cfg.batch}x{cfg.context} per epoch; "
                    f"{model.num_parameters() / 1e6:.2f}M parameters, {cfg.dtype}; {steps} updates{procs} -> {out}")
                if resume and had_steps not in (None, steps):
                    say(f"npgpt train: resuming at step {resumed_at} of {steps} updates (the run had {had_steps}); "
                        f"the learning-rate schedule is recomputed for {steps}")
            result = fit(model, opt, batches, loop, loss_fn=lm_loss, count_fn=count_targets,
                         evaluate=lm_evaluator(data, cfg.batch, cfg.eval_batches),
                         sample=lm_sampler(data.tokenizer, prompt, cfg.sample_tokens, seed=cfg.seed),
                         run_dir=out, resume=resume, overwrite=overwrite, settings=settings, extra_files=extra,
                         progress=progress, dist=dist, log=log)
    except BrokenPipeError:                               # the reader of the log went away: not the run's fault
        raise
    except OSError as e:                                  # a full disk, a read-only directory, ...
        raise OSError(f"--out {out}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; "
                      f"{_last_good(out)}") from e
    return RunResult(out, model, result)


def _print(msg) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- settings and their checks
def paths_as_str(cfg, *names) -> None:
    """A path given as a Path object is kept as its string (run.json holds text)."""
    for name in names:
        if isinstance(getattr(cfg, name), os.PathLike):
            setattr(cfg, name, os.fspath(getattr(cfg, name)))


def run_settings(cfg, **what) -> dict:
    """What run.json (and a fine-tuning run's metrics.json) records: what made the run, then its settings."""
    return {**what, **dataclasses.asdict(cfg)}


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_numbers(cfg, at_least: dict, finite=()) -> None:
    """ValueError naming the first setting below its bound (at_least: {name: bound}; None passes), or
    among `finite` one that is not a finite number >= 0."""
    for k, lo in at_least.items():
        v = getattr(cfg, k)
        if v is not None and v < lo:
            raise ValueError(f"{flag(k)} must be >= {lo}, got {v}")
    for k in finite:
        v = getattr(cfg, k)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{flag(k)} must be a finite number >= 0, got {v}")


def check_pretrain(cfg: PretrainConfig, world_size: int = 1) -> None:
    """Every setting on its own, before any file is read or written (ValueError naming it)."""
    check_numbers(cfg, {"context": 1, "batch": 1, "grad_accum": 1, "steps": 1, "warmup": 0, "eval_every": 0,
                        "eval_batches": 0, "sample_every": 0, "save_every": 0, "sample_tokens": 0, "seed": 0,
                        "n_layer": 1, "n_head": 1, "n_embd": 1, "stride": 1},
                  ("lr", "min_lr", "weight_decay", "eps", "clip", "epochs"))
    for k, allowed in CHOICES.items():
        if getattr(cfg, k) is not None and getattr(cfg, k) not in allowed:
            raise ValueError(f"{flag(k)} must be one of {', '.join(allowed)}, got {getattr(cfg, k)!r}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError(f"--epochs must be > 0, got {cfg.epochs}")
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, k) < 1.0:
            raise ValueError(f"--{k} must be in [0, 1), got {getattr(cfg, k)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 < cfg.train_ratio < 1.0:
        raise ValueError(f"--train-ratio must be in (0, 1), got {cfg.train_ratio}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if cfg.init is not None and cfg.config is not None:
        raise ValueError("give --init (start from a checkpoint) or --config (random weights), not both")
    if cfg.init is not None and any(getattr(cfg, k) is not None for k in ("n_layer", "n_head", "n_embd")):
        raise ValueError("--n-layer/--n-head/--n-embd shape a new model; they cannot change an --init checkpoint")
    if cfg.batch % cfg.grad_accum:
        raise ValueError(f"--batch {cfg.batch} must be a multiple of --grad-accum {cfg.grad_accum}")
    if cfg.batch % (world_size * cfg.grad_accum):
        raise ValueError(f"--batch {cfg.batch} must be a multiple of {world_size} processes x --grad-accum "
                         f"{cfg.grad_accum} = {world_size * cfg.grad_accum} (--batch is the global batch)")
    if not str(cfg.data).strip():
        raise ValueError("--data is empty")


def default_out(data) -> str:
    """runs/<the data's name>."""
    name = os.path.basename(os.path.normpath(str(data))) or "data"
    name = os.path.splitext(name)[0] if os.path.isfile(str(data)) else name
    return os.path.join("runs", "".join(c if c.isalnum() or c in "-_." else "-" for c in name))


def resumed_config(given: dict, out) -> PretrainConfig:
    """The settings of the run in `out` (run.json), changed by those `given` that may change on a resume
    (MAY_CHANGE_ON_RESUME); a given setting that differs from the run's and may not change is a
    ValueError naming it."""
    path = os.path.join(out, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {path} is unreadable ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} is not a JSON object")
    if saved.get("command") != "train":
        what = f"npgpt {saved['command']} {saved.get('task', '')}".strip() if saved.get("command") else "not npgpt train"
        raise ValueError(f"--resume: {out} holds a run of {what}, which npgpt train cannot continue")
    was = {**DEFAULTS, **{k: v for k, v in saved.items() if k in DEFAULTS}}
    for k, v in was.items():
        if not _fits(k, v):
            raise ValueError(f"--resume: {path} holds {k}={v!r}, not a value {flag(k)} takes")
    for k in sorted(set(given) - set(MAY_CHANGE_ON_RESUME)):
        if given[k] != was[k]:
            raise ValueError(f"{flag(k)} cannot change when resuming: the run in {out} has {flag(k)} {was[k]}")
    now = {**was, **{k: v for k, v in given.items() if k in MAY_CHANGE_ON_RESUME}}
    if "steps" in given:                                  # the new length replaces the old, however it was given
        now["epochs"] = None
    elif "epochs" in given:
        now["steps"] = None
    return PretrainConfig(**now)


_TYPES = {f.name: {t.strip() for t in str(f.type).split("|")} for f in dataclasses.fields(PretrainConfig)}


def _fits(name: str, v) -> bool:
    """Whether v is a value of PretrainConfig's field `name` (run.json is read back into them)."""
    kinds = _TYPES[name]
    if v is None:
        return "None" in kinds
    if name in CHOICES:
        return v in CHOICES[name]
    if "bool" in kinds:
        return isinstance(v, bool)
    if "int" in kinds:
        return type(v) is int
    if "float" in kinds:
        return type(v) in (int, float)
    return isinstance(v, str)


def _resume_point(out) -> tuple:
    """The step of the run's checkpoint, and the number of updates the run then had (None if unknown)."""
    state = read_trainer_state(os.path.join(checkpoint_dir(out), TRAINER_STATE))
    had = state.get("loop", {}).get("steps") if isinstance(state.get("loop"), dict) else None
    return state["step"], had if type(had) is int else None


def _last_good(out) -> str:
    good = checkpoint_dir(out)
    return f"the last complete checkpoint, {good}, is intact" if good else "no checkpoint was written"


# ----------------------------------------------------------------------------- run directory, --init
def check_out(out, *, resume: bool = False, overwrite: bool = False) -> None:
    """npgpt.train.run.check_run_dir, its RunDirError naming --out; nothing is written."""
    try:
        check_run_dir(out, resume=resume, overwrite=overwrite)
    except RunDirError as e:
        raise RunDirError(f"--out {e}") from None


def hold_out(hold: contextlib.ExitStack, out, settings: dict, *, overwrite: bool = False) -> None:
    """Make `out` this process's run (lock, run.json with the settings) until `hold` closes."""
    try:
        hold.enter_context(open_run(out, settings, overwrite=overwrite))
    except RunDirError as e:
        raise RunDirError(f"--out {e}") from None


def load_init(init, load):
    """load(init) for training; ValueError naming --init when it fails, or when init holds packed (bf16 /
    int8) weights: training needs float weights (a packed model has no backward). A model that comes
    with LoRA adapters (a LoRA run) has them merged, and every weight trainable again: training goes on
    from what that run computes, not from its frozen base."""
    try:
        kind = checkpoint_kind(init)
        if kind is not None:
            raise ValueError(f"holds packed {kind} weights, which are inference-only; "
                             "train from the float checkpoint they were packed from")
        model = load(init)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--init {init}: {e}") from e
    if lora_layers(model):
        merge(model).requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- model
def _load_init(cfg: PretrainConfig):
    model = load_init(cfg.init, lambda path: load_model(path, dtype=np.dtype(cfg.dtype)))
    if cfg.context > model.config.n_ctx:
        raise ValueError(f"--context {cfg.context} is beyond the model's n_ctx={model.config.n_ctx} "
                         f"(--init {cfg.init})")
    return model


def _build_model(cfg: PretrainConfig, n_vocab: int, model, dist):
    dtype = np.dtype(cfg.dtype)
    if model is not None:
        if n_vocab > model.config.n_vocab:
            raise ValueError(f"the {cfg.tokenizer} tokenizer has {n_vocab} tokens but the model's vocabulary holds "
                             f"{model.config.n_vocab} (--init {cfg.init})")
        _check_memory(cfg, model.config, model.num_parameters(), dtype.itemsize, f"--init {cfg.init}", dist)
        set_dropout(model, cfg.dropout)
        return model
    name = cfg.config or "small"
    shape = dict(SMALL_SHAPES[name]) if name in SMALL_SHAPES else GPTConfig.from_preset(name).to_hparams()
    typed = [k for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None]
    shape.update({k: getattr(cfg, k) for k in typed})
    config = GPTConfig(n_vocab=n_vocab, n_ctx=cfg.context, n_embd=shape["n_embd"], n_head=shape["n_head"],
                       n_layer=shape["n_layer"], dropout=cfg.dropout)
    flags = " ".join(f"{flag(k)} {getattr(cfg, k)}" for k in typed) or f"--config {name}"
    n_params = _gpt_parameters(config)
    _check_memory(cfg, config, n_params, dtype.itemsize, flags, dist)
    try:
        return GPT(config, dtype=dtype, seed=cfg.seed)
    except MemoryError:              # the check is a lower bound: memory other processes hold can still run out
        raise ValueError(f"{flags}: not enough memory for the model's {n_params:,} parameters") from None


def _sharded(cfg, dist) -> bool:
    """--shard-optimizer over more than one process (one process holds all of AdamW either way); cfg: a
    pretraining or fine-tuning config."""
    return cfg.shard_optimizer and dist.world_size > 1


def _gpt_parameters(config) -> int:
    """The parameters of a GPT of this config (wte tied to the LM head): V C + n_ctx C + L (12 C^2 + 13 C) + 2 C."""
    V, T, C, L = config.n_vocab, config.n_ctx, config.n_embd, config.n_layer
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def _training_bytes(config, n_params: int, itemsize: int, rows: int, eval_rows: int, T: int,
                    shards: int = 1) -> tuple:
    """Lower bounds of what training allocates, in bytes: (weights, activations).
    weights: every parameter 4 times: itself, its gradient and AdamW's two moments; with the optimizer
    cut into `shards` (ShardedAdamW), 2 + 3 / shards times (both moments and the summed gradient of a shard,
    itself and its gradient whole).
    activations: a micro-batch of `rows` windows of T tokens keeps, for backward, at least its logits (V per
    token) and 16 C per token in each block (the inputs of both layernorms and of both projections, q k v,
    and the MLP's 4C hidden layer before and after GELU); an evaluation batch of eval_rows holds its logits.
    A training step's traced peak is at least this (tests/test_cli_errors.py), so a run that this bound
    does not fit cannot run. gpt2-xl in float32 needs 23.2 GiB for its weights, gradients and moments
    alone: refused on a 24 GiB machine without swap, where it could not take one step."""
    V, C, L = config.n_vocab, config.n_embd, config.n_layer
    activations = max(rows * T * (V + 16 * L * C), eval_rows * T * V)
    if shards == 1:
        weights = 4 * n_params                                          # p, g, m, v
    else:                                                               # p, g whole; m, v, summed g of a shard
        weights = 2 * n_params + 3 * max(0, n_params // shards - 16)    # (a shard: up to 16 fewer than n / K)
    return weights * itemsize, activations * itemsize


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


def _check_memory(cfg: PretrainConfig, config, n_params: int, itemsize: int, model_flags: str, dist) -> None:
    """ValueError naming the setting to change when training cannot fit in this machine's memory, judged
    by _training_bytes (a lower bound) against _memory_capacity(), before anything that large is allocated."""
    capacity = _memory_capacity()
    if capacity is None:
        return
    rows = max(1, cfg.batch // (cfg.grad_accum * dist.world_size))     # one micro-batch of this rank
    eval_rows = cfg.batch if dist.is_main else 0                        # rank 0 evaluates whole batches
    weights, activations = _training_bytes(config, n_params, itemsize, rows, eval_rows, cfg.context,
                                           dist.world_size if _sharded(cfg, dist) else 1)
    if weights + activations <= capacity:
        return
    gib = f"this machine has {capacity / 2**30:,.1f} GiB of memory (RAM + swap)"
    if weights > capacity:
        raise ValueError(f"{model_flags}: training a model of {n_params:,} parameters needs at least "
                         f"{weights / 2**30:,.1f} GiB for them, their gradients and AdamW's moments ({cfg.dtype}), "
                         f"and {gib}; choose a smaller model")
    raise ValueError(f"--batch {cfg.batch} (--context {cfg.context}): training needs at least "
                     f"{(weights + activations) / 2**30:,.1f} GiB, {activations / 2**30:,.1f} GiB of it activations, "
                     f"and {gib}; lower --batch or --context")


def set_dropout(model, p: float) -> None:
    """Every dropout layer's probability (a checkpoint's model comes with the dropout it was built with)."""
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = p


# ----------------------------------------------------------------------------- data
def _tokenizer(cfg: PretrainConfig, out, resume: bool):
    """cfg.tokenizer, or the saved one of the run being resumed or of the --init run/checkpoint (a character
    vocabulary must stay the one the model was trained with)."""
    for path in ([out] if resume else []) + ([cfg.init] if cfg.init else []):
        tok = find_tokenizer(path) if path and os.path.isdir(path) else None
        if tok is not None:
            if cfg.init and not resume and tok.name != cfg.tokenizer:
                raise ValueError(f"--tokenizer {cfg.tokenizer}, but --init {cfg.init} was trained with {tok.name}")
            return tok
    return cfg.tokenizer


def _default_prompt(data) -> str:
    """The first few words of the training text."""
    head = data.tokenizer.decode(data.train_ids[:min(len(data.train_ids), 64)].tolist())
    words = head.strip().split("\n")[0].split()
    return " ".join(words[:4]) or head[:1]
