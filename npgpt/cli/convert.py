"""`npgpt convert SRC DST`: any model npgpt reads, written as a float Hugging Face checkpoint."""
from __future__ import annotations

import argparse

from . import CLIError


def add_parser(sub):
    c = sub.add_parser("convert", help="convert a checkpoint (TensorFlow or safetensors, or a name) to npgpt's format")
    c.add_argument("src", help="the model to read: a path (TensorFlow, Hugging Face, npgpt's packed bf16/int8, a LoRA "
                               "save or run) or a model name (downloaded if needed)")
    c.add_argument("dst", help="the directory to write: config.json + model.safetensors, and a training run's "
                               "tokenizer files; nothing else in it changes")
    c.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    c.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check every TensorFlow tensor's CRC-32C, as TensorFlow's reader does (default: on)")
    c.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    from ..layers import lora
    from ..inference import quant
    from ..io import hf_param_shapes, save_hf_checkpoint
    from ..io.pretrained import load_model
    from ..tokens.tokenizers import save_tokenizer
    from .generate import _tokenizer_for
    if not str(args.src).strip() or not str(args.dst).strip():
        raise CLIError("SRC and DST must not be empty")
    dtype = np.dtype(args.dtype)
    try:
        model = load_model(args.src, dtype=dtype, verify=args.verify)
        if lora.lora_layers(model):
            lora.merge(model)                         # W + (alpha/r) A B: the function the adapted model computes
        state = quant.float_state(model)              # packed bf16/int8 weights: the float weights they stand for
        save_hf_checkpoint(args.dst, model.config, state, dtype=dtype)
        tokenizer = _tokenizer_for(args.src)           # a training run's: so the copy opens with it too
        if tokenizer is not None:
            save_tokenizer(tokenizer, args.dst)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    n = sum(int(np.prod(shape)) for shape in hf_param_shapes(model.config).values())
    print(f"wrote {args.dst} ({n:,} parameters, {args.dtype}"
          + (f", unpacked from {model.weight_format}" if model.weight_format != "fp32" else "") + ")")
    return 0
