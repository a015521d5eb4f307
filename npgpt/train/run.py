"""A run directory: what a training run writes, and what --resume reads back.

    DIR/run.json            marks DIR as an npgpt run ("npgpt_run"), and the run's settings
    DIR/.npgpt.lock         held (flock) by the one process that trains in DIR; holds its pid
    DIR/metrics.jsonl       one JSON row per update, and one per evaluation
    DIR/loss.png            train and validation loss against step and tokens seen
    DIR/config.json, DIR/model.safetensors, DIR/vocab.json, ...   what Hugging Face's tools read (the
                            first two are links into DIR/checkpoint/): from_pretrained(DIR) opens the run
    DIR/checkpoint -> ckpt-000120/    the newest complete checkpoint (a symlink, swapped atomically)
        config.json, model.safetensors    the model (Hugging Face layout: from_pretrained(DIR) loads it)
        optimizer.safetensors             AdamW's step count and both moments
        trainer.json                      step, tokens seen, data position, every RNG state
        npgpt_tokenizer.json, ...         the tokenizer: npgpt's record, and the files Hugging Face reads
        base_model.json                   (a LoRA run: adapter files instead of model.safetensors) its base

A checkpoint is written whole into a temporary directory, fsynced, renamed to ckpt-STEP, and only
then does the `checkpoint` link move to it (os.replace of a link is atomic). A kill at any moment
therefore leaves `checkpoint` pointing at a complete checkpoint, old or new. A checkpoint whose
weights or optimizer moments are not all finite is never written (NonFiniteError), so the last good
one stays. Older checkpoints are removed only in a marked run directory, and only entries npgpt
names itself (`ckpt-` and digits, holding a trainer.json): nothing else in DIR is ever touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from ..io.atomic import atomic_write, fsync_dir, write_bytes, write_json
from ..io.safetensors import read_safetensors, save_safetensors
from ..layers.dropout import Dropout
from ..layers.module import first_non_finite

CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer.json"
OPTIMIZER = "optimizer.safetensors"
RUN_FILE = "run.json"
LOCK_FILE = ".npgpt.lock"
METRICS = "metrics.jsonl"
RUN_MARK = "npgpt_run"                          # run.json's key that says npgpt made this directory a run
_CKPT_NAME = re.compile(r"ckpt-[0-9]+")         # what save_checkpoint names a checkpoint
_CKPT_TMP_NAME = re.compile(r"\.ckpt-[0-9]+\..+\.tmp")   # and its temporary directory while writing
_LINK_TMP_NAME = re.compile(r"\.checkpoint\.[0-9]+\.link")


def checkpoint_dir(run_dir) -> str | None:
    """The run's newest complete checkpoint directory, or None."""
    link = os.path.join(os.fspath(run_dir), CHECKPOINT)
    path = os.path.realpath(link)
    return path if os.path.isfile(os.path.join(path, TRAINER_STATE)) else None


