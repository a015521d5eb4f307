"""The training loop, written once. Pretraining, fine-tuning and multi-process training all run
through `fit`; what differs between them is passed in:

    loss_fn(model, micro_batch, normalizer) -> float   forward + backward of one micro-batch: adds
                                                        d(loss)/d(param) into every .grad and returns
                                                        its share of the step's loss
    count_fn(batch) -> int                              how many targets the *global* batch holds
    evaluate(model) -> {"train_loss": .., ...}          run every eval_every updates (eval mode)
    sample(model) -> str                                text printed with each evaluation
    dist                                                rank, world size, gradient all-reduce

One update (`train_step`), with n = count_fn(global batch):

    grads = sum over micro-batches of d(sum of per-target losses)/d(param) / n
    loss  = sum over micro-batches of (sum of per-target losses) / n       (the batch's mean)
    norm  = ||grads||;  grads *= min(1, clip / norm)
    AdamW step at lr = lr_schedule(step)

Because every micro-batch divides by the same global n, batch 8 and batch 4 with grad_accum 2
(or 2 processes of batch 4) compute the same gradient.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import signals
from ..distributed import LocalDist
from ..optim import ShardedAdamW, clip_coef, grad_norm, lr_schedule
from ..layers.module import first_non_finite
from .run import Metrics, NonFiniteError, checkpoint_dir, jump_rngs, load_checkpoint_state, \
    open_run, plot_losses, rng_states, save_checkpoint, set_rng_states, write_settings


@dataclass
class LoopConfig:
    steps: int                      # updates in the whole run
    lr: float = 6e-4                # peak learning rate
    min_lr: float | None = None     # cosine floor (None: lr / 10)
    warmup: int = 0                 # linear warmup updates, then cosine decay to min_lr at `steps`
    clip: float = 1.0               # global gradient-norm clip; 0 = off (the norm is still measured)
    grad_accum: int = 1             # micro-batches per update
    eval_every: int = 0             # evaluate every this many updates (0: only after the last)
    sample_every: int = 0           # print a sample every this many updates (0: never)
    save_every: int = 0             # checkpoint every this many updates (0: only at the end)

    def __post_init__(self):
        for name in ("steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "sample_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "clip") + (("min_lr",) if self.min_lr is not None else ()):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number >= 0, got {v}")

    def lr_at(self, step: int) -> float:
        """The learning rate of update `step` (0-based)."""
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        return lr_schedule(step, self.lr, self.warmup, self.steps, min_lr)


def split_rows(batch: tuple, parts: int, index: int | None = None):
    """Cut every array of `batch` into `parts` equal, contiguous row blocks; all of them, or block `index`."""
    B = len(batch[0])
    if B % parts:
        raise ValueError(f"batch {B} does not split into {parts} equal parts")
    n = B // parts
    blocks = [tuple(a[i * n:(i + 1) * n] for a in batch) for i in range(parts)]
    return blocks if index is None else blocks[index]


def train_step(model, optimizer, batch, lr: float, *, loss_fn, count_fn, grad_accum: int = 1,
               clip: float = 1.0, dist=None) -> tuple:
    """One update on the global `batch` (a tuple of arrays, rows first). Returns (loss, grad_norm):
    the batch's mean loss before the update and the gradient norm before clipping."""
    dist = dist or LocalDist()
    n = max(count_fn(batch), 1)                             # targets in the global batch
    mine = split_rows(batch, dist.world_size, dist.rank)    # this process's contiguous rows
    params = model.parameters()                             # walked once a step (90 us at nanoGPT's shape)
    for p in params:
        p.zero_grad()                                       # model.zero_grad()
    loss = 0.0
    micros = split_rows(mine, grad_accum)
    for i, micro in enumerate(micros):
        # the last backward may start summing the gradients it finishes over the processes
        with dist.reduce_during_backward(model, optimizer) if i == len(micros) - 1 else contextlib.nullcontext():
            loss += loss_fn(model, micro, n)                # grads += d(sum of losses)/dparam / n
    dist.allreduce_grads(model, optimizer)                  # sum the processes' gradients (waits for those started)
    loss = dist.allreduce_sum(loss)
    sharded = isinstance(optimizer, ShardedAdamW)           # ZeRO-1: this rank holds its shard of the sum
    norm = math.sqrt(dist.allreduce_sum(optimizer.grad_sum_of_squares())) if sharded else grad_norm(params)
    if not (math.isfinite(loss) and math.isfinite(norm)):   # alike on every rank (both are reduced)
        raise NonFiniteError(_non_finite(model, loss, norm))  # before the update: the weights stay good
    optimizer.step(lr=lr, grad_scale=clip_coef(norm, clip if clip > 0 else math.inf))   # clipping inside the update
    if sharded:
        dist.allgather_shards(optimizer)                    # every rank's updated shard to every rank
    return loss, norm


