"""Every file npgpt reads or writes.

    pretrained.py    load_model / save_model: the one module that knows every format (and imports the model)
    safetensors.py   safetensors; Hugging Face GPT-2 checkpoints          tf_bundle.py, crc32c.py  OpenAI's TF ones
    quantized.py     16- and 8-bit checkpoints                           peft.py   LoRA adapters (PEFT's layout)
    download.py      OpenAI's released files, pinned and converted once  layout.py GPT-2's names and shapes
    atomic.py        writing a file whole or not at all

This package's own functions (below) return ``(GPTConfig, state_dict)`` where the state dict maps
Hugging Face GPT-2 names (``transformer.wte.weight``, ``transformer.h.0.attn.c_attn.weight``, ...) to
float32 (or float64, as stored) NumPy arrays in Hugging Face layouts (see ``layout.py``). Only
pretrained.py builds a model from them; nothing is ever unpickled.
"""
from __future__ import annotations

import os

from ..config import MODEL_NAMES

from .download import DownloadError, cache_dir, canonical_name, download_file, ensure_downloaded, is_model_name
from .layout import check_state_dict, hf_param_shapes, openai_param_map
from .safetensors import load_hf_checkpoint, read_safetensors, save_hf_checkpoint, save_safetensors
from .tf_bundle import load_tf_checkpoint

__all__ = [
    "load_checkpoint", "load_tf_checkpoint", "load_hf_checkpoint", "save_hf_checkpoint",
    "ensure_downloaded", "cache_dir", "canonical_name", "is_model_name", "download_file", "DownloadError", "read_safetensors",
    "save_safetensors", "hf_param_shapes", "openai_param_map", "check_state_dict", "detect_format",
]


def detect_format(path) -> str:
    """'hf' or 'tf' for an existing path; FileNotFoundError / ValueError otherwise."""
    path = resolve_run_dir(os.fspath(path))
    if os.path.isdir(path):
        entries = os.listdir(path)
        if ("model.safetensors" in entries or "model.safetensors.index.json" in entries
                or ("config.json" in entries and "hparams.json" not in entries)):
            return "hf"
        if "hparams.json" in entries or any(e.endswith(".index") for e in entries):
            return "tf"
        raise ValueError(f"{path}: not a checkpoint directory: expected config.json + model.safetensors "
                         f"(Hugging Face) or hparams.json + model.ckpt.index/.data-* (OpenAI TensorFlow)")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "hf"
        if path.endswith(".index") or ".data-" in os.path.basename(path):
            return "tf"
        raise ValueError(f"{path}: unknown checkpoint format (expected a .safetensors file, a TensorFlow "
                         f".index file or checkpoint prefix, or a directory)")
    if os.path.isfile(path + ".index"):
        return "tf"
    raise FileNotFoundError(f"checkpoint path {path} does not exist (nor is it a model name: {MODEL_NAMES})")


def resolve_run_dir(path: str) -> str:
    """A training run directory (npgpt train --out DIR) stands for its newest checkpoint, DIR/checkpoint."""
    inner = os.path.join(path, "checkpoint")
    if os.path.isdir(path) and os.path.isfile(os.path.join(inner, "config.json")):
        return inner
    return path


def load_checkpoint(path_or_name, verify: bool = False, writable: bool = False) -> tuple:
    """Load a checkpoint -> (GPTConfig, state_dict).

    ``path_or_name``: a training run directory (its newest checkpoint), a directory (Hugging Face: config.json + model.safetensors;
    OpenAI: hparams.json + model.ckpt.*), a ``.safetensors`` file, a TensorFlow
    ``.index`` file or checkpoint prefix, or a model name (gpt2, gpt2-medium,
    gpt2-large, gpt2-xl, 124M, 355M, 774M, 1558M) which is downloaded and
    converted once (see ``ensure_downloaded``).  An existing path wins over a
    name.  ``verify`` checks the CRC-32C of TensorFlow tensors.  ``writable``
    maps the weights copy-on-write, so the arrays can become a model's parameters
    with no copy (pages are read from the file when first used).
    """
    p = resolve_run_dir(os.fspath(path_or_name))
    if not os.path.exists(p) and not os.path.exists(p + ".index") and is_model_name(p):
        return load_hf_checkpoint(ensure_downloaded(p), writable=writable)
    fmt = detect_format(p)
    if fmt == "hf":
        return load_hf_checkpoint(p, writable=writable)
    return load_tf_checkpoint(p, verify=verify, writable=writable)
