"""Fine-tuning as one call: the recipes that `npgpt finetune classify` and `npgpt finetune instruct` run.

    from npgpt.finetune import finetune_classify, finetune_instruct
    r = finetune_classify(data="SMSSpamCollection.tsv", init="gpt2", out="runs/spam", trainable_blocks=1)
    r.metrics["test_accuracy"]
    r = finetune_instruct(data="instruction-data.json", init="gpt2-medium", out="runs/instruct", lora_rank=16)

Their settings are the fields of ClassifyConfig and InstructConfig, each the flag of that name, with
their defaults there and nowhere else. As in npgpt.train.recipe: bad input raises ValueError as one
line naming the argument the way the command line spells it, before anything is written; `out` must
be new or empty, or overwrite=True.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

from .. import distributed
from ..io.atomic import write_json
from ..io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_REF, save_adapter
from ..io.pretrained import load_model, save_model
from ..layers.lora import apply_lora, check_rank, merge
from ..optim import AdamW, ShardedAdamW
from ..tokens.bpe import get_tokenizer
from ..train.data import BatchStream
from ..train.lm import count_targets, lm_loss, mean_loss
from ..train.loop import LoopConfig, fit
from ..train.run import rewrite_checkpoint
from ..train.recipe import RunResult, _sharded, check_numbers, check_out, hold_out, load_init, paths_as_str, \
    run_settings, takes
from .classifier import Classifier
from .classify import ClassRows, balance_and_split, classify_evaluator, classify_loss, count_rows, read_table
from .instruct import InstructBatches, encode_entry, eval_batches, generate_responses, instruct_evaluator, \
    read_entries, split_entries

GPT2_VOCAB = 50257
METRICS = "metrics.json"
RESPONSES = "test-responses.json"


@dataclass(kw_only=True)
class FinetuneConfig:
    """The settings both fine-tuning tasks take; each field is the `npgpt finetune` flag of that name."""
    data: str                            # the task's file
    init: str                            # the GPT: a model name, a checkpoint or an npgpt run directory
    epochs: int                          # passes over the training rows
    batch: int = 8                       # rows per update
    lr: float = 5e-5                     # constant
    weight_decay: float = 0.1
    max_length: int | None = None        # at most this many tokens per row, truncating (None: n_ctx)
    limit: int | None = None             # use only the first N rows of the file
    seed: int = 0
    lora_rank: int | None = None         # train LoRA adapters of this rank on the frozen model instead
    lora_alpha: float | None = None      # the adapters' scale is alpha / rank (None: alpha = rank)
    lora_targets: str | None = None      # comma-separated layer names, as PEFT's target_modules (None: every Linear)
    merge: bool = False                  # at the end, fold the adapters into the weights and save that model
    shard_optimizer: bool = False        # under mpiexec: each rank keeps 1/N of AdamW (ZeRO-1; same updates)

    def __post_init__(self):
        paths_as_str(self, "data", "init")


@dataclass(kw_only=True)
class ClassifyConfig(FinetuneConfig):
    """A text classifier: a head on the GPT's last real token, trained on a TSV/CSV of labelled texts."""
    epochs: int = 5
    text_col: int | str | None = None    # a column number or a header name (None: 1)
    label_col: int | str | None = None   # (None: 0)
    trainable_blocks: int | str = 1      # train the last K blocks, ln_f and the head; "all": every parameter

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.trainable_blocks, str) and self.trainable_blocks.isdigit():
            self.trainable_blocks = int(self.trainable_blocks)


@dataclass(kw_only=True)
class InstructConfig(FinetuneConfig):
    """Instruction following: a JSON list of {instruction, input, output}, in the Alpaca prompt format."""
    epochs: int = 2
    mask_prompt: bool = False            # learn the responses only
    eval_every: int = 5                  # evaluate every this many updates; 0: at the end
    eval_batches: int = 5                # on the first N batches of the train and val entries; 0: all
    max_new_tokens: int = 256            # longest test response, in tokens


# ----------------------------------------------------------------------------- classify
@takes(ClassifyConfig)
def finetune_classify(*, out, overwrite: bool = False, progress: bool = True, dist=None, log=None,
                      **settings) -> RunResult:
    """Fine-tune a GPT as a text classifier into the run directory `out` (the book's chapter 6): the
    table's classes are balanced by undersampling and split 70/10/20 (seeded); train, validation and
    test accuracy after each epoch go to OUT/metrics.json (the result's metrics). `settings` are
    ClassifyConfig's fields; dist and log as in npgpt.train.pretrain."""
    cfg = ClassifyConfig(**settings)
    with contextlib.ExitStack() as hold:              # the run directory, once it is made, until the end
        return _classify(cfg, os.fspath(out), overwrite, progress, dist, log, hold)