def is_run_dir(path) -> bool:
    """Whether npgpt made `path` a run directory: its run.json carries the run mark (or, written before
    the mark existed, the `npgpt train` settings)."""
    try:
        with open(os.path.join(os.fspath(path), RUN_FILE), encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and (RUN_MARK in settings or settings.get("command") == "train")


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- opening a run
class RunDirError(ValueError):
    """A run directory that cannot be used as asked (one line for the user)."""


def _entries(run_dir) -> list:
    """DIR's entries, less the lock file (which a refused or finished run may leave behind)."""
    try:
        return [n for n in os.listdir(run_dir) if n != LOCK_FILE]
    except FileNotFoundError:
        return []


def check_run_dir(run_dir, *, resume: bool = False, overwrite: bool = False) -> None:
    """What `fit` will do with run_dir, checked before anything is read or written (RunDirError):
    a resume needs a run with a checkpoint; a new run needs a new or empty directory, or --overwrite
    (which replaces a previous run's files, or writes beside files that are not a run's)."""
    run_dir = os.fspath(run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} is a file, not a directory")
    if resume:
        if checkpoint_dir(run_dir) is None:
            raise RunDirError(f"{run_dir}: no checkpoint to resume from (no {os.path.join(run_dir, CHECKPOINT)}); "
                              f"start the run without --resume")
        if not is_run_dir(run_dir):
            raise RunDirError(f"{os.path.join(run_dir, RUN_FILE)} is missing or damaged, so {run_dir} is not known "
                              f"as an npgpt run and cannot be resumed")
        return
    if overwrite or not _entries(run_dir):
        return
    if is_run_dir(run_dir) and checkpoint_dir(run_dir) is None:
        return                                    # a run that stopped before its first checkpoint starts again
    if is_run_dir(run_dir):
        raise RunDirError(f"{run_dir} already holds a run; continue it with --resume, or start it again with "
                          f"--overwrite, or choose another --out")
    raise RunDirError(f"{run_dir} is not empty and is not an npgpt run; choose a new or empty directory, or "
                      f"--overwrite to write npgpt's files beside what is there")


_held: dict = {}                                  # the runs this process holds: realpath -> lock descriptor


@contextlib.contextmanager
def open_run(run_dir, settings: dict | None = None, *, resume: bool = False, overwrite: bool = False):
    """Hold run_dir as this process's run for the body: take its lock, check it again (another process
    may have written since check_run_dir), clear a previous run's files on --overwrite, and write
    run.json (the mark and `settings`) for a new run; a resume's new settings are written by fit once the
    checkpoint has loaded (write_settings), so a damaged checkpoint leaves run.json as it was.

    The lock is an exclusive flock on DIR/.npgpt.lock, which holds the holder's pid: a second process
    gets RunDirError naming it. Opening a run this process already holds does nothing (the command
    line opens the run with its settings, then `fit` opens it again)."""
    run_dir = os.fspath(run_dir)
    key = os.path.realpath(run_dir)
    if key in _held:
        yield
        return
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)     # before the directory is made
    os.makedirs(run_dir, exist_ok=True)
    fd = _lock(run_dir)
    _held[key] = fd
    try:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if overwrite and not resume and is_run_dir(run_dir):
            _remove_run_files(run_dir)
        if not resume:
            write_settings(run_dir, settings)
        yield
    finally:
        del _held[key]
        if fd is not None:
            os.close(fd)                          # closing the descriptor releases the flock


def write_settings(run_dir, settings: dict | None) -> None:
    """run.json: the run mark and the run's settings, atomically."""
    write_json(os.path.join(os.fspath(run_dir), RUN_FILE), {RUN_MARK: 1, **(settings or {})})


