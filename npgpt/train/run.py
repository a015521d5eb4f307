"""A run directory: what a training run writes, and what --resume reads back.

    DIR/run.json            the run's settings (the command's arguments)
    DIR/metrics.jsonl       one JSON row per update, and one per evaluation
    DIR/loss.png            train and validation loss against step and tokens seen
    DIR/checkpoint -> ckpt-000120/    the newest complete checkpoint (a symlink, swapped atomically)
        config.json, model.safetensors    the model (Hugging Face layout: from_pretrained(DIR) loads it)
        optimizer.safetensors             AdamW's step count and both moments
        trainer.json                      step, tokens seen, data position, every RNG state, metrics length
        tokenizer.json                    (character-level runs) the vocabulary

A checkpoint is written whole into a temporary directory, fsynced, renamed to ckpt-STEP, and only
then does the `checkpoint` link move to it (os.replace of a link is atomic). A kill at any moment
therefore leaves `checkpoint` pointing at a complete checkpoint, old or new.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ..checkpoint.safetensors import _fsync_dir, atomic_write, read_safetensors, save_safetensors
from ..layers.dropout import Dropout

CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer.json"
OPTIMIZER = "optimizer.safetensors"


def checkpoint_dir(run_dir) -> str | None:
    """The run's newest complete checkpoint directory, or None."""
    link = os.path.join(os.fspath(run_dir), CHECKPOINT)
    path = os.path.realpath(link)
    return path if os.path.isfile(os.path.join(path, TRAINER_STATE)) else None


def is_run_dir(path) -> bool:
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, CHECKPOINT))


def write_json(path, obj) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
def save_checkpoint(run_dir, model, optimizer, trainer_state: dict, extra_files: dict | None = None) -> str:
    """Write model + optimizer + trainer state as DIR/ckpt-STEP and point DIR/checkpoint at it.
    extra_files: {name: bytes} written beside them (a tokenizer). Returns the checkpoint directory."""
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    step = int(trainer_state["step"])
    final = os.path.join(run_dir, f"ckpt-{step:06d}")
    tmp = tempfile.mkdtemp(dir=run_dir, prefix=f".ckpt-{step:06d}.", suffix=".tmp")
    try:
        model.save(os.path.join(tmp, "model"))                  # config.json + model.safetensors, fsynced
        for name in os.listdir(os.path.join(tmp, "model")):
            os.rename(os.path.join(tmp, "model", name), os.path.join(tmp, name))
        os.rmdir(os.path.join(tmp, "model"))
        opt = optimizer.state_dict()
        save_safetensors(os.path.join(tmp, OPTIMIZER), {k: np.asarray(v) for k, v in opt.items()},
                         {"format": "npgpt-adamw"})
        for name, data in (extra_files or {}).items():
            with atomic_write(os.path.join(tmp, name)) as f:
                f.write(data)
        write_json(os.path.join(tmp, TRAINER_STATE), trainer_state)   # written last: marks the checkpoint complete
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        if os.path.lexists(final):                             # a checkpoint of the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        link_tmp = os.path.join(run_dir, f".{CHECKPOINT}.{step:06d}.link")
        if os.path.lexists(link_tmp):
            os.remove(link_tmp)
        os.symlink(os.path.basename(final), link_tmp)
        os.replace(link_tmp, os.path.join(run_dir, CHECKPOINT))   # the atomic switch
        _fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in os.listdir(run_dir):                           # older checkpoints and leftovers of killed writes
        path = os.path.join(run_dir, name)
        if (name.startswith("ckpt-") and path != final) or (name.startswith(".ckpt-") and name.endswith(".tmp")):
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint_state(run_dir, model, optimizer) -> dict:
    """Load the newest checkpoint's weights, optimizer moments and RNG states into model and
    optimizer (same shapes); returns the trainer state dict."""
    path = checkpoint_dir(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (no {os.path.join(run_dir, CHECKPOINT)})")
    from ..checkpoint import load_checkpoint
    _, weights = load_checkpoint(path)
    model.load_state_dict(weights)
    opt, _ = read_safetensors(os.path.join(path, OPTIMIZER), mmap=False)
    optimizer.load_state_dict(opt)
    state = read_json(os.path.join(path, TRAINER_STATE))
    set_rng_states(model, state["rngs"])
    return state


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """DIR/metrics.jsonl: rows appended and flushed as they happen. On resume the file is cut back
    to its length at the checkpoint, so rows written after it (by a killed run) are not doubled."""

    def __init__(self, run_dir, resume_bytes: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(os.fspath(run_dir), "metrics.jsonl")
        if resume_bytes is None:
            self.f = open(self.path, "w", encoding="utf-8")
        else:
            self.f = open(self.path, "r+", encoding="utf-8") if os.path.exists(self.path) else \
                open(self.path, "w", encoding="utf-8")
            self.f.truncate(resume_bytes)
            self.f.seek(resume_bytes)

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def close(self):
        self.f.close()


def read_metrics(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path, out_png) -> str | None:
    """loss.png: per-update train loss, and the evaluations' train and validation loss, against
    step (bottom axis) and tokens seen (top axis). Matplotlib is imported only here."""
    rows = read_metrics(metrics_path)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
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
    tokens_per_step = next((r["tokens"] / r["step"] for r in steps + evals if r.get("step") and r.get("tokens")), None)
    if tokens_per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    with atomic_write(out_png) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out_png