def _classify(cfg: ClassifyConfig, out, overwrite, progress, dist, log, hold) -> RunResult:
    blocks = cfg.trainable_blocks
    if blocks != "all" and not (type(blocks) is int and blocks >= 0):
        raise ValueError(f"--trainable-blocks must be a number >= 0 or all, got {blocks!r}")
    dist = _start(cfg, out, overwrite, dist)
    try:
        texts, labels = read_table(cfg.data, cfg.text_col, cfg.label_col)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {cfg.data}: {e}") from e
    if cfg.limit:
        texts, labels = texts[:cfg.limit], labels[:cfg.limit]
    names = sorted(set(labels))
    try:
        train_ix, val_ix, test_ix = balance_and_split(labels, cfg.seed)
    except ValueError as e:
        raise ValueError(f"--data {cfg.data}: {e}") from e
    model = _load(cfg, lambda path: Classifier.from_pretrained(path, names, seed=cfg.seed), "classification reads")
    n_ctx, L = model.gpt.config.n_ctx, len(model.gpt.h)
    max_length = min(cfg.max_length or n_ctx, n_ctx)
    k = None if blocks == "all" else blocks
    if k is not None and k > L:
        raise ValueError(f"--trainable-blocks {k}: the model has {L} blocks")
    model.set_trainable(k)
    setup_lora(model, cfg)                       # lora_rank: only adapters and the head train
    dist.broadcast_parameters(model)             # every rank starts from rank 0's head (and adapters)

    tok = get_tokenizer()
    index = {c: i for i, c in enumerate(names)}
    ids = [tok.encode(t)[:max_length] for t in texts]
    y = [index[c] for c in labels]

    def rows(ix):
        return [ids[i] for i in ix], [y[i] for i in ix]
    splits = {"train": rows(train_ix), "val": rows(val_ix), "test": rows(test_ix)}
    batches = BatchStream(ClassRows(*splits["train"], max_length), cfg.batch, seed=cfg.seed)
    bpe = batches.batches_per_epoch
    epoch_rows = []
    evaluate = classify_evaluator(splits, max(cfg.batch, 16), max_length, rows=epoch_rows,
                                  epoch_of=lambda: batches.epoch + (batches.position == bpe))
    loop = LoopConfig(steps=cfg.epochs * bpe, lr=cfg.lr, min_lr=cfg.lr, eval_every=bpe, save_every=0)
    opt = _adamw(model, cfg, dist)
    trainable = sum(p.data.size for p in model.parameters() if p.requires_grad)
    if dist.is_main:
        (log or _print)(f"npgpt finetune classify: {len(train_ix)} train / {len(val_ix)} val / {len(test_ix)} test "
                        f"rows, classes {names}; {trainable / 1e6:.2f}M of {model.gpt.num_parameters() / 1e6:.2f}M "
                        f"parameters trainable; {cfg.epochs} epochs of {bpe} batches of {cfg.batch} -> {out}")
    settings = run_settings(cfg, command="finetune", task="classify")
    result = _fit(hold, settings, cfg, out, overwrite, progress, dist, log, model, opt, batches, loop,
                  loss_fn=classify_loss, count_fn=count_rows, evaluate=evaluate)
    if not dist.is_main or result.interrupted:   # rank 0 writes the metrics of a finished run
        return RunResult(out, model, result)
    last = epoch_rows[-1]
    metrics = {"train_accuracy": last["train_accuracy"], "val_accuracy": last["val_accuracy"],
               "test_accuracy": last["test_accuracy"], "labels": names, "epochs": epoch_rows[1:],
               "before_training": epoch_rows[0], "args": settings}
    write_json(os.path.join(out, METRICS), metrics)
    return RunResult(out, model, result, metrics)