def _lock(run_dir) -> int | None:
    """An exclusive, non-blocking flock on DIR/.npgpt.lock with this pid written in it; the descriptor."""
    try:
        import fcntl
    except ImportError:                           # pragma: no cover - not POSIX: no lock
        return None
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:                          # ELOOP: a link where npgpt's lock file goes
        raise RunDirError(f"{path} is not npgpt's lock file ({e.strerror}); npgpt does not follow links in a "
                          f"run directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by another npgpt run (pid {holder}); wait for it to end or "
                          f"choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


def _remove_run_files(run_dir) -> None:
    """A previous run's files, before --overwrite starts a new one there: its checkpoints, the link,
    the metrics and the plot. Only names npgpt writes."""
    for name in (CHECKPOINT, *HF_MODEL_FILES):
        link = os.path.join(run_dir, name)
        if os.path.islink(link):
            os.remove(link)
    _rotate(run_dir, keep=None)
    for name in (METRICS, "loss.png"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


# ----------------------------------------------------------------------------- RNG states
def dropout_rngs(model) -> list:
    """Every Dropout layer's generator, in module order (the order is fixed by the model's structure)."""
    return [m.rng for m in model.modules() if isinstance(m, Dropout)]


def rng_states(model) -> list:
    return [g.bit_generator.state for g in dropout_rngs(model)]


def set_rng_states(model, states: list) -> None:
    gens = dropout_rngs(model)
    if len(gens) != len(states):
        raise ValueError(f"checkpoint has {len(states)} dropout RNG states, the model has {len(gens)} dropout layers")
    for g, s in zip(gens, states):
        g.bit_generator.state = s


def jump_rngs(model, n: int) -> None:
    """Move every dropout generator to its n-th disjoint stream (PCG64.jumped(n): 2^127 * n draws ahead).
    A rank r of a multi-process run does this once, so ranks never draw the same masks."""
    if n:
        for m in model.modules():
            if isinstance(m, Dropout):
                m.rng = np.random.Generator(m.rng.bit_generator.jumped(n))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir, model, optimizer, trainer_state: dict, extra_files: dict | None = None,
                    optimizer_state: dict | None = None) -> str:
    """Write model + optimizer + trainer state as DIR/ckpt-STEP and point DIR/checkpoint at it.
    extra_files: {name: bytes} written beside them (a tokenizer). optimizer_state: the optimizer's
    state_dict() when the caller already has it (a ShardedAdamW's is gathered by every rank at once);
    None: asked here. Returns the checkpoint directory."""
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    step = int(trainer_state["step"])
    final = os.path.join(run_dir, f"ckpt-{step:06d}")
    link = os.path.join(run_dir, CHECKPOINT)
    for path, ours in ((final, _is_checkpoint(final)), (link, os.path.islink(link))):
        if os.path.lexists(path) and not ours:
            raise RunDirError(f"{path} exists and is not npgpt's; npgpt will not replace it (move it away)")
    opt = optimizer.state_dict() if optimizer_state is None else optimizer_state
    check_finite(model, opt)
    tmp = tempfile.mkdtemp(dir=run_dir, prefix=f".ckpt-{step:06d}.", suffix=".tmp")
    try:
        from ..io.pretrained import save_model_files
        save_model_files(model, os.path.join(tmp, "model"))     # the model, or a LoRA model's adapters, fsynced
        for name in os.listdir(os.path.join(tmp, "model")):
            os.rename(os.path.join(tmp, "model", name), os.path.join(tmp, name))
        os.rmdir(os.path.join(tmp, "model"))
        save_safetensors(os.path.join(tmp, OPTIMIZER), {k: np.asarray(v) for k, v in opt.items()},
                         {"format": "npgpt-adamw"})
        for name, data in (extra_files or {}).items():
            write_bytes(os.path.join(tmp, name), data)
        write_json(os.path.join(tmp, TRAINER_STATE), trainer_state)   # written last: marks the checkpoint complete
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        if not (os.path.lexists(final) and _exchange(tmp, final)):   # a checkpoint of the same step: swapped
            if os.path.lexists(final):                         # whole (the old one is left in tmp), or,
                shutil.rmtree(final)                           # without the swap, replaced (npgpt's own: checked)
            os.rename(tmp, final)
        link_tmp = os.path.join(run_dir, f".{CHECKPOINT}.{step:06d}.link")
        if os.path.lexists(link_tmp):
            os.remove(link_tmp)
        os.symlink(os.path.basename(final), link_tmp)
        os.replace(link_tmp, link)                             # the atomic switch
        fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if is_run_dir(run_dir):
        _rotate(run_dir, keep=final)
        _link_model_files(run_dir, final)
    return final


HF_MODEL_FILES = ("config.json", "model.safetensors")   # what Hugging Face's from_pretrained(DIR) reads


def _link_model_files(run_dir, checkpoint) -> None:
    """DIR/config.json and DIR/model.safetensors as links into DIR/checkpoint/, so that Hugging Face's tools
    open the run directory itself (with the tokenizer files beside them) and always see its newest
    checkpoint. Made once; a file of that name that is not a link is left alone."""
    for name in HF_MODEL_FILES:
        top = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(checkpoint, name)) and not os.path.lexists(top):
            os.symlink(os.path.join(CHECKPOINT, name), top)


def rewrite_checkpoint(path, write) -> None:
    """Give the checkpoint directory `path` new content in one atomic step: a copy of its files is made
    beside it, write(copy) changes the copy, and the two directories swap in one rename (renameat2's
    RENAME_EXCHANGE, Linux). A kill before the swap leaves the old checkpoint whole, after it the new;
    the old copy is then removed. Where the swap is not available, the old directory is moved aside
    and the new one renamed in (two renames: not atomic)."""
    path = os.fspath(path)
    run_dir, name = os.path.split(path)
    tmp = tempfile.mkdtemp(dir=run_dir, prefix=f".{name}.", suffix=".tmp")     # _rotate removes leftovers
    try:
        for entry in os.listdir(path):
            src = os.path.join(path, entry)
            if os.path.isfile(src) and not os.path.islink(src):
                shutil.copy2(src, os.path.join(tmp, entry))
        write(tmp)
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        if not _exchange(tmp, path):
            aside = tmp + ".old"
            os.rename(path, aside)
            os.rename(tmp, path)
            tmp = aside
        fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a, b) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _is_checkpoint(path) -> bool:
    """A checkpoint npgpt wrote: a directory (not a link) named ckpt-DIGITS that holds a trainer.json."""
    return (bool(_CKPT_NAME.fullmatch(os.path.basename(path))) and not os.path.islink(path)
            and os.path.isfile(os.path.join(path, TRAINER_STATE)))


def _rotate(run_dir, keep) -> None:
    """Remove the checkpoints npgpt wrote in run_dir other than `keep`, and the leftovers of killed
    writes (.ckpt-DIGITS.*.tmp directories). Links are never followed; no other name is touched."""
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if path == keep or os.path.islink(path):
            continue
        if _is_checkpoint(path) or (_CKPT_TMP_NAME.fullmatch(name) and os.path.isdir(path)):
            shutil.rmtree(path, ignore_errors=True)
        elif _LINK_TMP_NAME.fullmatch(name):
            os.remove(path)


