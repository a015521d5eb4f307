"""LoRA fine-tuning (the book's appendix E): adapters on a frozen GPT-2, saved as Hugging Face PEFT saves them.

    apply_lora(model, rank=16, alpha=16)        every Linear -> LoRALinear (npgpt/layers/lora.py); returns
                                                the number of trainable parameters
    train as usual (AdamW skips frozen parameters)
    save_adapter(model, "adapter/", base="gpt2")   adapter_config.json + adapter_model.safetensors (small)
    load_adapter("gpt2", "adapter/")            a GPT with the adapter applied (or load_adapter(model, dir))
    merge(model)                                W += s A B in every LoRALinear, back to plain Linears

apply_lora freezes everything except the adapters and a classification head (a Classifier's
LastTokenHead stays trainable in full and gets no adapter). `targets` names a subset as PEFT's
target_modules does: a layer matches a name when its dotted name (as Hugging Face's GPT2LMHeadModel
names it, transformer.h.0.attn.c_attn) equals it or ends in "." + name; a single string is a regular
expression matched against the whole name.

PEFT's layout, for GPT-2's Conv1D layers (weight (in, out), fan_in_fan_out true):

    adapter_model.safetensors
        base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, in)    = A^T
        base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (out, r)   = B^T
    adapter_config.json   peft_type LORA, r, lora_alpha, target_modules, fan_in_fan_out true, ...

PEFT computes y = base(x) + lora_B(lora_A(x)) * (lora_alpha / r), i.e. x A B s with A = lora_A.weight^T
and B = lora_B.weight^T: the same function.

A model holding adapters saves (GPT.save, Classifier.save) as its base weights (model.safetensors,
untouched) plus the adapter files in the same directory, and GPT.from_pretrained / Classifier.load of
such a directory apply the adapter again.

A training checkpoint of such a model (a `npgpt finetune --lora-rank` run: save_model_files) copies no
base weights. It holds config.json, the adapter files, a Classifier's head, and base_model.json, which
refers to the base:

    {"name_or_path": "gpt2", "path": null,              as given to --init; its absolute path (null: a name)
     "parameters": 124439808, "fingerprint": "sha256:..."}   base_fingerprint: what identifies the base

GPT.from_pretrained of that checkpoint loads the base from there (base_of) and checks that it is the
same model (check_base) before applying the adapter; a missing or different base is one ValueError
or FileNotFoundError line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .layers import LastTokenHead, Linear, Module
from .layers.lora import LoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_REF = "base_model.json"
BASE_SAMPLES = 64                     # values of each base tensor that base_fingerprint hashes
PEFT_PREFIX = "base_model.model."
LORA_PARAMS = ("lora_A", "lora_B")


@dataclass
class LoRAConfig:
    """What apply_lora did (kept on the GPT as .lora_config, for save_adapter)."""
    rank: int
    alpha: float
    target_modules: list | str
    base: str | None = None


# ----------------------------------------------------------------------------- finding layers
def _body(model):
    """The GPT a model is built on (the model itself, or a Classifier's .gpt), else the model."""
    from .model import GPT
    if isinstance(model, GPT):
        return model
    gpt = getattr(model, "gpt", None)
    return gpt if isinstance(gpt, GPT) else model


def _layers(module, kinds, prefix=""):
    """(dotted name, owner module, attribute name, layer) for every layer of the given kinds held as
    a direct attribute of some module, depth first, with Hugging Face names (transformer.h.0...)."""
    for name, v in module._members():
        if not isinstance(v, Module):
            continue
        if isinstance(v, kinds):
            attr = next((a for a, value in vars(module).items() if value is v), None)
            if attr is not None:
                yield prefix + name, module, attr, v
        else:
            yield from _layers(v, kinds, prefix + name + ".")


def lora_layers(model) -> list:
    """[(dotted name, LoRALinear)] of the model's GPT body (names as in GPT2LMHeadModel)."""
    return [(name, layer) for name, _, _, layer in _layers(_body(model), LoRALinear)]


def _matches(name: str, targets) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def count_trainable(model) -> int:
    return sum(p.data.size for p in model.parameters() if p.requires_grad)


def _base_params(gpt):
    """(name, Parameter) of the GPT's weights other than its adapters."""
    return [(name, p) for name, p in gpt.named_parameters() if name.rsplit(".", 1)[-1] not in LORA_PARAMS]


# ----------------------------------------------------------------------------- apply / merge
def apply_lora(model, rank: int, alpha: float, targets=None, seed=0, base: str | None = None) -> int:
    """Wrap every Linear of the model's GPT body (or those `targets` names) in a LoRALinear, freeze
    everything else except a classification head, and return the number of trainable parameters.
    A is drawn from np.random.default_rng(seed), layer by layer in module order; B starts at zero.
    base: the base model's name or path, recorded for save_adapter."""
    if lora_layers(model):
        raise ValueError("the model already holds LoRA adapters (merge them first, or load into a fresh model)")
    if not (isinstance(rank, (int, np.integer)) and rank >= 1):
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank}")
    if isinstance(targets, (list, tuple)) and not targets:
        raise ValueError("targets must name at least one layer (None: every Linear)")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha}")
    body = _body(model)
    found = [(name, owner, attr, lin) for name, owner, attr, lin in _layers(body, Linear)
             if not isinstance(lin, LastTokenHead) and _matches(name, targets)]
    if not found:
        raise ValueError(f"no Linear layer matches targets {targets!r}")
    model.requires_grad_(False)                                      # the whole base model frozen
    rng = np.random.default_rng(seed)
    for name, owner, attr, lin in found:
        setattr(owner, attr, LoRALinear(lin, rank, alpha, rng=rng))  # A (in, r) random, B (r, out) zero
    for m in model.modules():
        if isinstance(m, LastTokenHead):
            m.requires_grad_(True)                                   # a classification head trains in full
    if targets is None:
        targets = sorted({name.rsplit(".", 1)[-1] for name, *_ in found})
    body.lora_config = LoRAConfig(int(rank), float(alpha), list(targets) if not isinstance(targets, str) else targets,
                                  None if base is None else os.fspath(base))
    return count_trainable(model)