def _non_finite(model, loss: float, norm: float) -> str:
    """What went non-finite in an update: the loss, the gradient norm, and the first parameter (or else
    the first gradient) holding a NaN or an infinity."""
    named = list(model.named_parameters())
    what = first_non_finite((name, p.data) for name, p in named)
    what = f"parameter {what}" if what else first_non_finite((name, p.grad) for name, p in named if p.has_grad)
    return f"the loss is {loss}, the gradient norm {norm}" + (f"; first non-finite: {what}" if what else "")


class _StopOnSignal:
    """The first Ctrl-C (SIGINT) or SIGTERM (a batch system's time limit or preemption, `kill`, `timeout`;
    MPICH's mpiexec forwards both to its ranks) asks the loop to stop after the update in progress (then it
    checkpoints); another one REPEAT_S seconds or more later interrupts at once. One sooner is the same
    request delivered twice (a scheduler signals every process of a job and mpiexec forwards it again)."""
    SIGNALS = ("SIGINT", "SIGTERM")    # _agree_on_stop knows these two
    REPEAT_S = 1.0

    def __init__(self):
        self.requested = None           # the name of the first signal, once one came
        self._at = None
        self._handling = None

    def __enter__(self):
        self._handling = signals.handling(self.SIGNALS, self._handle)
        self._handling.__enter__()
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self._at = name, time.monotonic()
        elif time.monotonic() - self._at >= self.REPEAT_S:
            raise KeyboardInterrupt
        elif name == "SIGTERM":
            self.requested = name           # a scheduler's SIGTERM beside a Ctrl-C: the stop names it

    def __exit__(self, *exc):
        if self._handling is not None:
            self._handling.__exit__(*exc)


def _agree_on_stop(requested: str | None, dist) -> str | None:
    """The stop every rank takes, from each rank's request (None, "SIGINT" or "SIGTERM"): none unless a rank
    asked; SIGTERM if any rank got it (a scheduler's), else SIGINT. One all-reduce of a number: 0, 1 or W + 1
    a rank."""
    if dist.world_size == 1:
        return requested
    W = dist.world_size
    votes = dist.allreduce_sum({None: 0.0, "SIGINT": 1.0, "SIGTERM": W + 1.0}[requested])
    return "SIGTERM" if votes > W else "SIGINT" if votes else None


@dataclass
class FitResult:
    step: int                       # updates done in all (including before a resume)
    interrupted: bool               # stopped early by Ctrl-C or SIGTERM (a checkpoint was written)
    last_eval: dict | None          # the last evaluation's row
    checkpoint: str | None          # the last checkpoint written
    signal: str | None = None       # what interrupted it: "SIGINT" or "SIGTERM" (on any rank)

    @property
    def exit_status(self) -> int:
        """A command's exit status for an interrupted run: 128 + the signal's number, as a shell reports a
        process the signal ended (130 for Ctrl-C, 143 for SIGTERM)."""
        return signals.exit_status(self.signal or "SIGINT")


def fit(model, optimizer, batches, config: LoopConfig, *, loss_fn, count_fn, evaluate=None, sample=None,
        run_dir=None, resume: bool = False, overwrite: bool = False, settings: dict | None = None,
        extra_files: dict | None = None, dist=None, progress: bool = True, log=None) -> FitResult:
    """Train `model` for config.steps updates on `batches` (an object with next() -> global batch
    tuple, state_dict() and load_state_dict(d)). With run_dir, write metrics.jsonl, loss.png and
    checkpoints there; resume=True continues from its checkpoint, bit for bit (config.steps may have
    grown since: the learning-rate schedule follows the new total). run_dir is held locked for the
    run (npgpt.train.run.open_run: a new run needs a new or empty directory, or overwrite=True).
    settings: the run's settings for run.json (a resume writes them once its checkpoint has loaded).

    An update whose loss or gradient norm is not finite, or a checkpoint whose weights would not be,
    raises NonFiniteError naming the step and what went non-finite; the last good checkpoint stays.

    Several processes (dist.world_size > 1): every rank calls fit with the same arguments and the
    same starting weights; only dist.is_main writes metrics and checkpoints, evaluates, samples and
    shows progress; resume loads the checkpoint on every rank. Dropout: rank r draws from its own
    stream (each Dropout generator jumped r times, PCG64 jumps of 2^127 draws: disjoint streams, and
    rank 0's is the single-process stream); checkpoints keep every rank's states ("rank_rngs"), so a
    resume with the same rank count continues bit for bit; with another count, ranks the checkpoint
    has no state for start from rank 0's state jumped r times."""
    dist = dist or LocalDist()
    held = open_run(run_dir, settings, resume=resume, overwrite=overwrite) if run_dir is not None and dist.is_main \
        else contextlib.nullcontext()
    with held, np.errstate(over="ignore", invalid="ignore"):    # a non-finite update is caught, by name, below
        return _fit(model, optimizer, batches, config, loss_fn, count_fn, evaluate, sample, run_dir, resume,
                    settings, extra_files, dist, progress, log)