# ----------------------------------------------------------------------------- instruct
@takes(InstructConfig)
def finetune_instruct(*, out, overwrite: bool = False, progress: bool = True, dist=None, log=None,
                      **settings) -> RunResult:
    """Fine-tune a GPT to follow instructions into the run directory `out` (the book's chapter 7): the
    entries are split 85/10/5 (train/test/val, in file order); after training, the model's greedy
    responses to the test entries go to OUT/test-responses.json and the losses to OUT/metrics.json (the
    result's metrics; None when Ctrl-C or SIGTERM stopped the training early). `settings` are InstructConfig's
    fields; dist and log as in npgpt.train.pretrain."""
    cfg = InstructConfig(**settings)
    with contextlib.ExitStack() as hold:              # the run directory, once it is made, until the end
        return _instruct(cfg, os.fspath(out), overwrite, progress, dist, log, hold)


def _instruct(cfg: InstructConfig, out, overwrite, progress, dist, log, hold) -> RunResult:
    dist = _start(cfg, out, overwrite, dist, {"eval_every": 0, "eval_batches": 0, "max_new_tokens": 0})
    try:
        entries = read_entries(cfg.data)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {cfg.data}: {e}") from e
    if cfg.limit:
        entries = entries[:cfg.limit]
    train, test, val = split_entries(entries)
    if len(train) < cfg.batch:
        raise ValueError(f"--data {cfg.data}: {len(train)} training entries (85% of {len(entries)}) make no batch "
                         f"of {cfg.batch}; use more entries or a smaller --batch")
    model = _load(cfg, load_model, "instructions are")
    n_ctx = model.config.n_ctx
    max_length = min(cfg.max_length or n_ctx, n_ctx)
    setup_lora(model, cfg)                       # lora_rank: only the adapters train
    dist.broadcast_parameters(model)

    tok = get_tokenizer()

    def encode(split):
        pairs = [encode_entry(tok, e) for e in split]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    splits = {"train": encode(train), "val": encode(val), "test": encode(test)}
    truncated = sum(len(s) > max_length for s in splits["train"][0])   # cut: loses its end token
    batches = InstructBatches(*splits["train"], cfg.batch, max_length, cfg.mask_prompt, seed=cfg.seed)
    bpe = batches.batches_per_epoch
    evaluate = instruct_evaluator({"train": splits["train"], "val": splits["val"]}, cfg.batch, cfg.eval_batches,
                                  max_length, cfg.mask_prompt)
    loop = LoopConfig(steps=cfg.epochs * bpe, lr=cfg.lr, min_lr=cfg.lr, eval_every=cfg.eval_every, save_every=0)
    opt = _adamw(model, cfg, dist, betas=(0.9, 0.999))
    trainable = sum(p.data.size for p in model.parameters() if p.requires_grad)
    if dist.is_main:
        (log or _print)(f"npgpt finetune instruct: {len(train)} train / {len(test)} test / {len(val)} val entries"
                        f"{f' ({truncated} training entries cut at --max-length {max_length})' if truncated else ''}; "
                        f"{trainable / 1e6:.2f}M of {model.num_parameters() / 1e6:.2f}M parameters trainable; "
                        f"{cfg.epochs} epochs of {bpe} batches of {cfg.batch}"
                        f"{', prompt masked' if cfg.mask_prompt else ''} -> {out}")
    settings = run_settings(cfg, command="finetune", task="instruct")
    result = _fit(hold, settings, cfg, out, overwrite, progress, dist, log, model, opt, batches, loop,
                  loss_fn=lm_loss, count_fn=count_targets, evaluate=evaluate)
    if not dist.is_main or result.interrupted:   # rank 0 generates the test responses and writes
        return RunResult(out, model, result)

    from tqdm.auto import tqdm
    bar = tqdm(total=len(test), disable=not progress, desc="test responses", unit="entry")
    responses = generate_responses(model, tok, test, cfg.max_new_tokens, batch_size=cfg.batch,
                                   progress=lambda n: bar.update(n - bar.n))
    bar.close()
    write_json(os.path.join(out, RESPONSES), [{**e, "model_response": r} for e, r in zip(test, responses)], indent=4)
    test_loss = mean_loss(model, eval_batches(*splits["test"], cfg.batch, 0, max_length, cfg.mask_prompt))
    last = result.last_eval or {}
    metrics = {"train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"), "test_loss": test_loss,
               "steps": result.step, "entries": {"train": len(train), "test": len(test), "val": len(val)},
               "truncated_train_entries": truncated, "args": settings}
    write_json(os.path.join(out, METRICS), metrics)
    return RunResult(out, model, result, metrics)


# ----------------------------------------------------------------------------- what both tasks share
def _print(msg) -> None:
    print(msg, flush=True)


