"""The `npgpt` command line. Each command is a module of this package (`npgpt/cli/<command>.py`)."""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# One module per command, each with add_parser(subparsers) and run(args). Imported eagerly: a broken
# import is a bug to see, not a command to hide.
COMMANDS = ("gradcheck", "info", "download", "convert", "generate", "train", "finetune", "classify", "bench")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    p = argparse.ArgumentParser(prog="npgpt", description="GPT-2 in NumPy with hand-written backward passes.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return p


def one_line(msg) -> str:
    """A possibly multi-line message as one line."""
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..runtime import keep_freed_memory
    keep_freed_memory()
    try:
        from .. import kernels
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
