"""LoRA adapters on disk, as Hugging Face PEFT saves them, and the LoRA run checkpoint that refers to its base.

    save_adapter(model, "adapter/", base="gpt2")   adapter_config.json + adapter_model.safetensors (small)
    load_adapter("gpt2", "adapter/")            a GPT with the adapter applied (or load_adapter(model, dir))

PEFT's layout, for GPT-2's Conv1D layers (weight (in, out), fan_in_fan_out true):

    adapter_model.safetensors
        base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, in)    = A^T
        base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (out, r)   = B^T
    adapter_config.json   peft_type LORA, r, lora_alpha, target_modules, fan_in_fan_out true, ...

PEFT computes y = base(x) + lora_B(lora_A(x)) * (lora_alpha / r), i.e. x A B s with A = lora_A.weight^T
and B = lora_B.weight^T: the same function as npgpt's LoRALinear (npgpt/layers/lora.py).

A model holding adapters saves (npgpt.save_model, Classifier.save) as its base weights
(model.safetensors, untouched) plus the adapter files in the same directory, and npgpt.load_model /
Classifier.load of such a directory apply the adapter again.

A training checkpoint of such a model (a `npgpt finetune --lora-rank` run: save_model_files) copies no
base weights. It holds config.json, the adapter files, a Classifier's head, and base_model.json, which
refers to the base:

    {"name_or_path": "gpt2", "path": null,              as given to --init; its absolute path (null: a name)
     "parameters": 124439808, "fingerprint": "sha256:..."}   base_fingerprint: what identifies the base

npgpt.load_model of that checkpoint loads the base from there (base_of) and checks that it is the
same model (check_base) before applying the adapter; a missing or different base is one ValueError
or FileNotFoundError line.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..config import HF_PREFIX
from ..layers.lora import LORA_PARAMS, _base_params, _body, apply_lora, lora_layers

ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


BASE_REF = "base_model.json"


BASE_SAMPLES = 64                     # values of each base tensor that base_fingerprint hashes


PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- PEFT files
def _peft_key(name: str, which: str) -> str:
    return f"{PEFT_PREFIX}{name}.{which}.weight"


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model, directory, base: str | None = None) -> str:
    """adapter_config.json + adapter_model.safetensors in Hugging Face PEFT's layout (see the module
    docstring); `peft.PeftModel.from_pretrained(GPT2LMHeadModel, directory)` loads it. base: the base
    model's name or path (default: the one apply_lora recorded). Returns the directory."""
    from .atomic import write_json
    from .safetensors import save_safetensors
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model holds no LoRA adapters (apply_lora first)")
    cfg = getattr(_body(model), "lora_config", None)
    rank, alpha = layers[0][1].rank, layers[0][1].alpha
    if any(layer.rank != rank or layer.alpha != alpha for _, layer in layers):
        raise ValueError("save_adapter: the adapters differ in rank or alpha; PEFT's config holds one of each")
    targets = cfg.target_modules if cfg else sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    base = os.fspath(base) if base is not None else (cfg.base if cfg else None)
    tensors = {}
    for name, layer in layers:
        tensors[_peft_key(name, "lora_A")] = np.ascontiguousarray(layer.lora_A.data.T)   # (r, in)
        tensors[_peft_key(name, "lora_B")] = np.ascontiguousarray(layer.lora_B.data.T)   # (out, r)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": _number(alpha), "target_modules": targets, "lora_dropout": 0.0,
        "fan_in_fan_out": True, "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
    write_json(os.path.join(directory, ADAPTER_CONFIG), config, indent=2)
    return directory


def read_adapter_config(directory) -> dict:
    """The adapter's config, checked to be a LoRA adapter npgpt computes exactly (ValueError otherwise)."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")
    unsupported = [k for k in ("use_rslora", "use_dora", "modules_to_save", "layers_to_transform", "rank_pattern",
                               "alpha_pattern") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if unsupported:
        raise ValueError(f"{path}: unsupported LoRA options {unsupported}")
    for k in ("r", "lora_alpha", "target_modules"):
        if cfg.get(k) is None:
            raise ValueError(f"{path}: no {k}")
    return cfg


def _model_dir(path):
    """The directory a model path stands for (a run directory: its checkpoint), or None (not a directory)."""
    from . import resolve_run_dir
    try:
        p = resolve_run_dir(os.fspath(path))
    except TypeError:
        return None
    return p if os.path.isdir(p) else None


def adapter_dir(path):
    """The directory holding an adapter for a model path (a run directory stands for its checkpoint), or
    None. An adapter's weights or base reference without its adapter_config.json: FileNotFoundError."""
    p = _model_dir(path)
    if p is None:
        return None
    if os.path.isfile(os.path.join(p, ADAPTER_CONFIG)):
        return p
    found = ADAPTER_WEIGHTS if os.path.isfile(os.path.join(p, ADAPTER_WEIGHTS)) else \
        BASE_REF if _refers_to_base(p) else None
    if found is not None:
        raise FileNotFoundError(f"{os.path.join(p, ADAPTER_CONFIG)} is missing: {p} holds {found}, but a LoRA "
                                f"adapter cannot be applied without its config")
    return None


