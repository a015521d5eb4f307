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
    from ..checkpoint import is_model_name
    from ..checkpoint.download import native_dir
    if os.path.exists(path) or os.path.exists(path + ".index") or not is_model_name(path):
        return path
    native = native_dir(path)
    if not (os.path.isfile(os.path.join(native, "config.json"))
            and os.path.isfile(os.path.join(native, "model.safetensors"))):
        raise CLIError(f"model {path} is not downloaded (no {native}): info takes a checkpoint path or an "
                       f"already-downloaded model name; run `npgpt download {path}` first")
    return native


def run(args) -> int:
    import numpy as np
    from ..checkpoint import detect_format, load_checkpoint
    path = _info_path(args.path)
    try:
        fmt = detect_format(path)
        config, state = load_checkpoint(path)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    n = sum(int(np.prod(v.shape)) for v in state.values())
    dtypes = sorted({str(v.dtype) for v in state.values()})
    nbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in state.values())
    print(f"path:       {path}")
    print(f"format:     {'Hugging Face safetensors' if fmt == 'hf' else 'OpenAI TensorFlow checkpoint'}")
    for k, v in config.to_hparams().items():
        print(f"{k + ':':<11} {v}")
    print(f"parameters: {n:,} in {len(state)} tensors")
    print(f"dtype:      {', '.join(dtypes)}")
    print(f"bytes:      {nbytes:,}")
    return 0
