"""Loading and saving models: the one module that knows every format npgpt reads and writes.

    load_model("gpt2")                  OpenAI's GPT-2 by name (downloaded once into $NPGPT_HOME)
    load_model(path)                    a Hugging Face directory or .safetensors file, OpenAI's TensorFlow
                                        checkpoint, an npgpt run directory (its newest checkpoint), a
                                        quantized save (memory-mapped), a save holding a LoRA adapter, or
                                        a LoRA run's checkpoint that refers to its base
    load_model(path, weights="int8")    packed for inference (npgpt.inference.quant)
    save_model(model, directory)        config.json + model.safetensors (Hugging Face's GPT-2 layout), or
                                        the packed weights, or the base weights plus the adapter files

Layers and the model never touch files: these are free functions over any GPT (tinygrad's nn/state.py
is the model for this).
"""
from __future__ import annotations

import os

import numpy as np

from ..inference import quant
from ..layers.lora import _base_params, _body, lora_layers, merge
from ..model import GPT
from . import load_checkpoint, save_hf_checkpoint
from .atomic import write_json
from .peft import (BASE_REF, _base_location, _refers_to_base, adapter_dir, base_fingerprint, base_of, load_adapter,
                   save_adapter, save_with_adapter)
from .quantized import checkpoint_kind, load_quantized, save_quantized
from .safetensors import hf_config_dict


def load_model(name_or_path, dtype=np.float32, verify: bool = False, weights=None) -> GPT:
    """Load OpenAI's GPT-2 by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; 124M ... 1558M: downloaded
    once into $NPGPT_HOME), or a path (see the module docstring). verify=True also checks TensorFlow
    CRC-32Cs. The model is returned in eval mode (no dropout): call .train() to fine-tune with the
    checkpoint's dropout. weights="bf16" | "int8" packs the weights for inference; a checkpoint saved
    quantized is memory-mapped as stored (weights None or its own kind). A directory that also holds a
    LoRA adapter comes back with the adapter applied, merged when packed; one whose base_model.json
    refers to its base instead of holding weights (a LoRA run's checkpoint) loads that base."""
    stored = checkpoint_kind(name_or_path)
    if stored is not None:
        if weights not in (None, stored):
            raise ValueError(f"{name_or_path} holds {stored} weights; cannot load them as {weights}")
        return load_quantized(name_or_path)
    weights = quant.check_kind(weights)
    if weights != "fp32" and np.dtype(dtype) != np.float32:
        raise ValueError(f"weights={weights} needs dtype float32")
    config, state = load_checkpoint(base_of(name_or_path), verify=verify, writable=True)   # a LoRA run: its base
    # copy-on-write maps of the file become the parameters: nothing is copied, and pages are
    # read from the page cache when first used (fresh anonymous memory is slow to fault in)
    model = GPT(config, dtype=dtype, init=False).load_state_dict(state, assign=True)
    adapter = adapter_dir(name_or_path)             # a LoRA run or save: base weights + adapter files
    if adapter is not None:
        load_adapter(model, adapter)
        if weights != "fp32":
            merge(model)                            # packed weights hold the merged W + s A B
    return quant.quantize(model, weights).eval()


def save_model(model, directory) -> str:
    """Write config.json + model.safetensors (Hugging Face GPT-2 layout) atomically; returns the path.
    A quantized model writes its packed weights (npgpt.io.quantized); a model holding LoRA adapters its
    base weights plus the adapter in PEFT's layout (npgpt.io.peft), which load_model applies; a
    Classifier its GPT and its head."""
    if hasattr(model, "save_head"):                  # a Classifier
        save_model(model.gpt, directory)
        return model.save_head(directory)
    if model.weight_format != "fp32":
        return save_quantized(model, directory)
    if lora_layers(model):
        return save_with_adapter(model, directory)   # base weights + adapter_config.json + adapter_model.safetensors
    # float_state: a model laid out for decoding (decode_layout) holds its Linears' weights as rows
    return save_hf_checkpoint(directory, model.config, quant.float_state(model), dtype=model.dtype)


# ----------------------------------------------------------------------------- training checkpoints
def save_model_files(model, directory) -> str:
    """The model's part of a training checkpoint, written into `directory`. A model with LoRA adapters on
    a known, frozen base (apply_lora's base: `npgpt finetune --init`) copies none of the base's weights:
    config.json, the adapter (PEFT's layout), base_model.json and a Classifier's head. Any other model:
    save_model(model, directory), the whole model. Returns the directory."""
    body = _body(model)
    cfg = getattr(body, "lora_config", None)
    if cfg is None or cfg.base is None or not lora_layers(model) or any(p.requires_grad for _, p in _base_params(body)):
        return save_model(model, directory)
    directory = save_adapter(model, directory)
    write_json(os.path.join(directory, "config.json"), {**hf_config_dict(body.config), "torch_dtype": body.dtype.name})
    if hasattr(model, "save_head"):                  # a Classifier: its head
        model.save_head(directory)
    write_json(os.path.join(directory, BASE_REF), {**_base_location(cfg.base), **base_fingerprint(body)})
    return directory


def load_model_weights(model, directory):
    """Load the model files save_model_files wrote in `directory` into `model` (built alike), in place:
    a LoRA checkpoint's adapters (its base checked against the model's) and head, else every weight."""
    directory = os.fspath(directory)
    if not _refers_to_base(directory):
        _, weights = load_checkpoint(directory)
        return model.load_state_dict(weights)
    load_adapter(model, adapter_dir(directory))
    if hasattr(model, "load_head"):                  # a Classifier: its head
        model.load_head(directory)
    return model
