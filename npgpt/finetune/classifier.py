"""A GPT-2 text classifier (the book's chapter 6): the GPT body, then a Linear head on each row's
last real token.

    hidden = gpt.forward_hidden(ids)                      (B, T, C)   final layernorm's output
    logits = head(hidden[b, lengths[b] - 1])              (B, K)      K classes

Batches are padded on the right; lengths (B,) holds each row's count of real tokens. A saved
classifier is a directory: the GPT in Hugging Face layout (config.json, model.safetensors; it
loads with npgpt.load_model), plus classifier.safetensors (head.weight, head.bias) and
classifier.json (the label names). A LoRA run's checkpoint holds the head and the adapters, and refers
to the base GPT instead of copying it (npgpt.io.pretrained.save_model_files).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..layers import LastTokenHead, Module
from ..io.pretrained import load_model, save_model
from ..model import GPT

HEAD_FILE = "classifier.safetensors"
LABELS_FILE = "classifier.json"


class Classifier(Module):
    def __init__(self, gpt: GPT, labels, seed=None, init: bool = True):
        labels = [str(x) for x in labels]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classifier needs at least two distinct labels, got {labels}")
        self.gpt, self.labels = gpt, labels
        rng = np.random.default_rng(seed) if init else None
        self.head = LastTokenHead(gpt.config.n_embd, len(labels), dtype=gpt.dtype, rng=rng)   # weight (C, K)

    @property
    def dtype(self):
        return self.gpt.dtype

    def forward(self, ids, lengths):
        hidden = self.gpt.forward_hidden(ids)                 # (B, T, C)
        return self.head(hidden, lengths)                     # (B, K)

    def backward(self, dlogits):
        dlogits = np.asarray(dlogits, dtype=self.dtype)
        # logits = head(hidden at the last real tokens)
        dhidden = self.head.backward(dlogits)                 # (B, T, C), zero off the last real tokens
        # hidden = gpt.forward_hidden(ids)
        self.gpt.backward_hidden(dhidden)

    def set_trainable(self, blocks: int | None = None):
        """Freeze everything but the last `blocks` transformer blocks, the final layernorm and the head
        (None: everything trainable). Build the optimizer afterwards."""
        L = len(self.gpt.h)
        if blocks is None:
            return self.requires_grad_(True)
        if not 0 <= blocks <= L:
            raise ValueError(f"trainable blocks must be in [0, {L}], got {blocks}")
        self.requires_grad_(False)
        for m in self.gpt.h[L - blocks:] + [self.gpt.ln_f, self.head]:
            m.requires_grad_(True)
        return self

    # ----------------------------------------------------------------- saving and loading
    def save(self, directory) -> str:
        """config.json + model.safetensors (the GPT) and classifier.safetensors + classifier.json."""
        directory = os.fspath(directory)
        save_model(self.gpt, directory)
        return self.save_head(directory)

    def save_head(self, directory) -> str:
        """classifier.safetensors (head.weight, head.bias) + classifier.json (the labels) into `directory`."""
        from ..io.atomic import write_json
        from ..io.safetensors import save_safetensors
        directory = os.fspath(directory)
        save_safetensors(os.path.join(directory, HEAD_FILE),
                         {"head.weight": self.head.weight.data, "head.bias": self.head.bias.data},
                         {"format": "npgpt-classifier"})
        write_json(os.path.join(directory, LABELS_FILE), {"labels": self.labels})
        return directory

    def load_head(self, directory) -> "Classifier":
        """Copy in the head save_head wrote (its labels must be this classifier's)."""
        labels, head = _read_head(os.fspath(directory))
        if labels != self.labels:
            raise ValueError(f"{directory}: the saved head is for labels {labels}, this classifier's are {self.labels}")
        self.head.load_state_dict(head)
        return self

    @classmethod
    def load(cls, path, dtype=np.float32, weights=None) -> "Classifier":
        """A directory written by save(), or a `npgpt finetune classify` run directory (its checkpoint).
        weights="bf16" | "int8" packs the transformer's weights for inference (npgpt.load_model); the
        small head stays in float32."""
        from ..io import resolve_run_dir
        path = resolve_run_dir(os.fspath(path))
        labels, head = _read_head(path)
        model = cls(load_model(path, dtype=dtype, weights=weights), labels, init=False)
        model.head.load_state_dict(head)
        return model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path, labels, dtype=np.float32, seed=None) -> "Classifier":
        """A new head (random, seeded) on a pretrained GPT: a model name, checkpoint or run directory."""
        return cls(load_model(name_or_path, dtype=dtype), labels, seed=seed)


def _read_head(path) -> tuple:
    """(labels, {"weight", "bias"}) of the head saved in directory `path`."""
    from ..io.safetensors import read_safetensors
    head_path, labels_path = os.path.join(path, HEAD_FILE), os.path.join(path, LABELS_FILE)
    for p in (head_path, labels_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path} is not a saved classifier (no {os.path.basename(p)})")
    with open(labels_path, encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    head, _ = read_safetensors(head_path, mmap=False)
    return labels, {"weight": head["head.weight"], "bias": head["head.bias"]}