def _start(cfg: FinetuneConfig, out, overwrite: bool, dist, more_ints=None):
    """Check the settings both tasks share and `out` (nothing is written yet); the process's dist."""
    check_numbers(cfg, {"epochs": 1, "batch": 1, "max_length": 1, "limit": 1, "seed": 0, **(more_ints or {})},
                  ("lr", "weight_decay"))
    if not os.path.isfile(cfg.data):
        raise ValueError(f"--data {cfg.data}: no such file")
    check_out(out, overwrite=overwrite)
    dist = dist or distributed.init()            # one process, or this rank of `mpiexec -n K ...`
    if cfg.batch % dist.world_size:
        raise ValueError(f"--batch {cfg.batch} must be a multiple of the {dist.world_size} MPI processes")
    return dist


def _load(cfg: FinetuneConfig, load, reads: str):
    """load(cfg.init), a model (or a classifier's) whose vocabulary is GPT-2's BPE."""
    model = load_init(cfg.init, load)
    V = getattr(model, "gpt", model).config.n_vocab
    if V < GPT2_VOCAB:
        raise ValueError(f"--init {cfg.init}: its vocabulary has {V} tokens; {reads} GPT-2 BPE ({GPT2_VOCAB})")
    return model


def _fit(hold, settings, cfg, out, overwrite, progress, dist, log, model, opt, batches, loop, **fns):
    """Hold `out` as this run (rank 0) until `hold` closes, train, then save the LoRA adapter (rank 0)."""
    if dist.is_main:
        hold_out(hold, out, settings, overwrite=overwrite)
    result = fit(model, opt, batches, loop, run_dir=out, progress=progress, dist=dist, log=log, **fns)
    if dist.is_main:
        finish_lora(model, cfg, out, result.checkpoint)   # RUN/adapter; merge: the merged checkpoint
    return result


# ----------------------------------------------------------------------------- LoRA
def _adamw(model, cfg, dist, **betas):
    """AdamW over the trainable parameters, or with --shard-optimizer over several processes its ZeRO-1
    form (npgpt.optim.ShardedAdamW: each rank keeps and updates 1/N of it)."""
    if _sharded(cfg, dist):
        return ShardedAdamW(model, dist, lr=cfg.lr, weight_decay=cfg.weight_decay, **betas)
    return AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay, **betas)


def setup_lora(model, cfg, base=None):
    """Apply LoRA as cfg asks (its lora_rank, lora_alpha, lora_targets, seed, init): nothing without
    lora_rank (returns None), else apply_lora's trainable parameter count. ValueError on bad settings."""
    rank, alpha = getattr(cfg, "lora_rank", None), getattr(cfg, "lora_alpha", None)
    if rank is None:
        for name, v in (("lora_alpha", alpha), ("lora_targets", getattr(cfg, "lora_targets", None)),
                        ("merge", getattr(cfg, "merge", False) or None)):
            if v is not None:
                raise ValueError(f"--{name.replace('_', '-')} needs --lora-rank")
        return None
    try:
        check_rank(rank)
    except ValueError as e:
        raise ValueError(f"--lora-rank: {e}") from None
    alpha = float(rank) if alpha is None else alpha
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"--lora-alpha must be a finite number > 0, got {alpha}")
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] if cfg.lora_targets else None
    try:
        return apply_lora(model, rank, alpha, targets, seed=getattr(cfg, "seed", 0),
                          base=base if base is not None else getattr(cfg, "init", None))
    except ValueError as e:
        raise ValueError(f"--lora-rank: {e}") from e


def finish_lora(model, cfg, run_dir, checkpoint=None) -> None:
    """After training with lora_rank: the adapter alone into RUN/adapter (small, PEFT-readable); with
    merge, the adapters folded in and the run's checkpoint re-saved as a whole plain model (which no
    longer refers to its base)."""
    if getattr(cfg, "lora_rank", None) is None:
        return
    save_adapter(model, os.path.join(os.fspath(run_dir), "adapter"))
    if getattr(cfg, "merge", False):
        merge(model)
        if checkpoint is not None:
            rewrite_checkpoint(checkpoint, lambda copy: _as_merged(model, copy))   # in one atomic swap


def _as_merged(model, directory) -> None:
    """The whole merged model into npgpt's own copy of a LoRA checkpoint (rewrite_checkpoint's), in place
    of its adapter files and base_model.json: a merged checkpoint needs neither."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_REF):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))
    save_model(model, directory)