def _fit(model, optimizer, batches, config, loss_fn, count_fn, evaluate, sample, run_dir, resume, settings,
         extra_files, dist, progress, log) -> FitResult:
    from tqdm.auto import tqdm
    main = dist.is_main
    log = log or (lambda msg: tqdm.write(msg))
    step, tokens = 0, 0
    metrics = None
    if resume:
        if run_dir is None:
            raise ValueError("resume needs a run directory")
        state = load_checkpoint_state(run_dir, model, optimizer)
        try:
            batches.load_state_dict(state["data"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{checkpoint_dir(run_dir)}: its data position does not load ({e})") from None
        step, tokens = state["step"], state["tokens"]
        if step > config.steps:
            raise ValueError(f"the run is at step {step}, past the {config.steps} updates asked for")
        saved = state.get("rank_rngs") or []
        if dist.world_size > 1 and 0 < dist.rank < len(saved):
            set_rng_states(model, saved[dist.rank])
        elif dist.rank:
            jump_rngs(model, dist.rank)
        if main:
            if settings is not None:
                write_settings(run_dir, settings)           # the resume's settings, now that its state loaded
            metrics = Metrics(run_dir, resume_step=step)
    else:
        if dist.rank:
            jump_rngs(model, dist.rank)                     # this rank's own dropout stream
        if run_dir is not None and main:
            metrics = Metrics(run_dir)
    last_eval, last_ckpt, last_saved = None, None, step if resume else None

    def run_eval():
        nonlocal last_eval
        model.eval()
        losses = evaluate(model)
        model.train()
        last_eval = {"step": step, **{k: float(v) for k, v in losses.items()}, "tokens": tokens}
        if metrics:
            metrics.write(last_eval)
            plot_losses(metrics.path, os.path.join(os.fspath(run_dir), "loss.png"))
        log(f"step {step:>6}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in losses.items()))

    def run_sample():
        model.eval()
        text = sample(model)
        model.train()
        log(f"step {step:>6} sample:\n{text}")

    def checkpoint():
        nonlocal last_ckpt, last_saved
        if run_dir is None:
            return
        gather = getattr(dist, "gather", None)
        all_rngs = gather(rng_states(model)) if dist.world_size > 1 and gather else None   # collective
        opt_state = optimizer.state_dict() if isinstance(optimizer, ShardedAdamW) else None   # collective
        last_saved = step                                   # on every rank: they decide alike below
        if not main:
            return
        state = {"step": step, "tokens": tokens, "data": batches.state_dict(), "rngs": rng_states(model),
                 "loop": asdict(config)}
        if all_rngs is not None:
            state["rank_rngs"] = all_rngs
        metrics.sync()                                      # the rows up to this step are on disk first
        try:
            last_ckpt = save_checkpoint(run_dir, model, optimizer, state, extra_files, optimizer_state=opt_state)
        except NonFiniteError as e:
            raise NonFiniteError(f"step {step}: {e} after the update, so it was not saved; {kept()}") from None
        last_saved = step

    def kept() -> str:
        good = checkpoint_dir(run_dir) if run_dir is not None else None
        return (f"the last good checkpoint, {good}, is left in place" if good else "no checkpoint was saved before") \
            + "; lower the learning rate"

    model.train()
    if not resume and evaluate is not None and config.eval_every and main:
        run_eval()                                          # the untrained model's loss, at step 0
    bar = tqdm(total=config.steps, initial=step, disable=not (progress and main), dynamic_ncols=True, unit="step")
    interrupted = None
    with _StopOnSignal() as stop:
        while step < config.steps:
            batch = batches.next()
            lr = config.lr_at(step)
            t0 = time.perf_counter()
            try:
                loss, norm = train_step(model, optimizer, batch, lr, loss_fn=loss_fn, count_fn=count_fn,
                                        grad_accum=config.grad_accum, clip=config.clip, dist=dist)
            except NonFiniteError as e:
                bar.close()
                raise NonFiniteError(f"step {step + 1}: {e}; the update was not applied; {kept()}") from None
            dt = time.perf_counter() - t0
            step += 1
            n_tokens = int(batch[0].size)
            tokens += n_tokens
            tok_s = n_tokens / dt if dt > 0 else float("nan")
            if metrics:
                metrics.write({"step": step, "loss": float(loss), "lr": lr, "grad_norm": float(norm),
                               "tokens_per_s": tok_s, "tokens": tokens})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            last = step == config.steps
            if evaluate is not None and main and (last or (config.eval_every and step % config.eval_every == 0)):
                run_eval()
            if sample is not None and main and config.sample_every and (last or step % config.sample_every == 0):
                run_sample()
            if last or (config.save_every and step % config.save_every == 0):
                checkpoint()
            requested = _agree_on_stop(stop.requested, dist)   # every rank stops at the same update
            if requested:
                interrupted = requested
                break
        bar.close()
        if interrupted and last_saved != step:
            checkpoint()                                   # still under the handlers: a duplicate signal waits
    if metrics:
        metrics.close()
    model.eval()
    return FitResult(step=step, interrupted=interrupted is not None, last_eval=last_eval, checkpoint=last_ckpt,
                     signal=interrupted)
