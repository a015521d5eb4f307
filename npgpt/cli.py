"""The `npgpt` command line: gradcheck, info, download, convert, generate, bench."""
from __future__ import annotations

import argparse
import os
import sys


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def cmd_gradcheck(args) -> int:
    from . import kernels
    from .gradcheck import check_everything, format_table
    ok = True
    for backend in (["numpy", "numba"] if args.kernels == "both" else [args.kernels]):
        with kernels.use_backend(backend):
            results = check_everything(seed=args.seed)
        print(f"gradient check, float64, fourth-order central differences, kernels={backend}")
        print(format_table(results))
        passed = sum(r.passed for r in results)
        print(f"{passed}/{len(results)} PASS\n")
        ok &= passed == len(results)
    return 0 if ok else 1


def _info_path(path: str) -> str:
    """info reads only local files: a model name means its already-downloaded native copy."""
    from .checkpoint import is_model_name
    from .checkpoint.download import native_dir
    if os.path.exists(path) or os.path.exists(path + ".index") or not is_model_name(path):
        return path
    native = native_dir(path)
    if not (os.path.isfile(os.path.join(native, "config.json"))
            and os.path.isfile(os.path.join(native, "model.safetensors"))):
        raise CLIError(f"model {path} is not downloaded (no {native}): info takes a checkpoint path or an "
                       f"already-downloaded model name; run `npgpt download {path}` first")
    return native


def cmd_info(args) -> int:
    import numpy as np
    from .checkpoint import detect_format, load_checkpoint
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


def cmd_download(args) -> int:
    from .checkpoint import ensure_downloaded
    try:
        path = ensure_downloaded(args.name)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    print(path)
    return 0


def cmd_convert(args) -> int:
    """Checkpoint to checkpoint, straight through the arrays (no model is built)."""
    import numpy as np
    from .checkpoint import load_checkpoint, save_hf_checkpoint
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npgpt", description="GPT-2 in NumPy with hand-written backward passes.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gradcheck", help="check every layer's backward and the whole model against finite differences")
    g.add_argument("--kernels", choices=["numpy", "numba", "both"], default="both",
                   help="which kernel backend to check (default both)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random test inputs (default 0)")
    g.set_defaults(func=cmd_gradcheck)

    i = sub.add_parser("info", help="show a checkpoint's config, parameter count, dtype and size")
    i.add_argument("path", help="a checkpoint path, or a model name already downloaded with `npgpt download`")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("download", help="download OpenAI's GPT-2 weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
    d.add_argument("name", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (or 124M, 355M, 774M, 1558M)")
    d.set_defaults(func=cmd_download)

    c = sub.add_parser("convert", help="convert a checkpoint (TensorFlow or safetensors, or a name) to npgpt's format")
    c.add_argument("src", help="the checkpoint to read: a path or a model name (downloaded if needed)")
    c.add_argument("dst", help="the directory to write (config.json + model.safetensors)")
    c.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    c.add_argument("--verify", action="store_true", help="check TensorFlow tensors' CRC-32C")
    c.set_defaults(func=cmd_convert)

    for module in ("cli_generate", "bench"):
        try:
            mod = __import__(f"npgpt.{module}", fromlist=["add_parser"])
        except ImportError:
            continue
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)
    return p


def one_line(msg) -> str:
    """A possibly multi-line message as one line."""
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runtime import keep_freed_memory
    keep_freed_memory()
    try:
        from . import kernels
        try:
            kernels.get_backend()            # a bad NPGPT_KERNELS is a user error, reported up front
        except ValueError as e:
            raise CLIError(str(e)) from None
        return args.func(args)
    except CLIError as e:
        print(f"npgpt {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"npgpt {args.command}: interrupted", file=sys.stderr)
        return 130
