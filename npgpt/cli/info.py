"""`npgpt info PATH`: a checkpoint's config, parameter count, dtype and size."""
from __future__ import annotations

import os

from . import CLIError


def add_parser(sub):
    i = sub.add_parser("info", help="show a checkpoint's config, parameter count, dtype and size")
    i.add_argument("path", help="a checkpoint path, or a model name already downloaded with `npgpt download`")
    i.set_defaults(func=run)


def _info_path(path: str) -> str:
    """info reads only local files: a model name means its already-downloaded native copy."""
    from ..io import is_model_name
    from ..io.download import native_dir
    if os.path.exists(path) or os.path.exists(path + ".index") or not is_model_name(path):
        return path
    native = native_dir(path)
    if not (os.path.isfile(os.path.join(native, "config.json"))
            and os.path.isfile(os.path.join(native, "model.safetensors"))):
        raise CLIError(f"model {path} is not downloaded (no {native}): info takes a checkpoint path or an "
                       f"already-downloaded model name; run `npgpt download {path}` first")
    return native


FORMATS = {"hf": "Hugging Face safetensors", "tf": "OpenAI TensorFlow checkpoint"}


def run(args) -> int:
    import numpy as np
    from ..layers import lora
    from ..inference import quant
    from ..io import detect_format, hf_param_shapes
    from ..io.pretrained import load_model
    from ..io.quantized import checkpoint_kind
    path = _info_path(args.path)
    try:
        stored = checkpoint_kind(path)
        fmt = f"npgpt, {stored} weights packed (safetensors)" if stored else FORMATS[detect_format(path)]
        model = load_model(path)            # every format npgpt writes; weights memory-mapped, not read
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    n = sum(int(np.prod(shape)) for shape in hf_param_shapes(model.config).values())
    adapters = lora.lora_layers(model)
    arrays = [p.data for p in model.parameters()] + [a for m in model.modules() for a in
                                                     (getattr(m, "packed", None), getattr(m, "scale", None))
                                                     if isinstance(a, np.ndarray)]
    print(f"path:       {path}")
    print(f"format:     {fmt}" + (f", with a LoRA adapter on {len(adapters)} layers" if adapters else ""))
    for k, v in model.config.to_hparams().items():
        print(f"{k + ':':<11} {v}")
    print(f"parameters: {n:,}" + (f" + {model.num_parameters() - n:,} in the adapter" if adapters else ""))
    print(f"dtype:      {', '.join(sorted({str(a.dtype) for a in arrays}))}")
    print(f"bytes:      {quant.weight_bytes(model):,}")
    return 0
