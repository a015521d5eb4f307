"""`npgpt chat --model DIR`: ask an instruction-tuned GPT (npgpt finetune instruct) questions.

    npgpt chat --model runs/instruct
    printf 'Name the capital of France.\\nWhat is 2 + 2?\\n' | npgpt chat --model runs/instruct

Each line read is one instruction: it is wrapped in the prompt format the model was trained on
(the Alpaca format, instruction only, no input; npgpt/finetune/instruct.py) and the answer is streamed
as it is decoded, without the prompt and without surrounding whitespace, then a newline. An answer
ends at <|endoftext|>, at "\\n\\n### " (the model starting a new section) or after -n tokens. Every
question is answered on its own: no earlier turn is fed back. Decoding is greedy unless
--temperature > 0 (then --top-k / --top-p / --min-p / --seed apply as in `npgpt generate`; with --seed
every answer starts from that seed); the repetition, presence and frequency penalties apply either way.

On a terminal it shows a "> " prompt; Ctrl-C stops an answer, Ctrl-D (or Ctrl-C at the prompt)
ends. With stdin piped in it reads one question per line (empty lines are skipped), prints each
answer, and ends at EOF.
"""
from __future__ import annotations

import sys

from . import CLIError, say_if_compiling
from .generate import add_sampling_args

STOP = "\n\n### "


def add_parser(subparsers):
    p = subparsers.add_parser(
        "chat", help="ask an instruction-tuned model questions (interactive, or one per line of stdin)",
        description="Answer instructions with a model from `npgpt finetune instruct`: each line of input is "
                    "wrapped in the training prompt format and its answer is streamed. Reads a terminal "
                    "interactively, or one question per line of piped stdin, until EOF.")
    p.add_argument("--model", required=True, help="an instruction fine-tuning run directory, or any checkpoint")
    add_sampling_args(p, n=256, temperature=0.0)                # as npgpt generate, greedy by default
    p.set_defaults(func=run, stop=[])
    return p


def _questions(interactive: bool):
    """The non-empty lines of stdin, stripped; a terminal gets a "> " prompt (and line editing)."""
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        line = line.strip()
        if line:
            yield line


def answer(model, tokenizer, question: str, max_new_tokens: int, temperature: float = 0.0, top_k=None,
           top_p=None, seed=None, repetition_penalty=None, sampler=None):
    """Yield the answer to one question as text pieces: the continuation of its prompt, streamed, with
    leading and trailing whitespace held back (the pieces join to generate_text(...).strip()). sampler:
    a Sampler instead of temperature .. repetition_penalty (npgpt.inference.decode.generate)."""
    from ..inference.decode import stream_text
    from ..finetune.instruct import format_prompt
    pieces = stream_text(model, tokenizer, format_prompt({"instruction": question}), max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         repetition_penalty=repetition_penalty, stop=[STOP], sampler=sampler)
    started, held = False, ""
    try:
        for piece in pieces:
            if not started:
                piece = piece.lstrip()
                if not piece:
                    continue
                started = True
            text = held + piece
            body = text.rstrip()
            held = text[len(body):]
            if body:
                yield body
    finally:
        pieces.close()


def run(args) -> int:
    from ..tokens.bpe import get_tokenizer
    from .generate import _check_args, _load_model, _stdin, _write, sampler_from_args

    _check_args(args)
    _stdin("pipe the questions in, one a line, or run chat on a terminal")   # before the model loads
    say_if_compiling("chat")
    model = _load_model(args.model, args.weights, decoding=True)
    if model.config.n_vocab < 50257:
        raise CLIError(f"--model {args.model}: its vocabulary has {model.config.n_vocab} tokens; "
                       "chat speaks GPT-2 BPE (50257)")
    tokenizer = get_tokenizer()
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"npgpt chat: {args.model}; one instruction per line; Ctrl-D ends", file=sys.stderr)
    out = sys.stdout
    for question in _questions(interactive):
        pieces = answer(model, tokenizer, question, args.n, sampler=sampler_from_args(args, args.seed))
        try:
            for piece in pieces:
                _write(out, piece)
        except FloatingPointError as e:        # NaN weights: no text from NaN logits
            raise CLIError(f"--model {args.model}: {e}") from None
        except KeyboardInterrupt:
            if not interactive:
                raise
            _write(out, " [stopped]")
        finally:
            pieces.close()
        _write(out, "\n")
    return 0