def merge(model):
    """Fold every adapter into its base weight, W += (alpha/r) A B, and put plain Linears back (in place;
    returns the model). The merged model computes the same function, with no adapter cost."""
    body = _body(model)
    for _, owner, attr, layer in list(_layers(body, LoRALinear)):
        setattr(owner, attr, layer.merged())
    body.__dict__.pop("lora_config", None)
    return model


# ----------------------------------------------------------------------------- PEFT files
def _peft_key(name: str, which: str) -> str:
    return f"{PEFT_PREFIX}{name}.{which}.weight"


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model, directory, base: str | None = None) -> str:
    """adapter_config.json + adapter_model.safetensors in Hugging Face PEFT's layout (see the module
    docstring); `peft.PeftModel.from_pretrained(GPT2LMHeadModel, directory)` loads it. base: the base
    model's name or path (default: the one apply_lora recorded). Returns the directory."""
    from .checkpoint.safetensors import atomic_write, save_safetensors
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
    with atomic_write(os.path.join(directory, ADAPTER_CONFIG)) as f:
        f.write((json.dumps(config, indent=2) + "\n").encode("utf-8"))
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
    from .checkpoint import resolve_run_dir
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


def load_adapter(model_or_base, directory, dtype=np.float32):
    """Apply the adapter in `directory` (written by save_adapter or by PEFT for GPT-2) to a model: a GPT or
    Classifier (adapters are added if it has none), or a base model's name or path (loaded with
    GPT.from_pretrained). Returns the model."""
    from .checkpoint.safetensors import read_safetensors
    from .model import GPT
    if isinstance(model_or_base, Module):
        model = model_or_base
    else:
        model = GPT.from_pretrained(model_or_base, dtype=dtype)
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
        state[bare if bare.startswith("transformer.") else "transformer." + bare] = v
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
    """GPT.save of a model holding adapters: the base weights (config.json + model.safetensors, as if
    the adapters were not there) and the adapter files, in one directory."""
    from .checkpoint import save_hf_checkpoint
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
    from .checkpoint import is_model_name
    given = os.fspath(name_or_path)
    by_name = is_model_name(given) and not (os.path.exists(given) or os.path.exists(given + ".index"))
    return {"name_or_path": given, "path": None if by_name else os.path.abspath(given)}


def _refers_to_base(directory) -> bool:
    """A checkpoint holding no weights of its own, only a reference to its base (save_model_files)."""
    return os.path.isfile(os.path.join(directory, BASE_REF)) and \
        not os.path.isfile(os.path.join(directory, "model.safetensors"))


def read_base_ref(directory) -> dict:
    """base_model.json, checked (ValueError naming the file when it is damaged)."""
    from .checkpoint.layout import read_json_object
    path = os.path.join(os.fspath(directory), BASE_REF)
    ref = read_json_object(path, "LoRA base reference")
    kinds = {"name_or_path": str, "path": (str, type(None)), "parameters": int, "fingerprint": str}
    bad = [k for k, kind in kinds.items() if not isinstance(ref.get(k), kind) or isinstance(ref.get(k), bool)]
    if bad:
        raise ValueError(f"{path}: invalid LoRA base reference: {', '.join(bad)} missing or of the wrong type")
    return ref


