"""The GPT-2 parameter layout: names and shapes, in Hugging Face and OpenAI spelling.

The native state dict uses Hugging Face GPT-2 names with the ``transformer.``
prefix and Hugging Face layouts (Conv1D weights are (in, out)); there is no
``lm_head.weight`` because the output projection is tied to ``transformer.wte``.
"""
from __future__ import annotations

import json

import numpy as np

from ..config import HF_PREFIX, GPTConfig

PREFIX = HF_PREFIX


def hf_param_shapes(config: GPTConfig) -> dict:
    """Ordered {hf name: shape} of every parameter the model has."""
    V, T, C, L = config.n_vocab, config.n_ctx, config.n_embd, config.n_layer
    out = {
        "transformer.wte.weight": (V, C),
        "transformer.wpe.weight": (T, C),
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        out.update({
            p + "ln_1.weight": (C,),
            p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C),
            p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C),
            p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,),
            p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C),
            p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C),
            p + "mlp.c_proj.bias": (C,),
        })
    out["transformer.ln_f.weight"] = (C,)
    out["transformer.ln_f.bias"] = (C,)
    return out


def hf_to_openai_name(name: str) -> str:
    """``transformer.h.3.attn.c_attn.weight`` -> ``model/h3/attn/c_attn/w`` etc."""
    parts = name[len(PREFIX):].split(".") if name.startswith(PREFIX) else name.split(".")
    if parts[0] == "h":
        parts = [f"h{parts[1]}"] + parts[2:]
    leaf = parts[-1]
    if parts[-2].startswith("ln_"):
        parts[-1] = {"weight": "g", "bias": "b"}[leaf]
    elif parts[-2] in ("wte", "wpe"):
        parts = parts[:-1]
    else:
        parts[-1] = {"weight": "w", "bias": "b"}[leaf]
    return "model/" + "/".join(parts)


def openai_param_map(config: GPTConfig) -> dict:
    """Ordered (like ``hf_param_shapes``) {OpenAI TF variable name: (hf name, shape stored in the TF checkpoint)}.

    OpenAI stores the Conv1D weights with a leading 1: ``[1, in, out]``.
    """
    out = {}
    for name, shape in hf_param_shapes(config).items():
        conv_w = name.endswith(".weight") and len(shape) == 2 and ".h." in name
        out[hf_to_openai_name(name)] = (name, (1,) + shape if conv_w else shape)
    return out


def fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def check_config_fits(config: GPTConfig, layers, wte, wpe, source: str, config_path: str) -> None:
    """Raise ValueError unless the config's sizes are the file's own: ``layers`` (the block index of
    every block tensor in the file) must cover exactly 0 .. n_layer-1, and the token and position
    tables, ``wte`` and ``wpe`` as (tensor name, shape) or None when absent, must be (n_vocab, n_embd)
    and (n_ctx, n_embd). Called before anything that grows with the config (the expected-shapes
    table, a model) is built, so a config claiming 10**9 layers beside a two-layer file fails at once."""
    problems = []
    held = sorted(set(layers))                      # distinct, so held == [0 .. n-1] iff its last is n-1
    if config.n_layer != len(held) or (held and held[-1] != len(held) - 1):
        blocks = f"blocks {held[:8]}{' ...' if len(held) > 8 else ''}" if held else "no blocks"
        problems.append(f"n_layer={config.n_layer} but the file holds {blocks}")
    for table, want in ((wte, (config.n_vocab, config.n_embd)), (wpe, (config.n_ctx, config.n_embd))):
        if table is not None and tuple(table[1]) != want:
            problems.append(f"tensor {table[0]!r} has shape {fmt_shape(table[1])}, expected {fmt_shape(want)}")
    if problems:
        raise ValueError(f"{source}: checkpoint does not match {config_path} ({config.to_hparams()}): "
                         + "; ".join(problems))


def check_state_dict(config: GPTConfig, state_dict: dict, source: str) -> None:
    """Raise ValueError unless ``state_dict`` has exactly the parameters ``config`` implies."""
    expected = hf_param_shapes(config)
    problems = []
    for name, shape in expected.items():
        if name not in state_dict:
            problems.append(f"tensor {name!r} is missing (expected shape {fmt_shape(shape)})")
        elif tuple(state_dict[name].shape) != shape:
            problems.append(f"tensor {name!r} has shape {fmt_shape(state_dict[name].shape)}, "
                            f"expected {fmt_shape(shape)}")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if problems:
        raise ValueError(f"{source}: state dict does not match {config}: " + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more problems" if len(problems) > 8 else ""))


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact: bf16 is the top half of an f32)."""
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def read_json_object(path: str, what: str) -> dict:
    """A JSON file that must hold an object (config.json, hparams.json); ValueError naming it if not."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: invalid {what}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: invalid {what}: not a JSON object")
    return obj
