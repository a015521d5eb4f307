"""Checkpoints of 16- and 8-bit models (npgpt/inference/quant.py packs them).

save_quantized(model, dir) writes config.json + model.safetensors with the packed weights under their
usual names in (out, in) layout, as BF16 or I8, the int8 scales beside them as `name.scale` (F32),
and metadata npgpt.weights = bf16 | int8; load_quantized(dir) maps them back with no copy.
"""
from __future__ import annotations

import os

import numpy as np

from ..inference.quant import META_KEY, QuantEmbedding, QuantLinear, QuantTiedLMHead, check_kind
from ..layers.linear import Linear


def save_quantized(model, directory) -> str:
    """config.json + model.safetensors of a quantized model (see the module docstring), written as
    npgpt.io.safetensors.write_model_dir writes them."""
    from .safetensors import hf_config_dict, write_model_dir
    kind = model.weight_format
    if kind == "fp32":
        raise ValueError("save_quantized: the model holds float32 weights (use model.save)")
    tensors, dtypes = {}, {}
    for name, p in model.named_parameters():
        tensors[name] = p.data
    for prefix, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            if m.kind != kind:                       # a module left out of the packing: not a file load_model reads
                raise ValueError(f"save_quantized: {prefix} holds {m.kind} weights in a {kind} model")
            name = f"{prefix}.weight"
            tensors[name] = m.packed
            if m.kind == "bf16":
                dtypes[name] = "BF16"
            else:
                tensors[name + ".scale"] = m.scale
    meta = {"format": "npgpt", META_KEY: kind,
            "npgpt.layout": "packed weights are (out, in): Conv1D weights transposed, wte as is"}
    cfg = hf_config_dict(model.config)
    cfg["torch_dtype"] = {"bf16": "bfloat16", "int8": "int8"}[kind]
    cfg["npgpt_weights"] = kind
    return write_model_dir(directory, cfg, tensors, meta, dtypes)


def _weights_file(path):
    from . import resolve_run_dir
    path = resolve_run_dir(os.fspath(path))
    f = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    return f if f.endswith(".safetensors") and os.path.isfile(f) else None


def checkpoint_kind(path):
    """'bf16' / 'int8' for a quantized npgpt checkpoint, else None (float checkpoints, model names)."""
    from .safetensors import read_safetensors_header
    f = _weights_file(path)
    if f is None:
        return None
    _, meta, _, _ = read_safetensors_header(f)
    return meta.get(META_KEY)


def packed_names(config) -> dict:
    """{Hugging Face name: packed shape (out, in)} of the weights a quantized checkpoint stores packed:
    every 2-D weight but wpe; wte (V, C) is already (out, in), the Conv1D weights are transposed."""
    from .layout import hf_param_shapes
    wte, wpe = "transformer.wte.weight", "transformer.wpe.weight"
    return {k: (s if k == wte else s[::-1]) for k, s in hf_param_shapes(config).items() if len(s) == 2 and k != wpe}


def read_quantized(path) -> tuple:
    """(GPTConfig, kind, {name: (packed, scale | None)} of the packed weights, {name: array} of the float
    ones) of a quantized checkpoint: read-only views of a memory map of the file, each checked against
    config.json (the config's sizes against the file's own tensors first, before anything grows with it)."""
    from .layout import hf_param_shapes, read_json_object
    from .safetensors import check_hf_config_fits, config_from_hf, read_safetensors
    f = _weights_file(path)
    cfg_path = os.path.join(os.path.dirname(f) or ".", "config.json")
    config = config_from_hf(read_json_object(cfg_path, "JSON"), cfg_path)
    tensors, meta = read_safetensors(f, mmap=True, writable=False, raw_bf16=True)
    kind = check_kind(meta.get(META_KEY))
    check_hf_config_fits(config, tensors, f, cfg_path)
    want = np.uint16 if kind == "bf16" else np.int8
    packed = {}
    for name, shape in packed_names(config).items():
        q, scale = tensors.pop(name, None), tensors.pop(name + ".scale", None)
        if q is None or q.shape != shape or q.dtype != want:
            raise ValueError(f"{f}: {name} must be {np.dtype(want)}{list(shape)} for {kind} weights, got "
                             f"{None if q is None else (q.dtype, q.shape)}")
        if kind == "int8" and (scale is None or scale.shape != shape[:1] or scale.dtype != np.float32):
            raise ValueError(f"{f}: {name}.scale must be float32[{shape[0]}]")
        packed[name] = (q, scale)
    floats = {k: s for k, s in hf_param_shapes(config).items() if k not in packed}
    extra = sorted(set(tensors) - set(floats))
    bad = [k for k, s in floats.items() if k not in tensors or tensors[k].shape != s or tensors[k].dtype.kind != "f"]
    problems = ([f"unexpected tensors {extra[:5]}"] if extra else []) + \
               ([f"missing or mis-shaped tensors {bad[:5]}"] if bad else [])
    if problems:
        raise ValueError(f"{f}: {kind} checkpoint does not match {cfg_path}: " + "; ".join(problems))
    return config, kind, packed, tensors


def load_quantized(path):
    """A GPT whose packed weights are read-only views of a memory map of the file (no copy)."""
    from ..model import GPT
    config, kind, packed, floats = read_quantized(path)
    model = GPT(config, init=False)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
        n_out = lin.weight.data.shape[1]                            # Linear keeps (in, out)
        model.replace(name, QuantLinear(*packed[f"{name}.weight"], np.zeros(n_out, np.float32)))
    model.wte = QuantEmbedding(*packed["transformer.wte.weight"])
    model.lm_head = QuantTiedLMHead(model.wte)
    model.weight_format = kind
    model.load_state_dict(floats, strict=True, assign=True)   # LayerNorms, biases, wpe (small copies)
    return model.eval()