def base_of(name_or_path):
    """Where GPT.from_pretrained reads the weights of `name_or_path`: for a checkpoint that refers to its
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


def save_model_files(model, directory) -> str:
    """The model's part of a training checkpoint, written into `directory`. A model with LoRA adapters on
    a known, frozen base (apply_lora's base: `npgpt finetune --init`) copies none of the base's weights:
    config.json, the adapter (PEFT's layout), base_model.json and a Classifier's head. Any other model:
    model.save(directory), the whole model. Returns the directory."""
    from .checkpoint.safetensors import hf_config_dict
    from .classifier import Classifier
    from .train.run import write_json
    body = _body(model)
    cfg = getattr(body, "lora_config", None)
    if cfg is None or cfg.base is None or not lora_layers(model) or any(p.requires_grad for _, p in _base_params(body)):
        return model.save(directory)
    directory = save_adapter(model, directory)
    write_json(os.path.join(directory, "config.json"), {**hf_config_dict(body.config), "torch_dtype": body.dtype.name})
    if isinstance(model, Classifier):
        model.save_head(directory)
    write_json(os.path.join(directory, BASE_REF), {**_base_location(cfg.base), **base_fingerprint(body)})
    return directory


def load_model_weights(model, directory):
    """Load the model files save_model_files wrote in `directory` into `model` (built alike), in place:
    a LoRA checkpoint's adapters (its base checked against the model's) and head, else every weight."""
    from .classifier import Classifier
    directory = os.fspath(directory)
    if not _refers_to_base(directory):
        from .checkpoint import load_checkpoint
        _, weights = load_checkpoint(directory)
        return model.load_state_dict(weights)
    load_adapter(model, adapter_dir(directory))
    if isinstance(model, Classifier):
        model.load_head(directory)
    return model


# ----------------------------------------------------------------------------- command-line helpers
def add_lora_args(parser):
    """--lora-rank, --lora-alpha, --lora-targets, --merge (for `npgpt finetune` subcommands)."""
    g = parser.add_argument_group("LoRA (train low-rank adapters; the base model stays frozen)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R (and a classification head) instead of whole blocks")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="the adapters' scale is A/R (default A = R: a scale of 1)")
    g.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated layer names, as PEFT's target_modules (c_attn,c_proj,c_fc); default every Linear")
    g.add_argument("--merge", action="store_true",
                   help="at the end, fold the adapters into the weights and save the merged model")
    return g


def setup_lora(model, args, base=None):
    """Apply LoRA as the arguments ask: nothing without --lora-rank (returns None), else apply_lora with
    the run's seed; returns the trainable parameter count. Raises CLIError on bad arguments."""
    from .cli import CLIError
    rank, alpha = getattr(args, "lora_rank", None), getattr(args, "lora_alpha", None)
    if rank is None:
        for flag, v in (("--lora-alpha", alpha), ("--lora-targets", getattr(args, "lora_targets", None)),
                        ("--merge", getattr(args, "merge", False) or None)):
            if v is not None:
                raise CLIError(f"{flag} needs --lora-rank")
        return None
    if rank < 1:
        raise CLIError(f"--lora-rank must be >= 1, got {rank}")
    alpha = float(rank) if alpha is None else alpha
    if not (math.isfinite(alpha) and alpha > 0):
        raise CLIError(f"--lora-alpha must be a finite number > 0, got {alpha}")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    try:
        return apply_lora(model, rank, alpha, targets, seed=getattr(args, "seed", 0),
                          base=base if base is not None else getattr(args, "init", None))
    except ValueError as e:
        raise CLIError(f"--lora-rank: {e}") from None


def finish_lora(model, args, run_dir, checkpoint=None) -> None:
    """After training with --lora-rank: the adapter alone into RUN/adapter (small, PEFT-readable); with
    --merge, the adapters folded in and the run's checkpoint re-saved as a whole plain model (which no
    longer refers to its base)."""
    if getattr(args, "lora_rank", None) is None:
        return
    save_adapter(model, os.path.join(os.fspath(run_dir), "adapter"))
    if getattr(args, "merge", False):
        merge(model)
        if checkpoint is not None:
            model.save(checkpoint)                  # the whole model; the checkpoint's other files are kept,
            stale = os.path.join(checkpoint, BASE_REF)      # base_model.json too, which no longer applies
            if os.path.isfile(stale):
                os.remove(stale)