def load_adapter(model, directory):
    """Apply the adapter in `directory` (written by save_adapter or by PEFT for GPT-2) to a GPT or a
    Classifier (adapters are added if it has none). Returns the model."""
    from .safetensors import read_safetensors
    directory = os.fspath(directory)
    cfg = read_adapter_config(directory)
    rank, alpha, targets = int(cfg["r"]), float(cfg["lora_alpha"]), cfg["target_modules"]
    base = cfg.get("base_model_name_or_path")
    if _refers_to_base(directory):                  # a LoRA run's checkpoint: the base it was trained on
        ref = check_base(model, directory)
        base = ref["path"] or ref["name_or_path"]
    layers = lora_layers(model)
    if not layers:
        apply_lora(model, rank, alpha, targets, base=base)
        layers = lora_layers(model)
    elif any(layer.rank != rank or layer.alpha != alpha for _, layer in layers):
        raise ValueError(f"{directory}: adapter has r={rank}, alpha={alpha}; the model's adapters differ")
    tensors, _ = read_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), mmap=False)
    state = {}
    for k, v in tensors.items():                   # a PEFT file of a GPT2Model (no LM head) has no "transformer."
        bare = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        state[bare if bare.startswith(HF_PREFIX) else HF_PREFIX + bare] = v
    expected = {f"{name}.{w}.weight": (name, layer, w) for name, layer in layers for w in LORA_PARAMS}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory}: adapter tensors do not match the model's LoRA layers: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    for key, (name, layer, w) in expected.items():
        p = getattr(layer, w)
        t = state[key]
        if t.T.shape != p.data.shape:
            raise ValueError(f"{directory}: {key} has shape {t.shape}, expected {p.data.T.shape}")
        p.data[...] = t.T                          # lora_A.weight (r, in) -> A (in, r); lora_B (out, r) -> B (r, out)
    return model


def save_with_adapter(gpt, directory) -> str:
    """save_model of a GPT holding adapters: the base weights (config.json + model.safetensors, as if
    the adapters were not there) and the adapter files, in one directory."""
    from . import save_hf_checkpoint
    base = {name: p.data for name, p in _base_params(gpt)}
    save_hf_checkpoint(directory, gpt.config, base, dtype=gpt.dtype)
    save_adapter(gpt, directory)
    return os.fspath(directory)


# ----------------------------------------------------------------------------- training checkpoints
def base_fingerprint(gpt) -> dict:
    """What identifies a LoRA model's frozen base, cheaply: its parameter count and a sha256 over its
    shape (GPTConfig.to_hparams) and, for every base tensor by name, its name, shape and BASE_SAMPLES evenly
    spaced values. The values are hashed as float32, so a base loaded as float32 or float64 hashes alike;
    a base trained further, or another model of the same shape, does not."""
    h = hashlib.sha256(json.dumps(gpt.config.to_hparams(), sort_keys=True).encode("utf-8"))
    count = 0
    for name, p in sorted(_base_params(gpt), key=lambda item: item[0]):
        flat = p.data.reshape(-1)
        picks = np.linspace(0, flat.size - 1, min(flat.size, BASE_SAMPLES)).astype(np.int64)
        h.update(f"{name}{list(p.data.shape)}".encode("utf-8"))
        h.update(flat[picks].astype("<f4").tobytes())
        count += flat.size
    return {"parameters": count, "fingerprint": "sha256:" + h.hexdigest()}


def _base_location(name_or_path) -> dict:
    """How base_model.json names a base: as given, and its absolute path (None for a model name, which
    load_checkpoint loads by name when no such path exists)."""
    from . import is_model_name
    given = os.fspath(name_or_path)
    by_name = is_model_name(given) and not (os.path.exists(given) or os.path.exists(given + ".index"))
    return {"name_or_path": given, "path": None if by_name else os.path.abspath(given)}


def _refers_to_base(directory) -> bool:
    """A checkpoint holding no weights of its own, only a reference to its base (save_model_files)."""
    return os.path.isfile(os.path.join(directory, BASE_REF)) and \
        not os.path.isfile(os.path.join(directory, "model.safetensors"))


def read_base_ref(directory) -> dict:
    """base_model.json, checked (ValueError naming the file when it is damaged)."""
    from .layout import read_json_object
    path = os.path.join(os.fspath(directory), BASE_REF)
    ref = read_json_object(path, "LoRA base reference")
    kinds = {"name_or_path": str, "path": (str, type(None)), "parameters": int, "fingerprint": str}
    bad = [k for k, kind in kinds.items() if not isinstance(ref.get(k), kind) or isinstance(ref.get(k), bool)]
    if bad:
        raise ValueError(f"{path}: invalid LoRA base reference: {', '.join(bad)} missing or of the wrong type")
    return ref


def base_of(name_or_path):
    """Where npgpt.load_model reads the weights of `name_or_path`: for a checkpoint that refers to its
    base (base_model.json, no model.safetensors), that base (FileNotFoundError when it is gone); else itself."""
    directory = _model_dir(name_or_path)
    if directory is None or not _refers_to_base(directory):
        return name_or_path
    ref = read_base_ref(directory)
    path = ref["path"]
    if path is not None and not (os.path.exists(path) or os.path.exists(path + ".index")):
        raise FileNotFoundError(f"{directory}: the base model of this LoRA checkpoint, {ref['name_or_path']}, is "
                                f"missing ({path} does not exist); put it back there to load the adapter")
    return ref["name_or_path"] if path is None else path


def check_base(model, directory) -> dict:
    """The base reference in `directory`, after checking that the model's base (its weights other than
    the adapters) is the model it names: ValueError if not. Returns the reference."""
    ref = read_base_ref(directory)
    found = base_fingerprint(_body(model))
    if found["fingerprint"] != ref["fingerprint"]:
        where = ref["path"] or ref["name_or_path"]
        raise ValueError(f"{directory}: this LoRA adapter was trained on the base {ref['name_or_path']} ({where}: "
                         f"{ref['parameters']:,} parameters, {ref['fingerprint'][:19]}), but the base it is applied "
                         f"to differs ({found['parameters']:,} parameters, {found['fingerprint'][:19]})")
    return ref
