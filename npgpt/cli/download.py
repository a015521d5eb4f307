"""`npgpt download NAME`: fetch OpenAI's GPT-2 weights into the cache (resumable) and convert them once."""
from __future__ import annotations

from . import CLIError


def add_parser(sub):
    d = sub.add_parser("download", help="download OpenAI's GPT-2 weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
    d.add_argument("name", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (or 124M, 355M, 774M, 1558M)")
    d.set_defaults(func=run)


def run(args) -> int:
    from ..io import ensure_downloaded
    try:
        path = ensure_downloaded(args.name)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    print(path)
    return 0
