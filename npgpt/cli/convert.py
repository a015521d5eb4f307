"""`npgpt convert SRC DST`: checkpoint to checkpoint, straight through the arrays (no model is built)."""
from __future__ import annotations

from . import CLIError


def add_parser(sub):
    c = sub.add_parser("convert", help="convert a checkpoint (TensorFlow or safetensors, or a name) to npgpt's format")
    c.add_argument("src", help="the checkpoint to read: a path or a model name (downloaded if needed)")
    c.add_argument("dst", help="the directory to write (config.json + model.safetensors)")
    c.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    c.add_argument("--verify", action="store_true", help="check TensorFlow tensors' CRC-32C")
    c.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    from ..checkpoint import load_checkpoint, save_hf_checkpoint
    if not str(args.src).strip() or not str(args.dst).strip():
        raise CLIError("SRC and DST must not be empty")
    try:
        config, state = load_checkpoint(args.src, verify=args.verify)
        save_hf_checkpoint(args.dst, config, state, dtype=np.dtype(args.dtype))
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    n = sum(int(np.prod(v.shape)) for v in state.values())
    print(f"wrote {args.dst} ({n:,} parameters, {args.dtype})")
    return 0