class NonFiniteError(FloatingPointError):
    """Training went non-finite (a loss, the gradient norm, or a parameter); nothing was saved."""


def check_finite(model, optimizer_state: dict) -> None:
    """NonFiniteError unless every parameter and every optimizer moment is finite (checked before a
    checkpoint is written: a checkpoint of NaN weights would replace the last good one)."""
    bad = first_non_finite((name, p.data) for name, p in model.named_parameters())
    if bad is None:
        bad = first_non_finite((f"the optimizer's {k}", v) for k, v in optimizer_state.items())
    if bad is not None:
        raise NonFiniteError(f"{bad} is not finite")


def read_trainer_state(path) -> dict:
    """A checkpoint's trainer.json, checked for what a resume uses: ValueError naming the file."""
    try:
        state = read_json(path)
    except (OSError, ValueError) as e:               # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a JSON object")
    for key in ("step", "tokens"):
        v = state.get(key)
        if type(v) is not int or v < 0:
            raise ValueError(f"{path}: '{key}' must be a whole number >= 0, got {v!r}")
    for key, kind in (("data", dict), ("rngs", list), ("rank_rngs", list)):
        if not isinstance(state.get(key, kind()), kind):
            raise ValueError(f"{path}: '{key}' must be a JSON {'object' if kind is dict else 'list'}")
    return state


def load_checkpoint_state(run_dir, model, optimizer) -> dict:
    """Load the newest checkpoint's weights, optimizer moments and RNG states into model and
    optimizer (same shapes); returns the trainer state dict. A damaged file: ValueError naming it."""
    path = checkpoint_dir(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (no {os.path.join(run_dir, CHECKPOINT)})")
    state = read_trainer_state(os.path.join(path, TRAINER_STATE))
    from ..io.pretrained import load_model_weights
    load_model_weights(model, path)                             # the weights, or a LoRA model's adapters
    opt_path = os.path.join(path, OPTIMIZER)
    try:
        opt, _ = read_safetensors(opt_path)       # mapped: each rank of a ShardedAdamW copies only its shard
        optimizer.load_state_dict(opt)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{opt_path}: {e}") from None
    try:
        set_rng_states(model, state["rngs"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{os.path.join(path, TRAINER_STATE)}: its dropout RNG states do not load ({e})") from None
    return state


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """DIR/metrics.jsonl: rows appended and flushed as they happen, and fsynced with every checkpoint.
    Resuming from the checkpoint of step S first rewrites the file (atomically) with the rows of
    steps <= S it holds: rows a killed run wrote after its checkpoint go, and a shortened, damaged or
    missing file loses only the rows it lost."""

    def __init__(self, run_dir, resume_step: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(os.fspath(run_dir), METRICS)
        if resume_step is not None:
            rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step] \
                if os.path.isfile(self.path) else []
            with atomic_write(self.path) as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
        mode = os.O_TRUNC if resume_step is None else os.O_APPEND
        try:                                      # a link named metrics.jsonl is never written through
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | mode, 0o644)
        except OSError as e:
            raise RunDirError(f"{self.path} is not npgpt's metrics file ({e.strerror})") from None
        self.f = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def sync(self) -> None:
        """Make every row written so far durable (before a checkpoint that counts on them)."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def read_metrics(path) -> list:
    """The rows of a metrics.jsonl: JSON objects with a whole-number "step". A line that is not one
    (cut short by a crash, NUL bytes after a power cut) is skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and type(row.get("step")) is int:
                rows.append(row)
    return rows


def plot_losses(metrics_path, out_png) -> str | None:
    """loss.png: per-update train loss, and the evaluations' train and validation loss, against
    step (bottom axis) and tokens seen (top axis). Matplotlib is imported only here."""
    rows = read_metrics(metrics_path)
    number = (int, float)
    steps = [r for r in rows if isinstance(r.get("loss"), number)]
    evals = [r for r in rows if isinstance(r.get("val_loss"), number) and isinstance(r.get("train_loss"), number)]
    if not steps and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.45, label="train (each update)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", ms=3, label="train (eval)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    tokens_per_step = next((r["tokens"] / r["step"] for r in steps + evals
                            if r["step"] > 0 and isinstance(r.get("tokens"), number) and r["tokens"] > 0), None)
    if tokens_per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    with atomic_write(out_png) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out_png
