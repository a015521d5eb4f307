"""`npgpt generate`: continue a prompt with a GPT-2 model, streaming the text to stdout.

    npgpt generate --model gpt2 -n 100 --temperature 0.8 --top-k 40 --seed 0 "Once upon a time"
    echo "Once upon a time" | npgpt generate --stop '\\n\\n' --stats

The prompt is printed first and then the continuation, token by token, never splitting a UTF-8
character (as llama.cpp's CLI and nanoGPT's sample.py do); --no-echo prints only the continuation.
The output ends with a newline. Generation ends at <|endoftext|>, at a --stop string (not printed) or after -n tokens.
--stats first loads the kernels with a one-token warm-up (timed), then prints, to stderr, the
prompt's tokens/s, the time to the first token and the generation tokens/s. User errors (bad
option values, a model that cannot be loaded, a prompt the model's vocabulary cannot hold) print
one line to stderr and exit with status 2.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from . import CLIError, say_if_compiling


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="continue a prompt with a GPT-2 model, streaming text to stdout",
        description="Continue a prompt with a GPT-2 model (KV-cached decoding), streaming the continuation "
                    "to stdout. The prompt is read from stdin when not given.")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt text (default: read stdin; one trailing newline is dropped)")
    p.add_argument("--model", default="gpt2",
                   help="a model name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a checkpoint path (default gpt2)")
    add_sampling_args(p, n=200, temperature=0.8)
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop at this string (not printed); repeatable; backslash escapes such as \\n work")
    p.add_argument("--no-echo", action="store_true", help="print only the new text, not the prompt before it")
    p.add_argument("--stats", action="store_true", help="print prompt and generation speed to stderr")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="N continuations, one after another (sample i draws with seed [SEED, i]; default 1)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="after the text, each new token's log-probability and the N most likely tokens there")
    p.set_defaults(func=run)
    return p


def add_sampling_args(p, n: int, temperature: float):
    """--weights, -n, --temperature, --top-k, --top-p, --seed, --repetition-penalty, --min-p, --presence-penalty,
    --frequency-penalty (generate and chat), checked by _check_args; sampler_from_args builds their Sampler."""
    p.add_argument("--weights", choices=["fp32", "bf16", "int8"], default=None,
                   help="pack the weights for faster decoding: bf16 (2 bytes a weight) or int8 (1 byte, per-channel "
                        "scales); default: as the checkpoint stores them (fp32, or a quantized checkpoint's own)")
    p.add_argument("-n", "--max-new-tokens", dest="n", type=int, default=n, help=f"tokens to generate (default {n})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling (default: random)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="CTRL repetition penalty, e.g. 1.2 (default off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than min_p times the best "
                                                            "one; 0 = off (default 0)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's: subtract this from the logit of every token generated so far (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's: subtract this times its count from each generated token's logit (default 0)")


def _unescape(s: str) -> str:
    """'\\n' -> newline etc., leaving non-ASCII characters alone."""
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _check_args(args):
    if args.n < 0:
        raise CLIError(f"-n must be >= 0, got {args.n}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not (math.isfinite(args.repetition_penalty)
                                                    and args.repetition_penalty > 0):
        raise CLIError(f"--repetition-penalty must be a finite number > 0, got {args.repetition_penalty}")
    if args.seed is not None and args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if not 0.0 <= args.min_p <= 1.0:
        raise CLIError(f"--min-p must be in [0, 1], got {args.min_p}")
    for flag in ("presence_penalty", "frequency_penalty"):
        v = getattr(args, flag)
        if not (math.isfinite(v) and -2.0 <= v <= 2.0):
            raise CLIError(f"--{flag.replace('_', '-')} must be in [-2, 2], got {v}")
    if getattr(args, "samples", 1) < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if getattr(args, "logprobs", None) is not None and args.logprobs < 0:
        raise CLIError(f"--logprobs must be >= 0, got {args.logprobs}")
    stops = []
    for s in args.stop:
        try:
            stops.append(_unescape(s))
        except UnicodeDecodeError as e:
            raise CLIError(f"--stop '{s}': bad backslash escape ({e.reason})") from None
    if any(not s for s in stops):
        raise CLIError("--stop strings must not be empty")
    if not args.model.strip():
        raise CLIError("--model is empty: give a model name (gpt2, ...) or a checkpoint path")
    return stops


def sampler_from_args(args, seed=None, logprobs=None):
    """The Sampler the sampling flags describe (top-k 0 and top-p 1 mean off), drawing with seed."""
    from ..inference.sampling import Sampler
    return Sampler(args.temperature, args.top_k or None, args.top_p if args.top_p < 1.0 else None,
                   args.repetition_penalty, seed, args.min_p or None, args.presence_penalty, args.frequency_penalty,
                   logprobs)


def _stdin(hint: str):
    """sys.stdin, or one line when the process was started with stdin closed (`npgpt ... <&-`)."""
    if sys.stdin is None:
        raise CLIError(f"stdin is closed: {hint}")
    return sys.stdin


def _load_model(name_or_path, weights=None, decoding=False):
    """decoding: as the commands that generate text hold a model: a LoRA adapter merged (one plain weight per
    layer), float32 weights laid out for decoding (npgpt.inference.quant.decode_layout)."""
    from ..inference.quant import decode_layout
    from ..io.pretrained import load_model
    from ..layers.lora import lora_layers, merge
    try:
        model = load_model(name_or_path, weights=weights)
        if decoding and lora_layers(model):
            merge(model)
        return decode_layout(model) if decoding else model
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot load model {name_or_path}: {str(e) or type(e).__name__}") from None


def _tokenizer_for(path):
    """The tokenizer a training run saved beside its model (npgpt train: DIR/npgpt_tokenizer.json), else None."""
    from ..io import resolve_run_dir
    from ..tokens.tokenizers import find_tokenizer
    for d in (path, resolve_run_dir(path)):
        if os.path.isdir(d):
            try:
                tok = find_tokenizer(d)
            except (OSError, ValueError) as e:
                raise CLIError(str(e)) from None
            if tok is not None:
                return tok
    return None


def _write(stream, text: str):
    try:
        stream.write(text)
    except UnicodeEncodeError:   # a terminal that cannot show some character
        enc = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(enc, errors="replace").decode(enc))
    stream.flush()


def run(args) -> int:
    """User errors raise CLIError, which `npgpt.cli.main` prints as one line (exit status 2)."""
    from ..inference.decode import encode_prompt
    from ..inference.sampling import sample_seed
    from ..tokens.bpe import get_tokenizer

    stops = _check_args(args)
    prompt = args.prompt
    if prompt is None:
        prompt = _stdin("give the prompt as an argument, or pipe it in").read()
        if prompt.endswith("\n"):
            prompt = prompt[:-1]
    if args.n > 1:                       # a decoded token after the prompt's: the compiled blocks run
        say_if_compiling("generate")
    model = _load_model(args.model, getattr(args, "weights", None), decoding=True)
    tokenizer = _tokenizer_for(args.model) or get_tokenizer()
    if not prompt and tokenizer.eot_token is None:
        raise CLIError("a character-level model has no <|endoftext|> to start from: give a prompt")
    try:
        ids = encode_prompt(model, tokenizer, prompt)
    except ValueError as e:
        raise CLIError(str(e)) from None

    out = sys.stdout
    t_warm = None
    if args.stats:   # load the kernels (Numba's cache) first, so the prompt's tokens/s is the prefill's own
        from ..inference.kvcache import KVCache
        t_warm = time.perf_counter()
        model.forward_cached(np.zeros((1, 1), dtype=np.int64), KVCache.for_model(model, 1))
        t_warm = time.perf_counter() - t_warm
        print(f"kernels loaded and one warm-up token in {t_warm:.3f} s", file=sys.stderr)
    for i in range(args.samples):
        if i:
            _write(out, "---\n")
        sampler = sampler_from_args(args, sample_seed(args.seed, i), args.logprobs)
        drawn, times = _sample(model, tokenizer, ids, "" if args.no_echo else prompt, stops, args, sampler, out)
        if args.logprobs is not None:
            _write_logprobs(out, tokenizer, drawn)
        if args.stats:
            _print_stats(len(ids), len(drawn), *times)
    return 0


def _sample(model, tokenizer, ids, echo: str, stops, args, sampler, out):
    """Print echo, then stream one continuation of ids to out -> ([(token, TopLogprobs | None)] drawn,
    (t0, t_first, t_end))."""
    from ..inference.decode import TextStreamer, stream_tokens
    eos_id = tokenizer.eot_token
    streamer = TextStreamer(tokenizer, stops)
    drawn, t_first = [], None
    t0 = time.perf_counter()
    tokens = stream_tokens(model, ids, args.n, eos_id=eos_id, n_vocab=tokenizer.n_vocab, sampler=sampler)
    _write(out, echo)
    try:
        for t in tokens:
            if t_first is None:
                t_first = time.perf_counter()
            drawn.append((t, sampler.last))
            if t == eos_id:
                break
            piece = streamer.push(t)
            if piece:
                _write(out, piece)
            if streamer.stopped:
                break
    except FloatingPointError as e:            # NaN weights: no text from NaN logits
        raise CLIError(f"--model {args.model}: {e}") from None
    tokens.close()
    t_end = time.perf_counter()
    _write(out, streamer.finish() + "\n")
    return drawn, (t0, t_first, t_end)


def _write_logprobs(out, tokenizer, drawn):
    """One line a drawn token: the token, its log-probability, then the most likely tokens with theirs."""
    from ..serve.protocol import token_text
    name = lambda t: json.dumps(token_text(tokenizer.encoding.decode_single_token_bytes(int(t))))   # noqa: E731
    _write(out, "# token\tlogprob\tthe most likely tokens there, best first\n")
    for t, top in drawn:
        alts = "\t".join(f"{name(i)} {v:.4f}" for i, v in zip(top.ids[0], top.values[0]))
        _write(out, f"{name(t)}\t{top.chosen[0]:.4f}" + (f"\t{alts}" if alts else "") + "\n")


def _print_stats(P: int, n_new: int, t0, t_first, t_end):
    err = sys.stderr
    if t_first is None:
        print(f"prompt: {P} tokens; nothing generated (-n 0)", file=err)
        return
    t_pre = t_first - t0
    print(f"prompt: {P} tokens in {t_pre:.3f} s ({P / t_pre:.1f} tokens/s)", file=err)
    print(f"time to first token: {t_pre:.3f} s after the warm-up", file=err)
    t_gen = t_end - t_first
    rate = f"{(n_new - 1) / t_gen:.1f} tokens/s" if n_new > 1 and t_gen > 0 else "n/a"
    print(f"generation: {n_new} tokens, {n_new - 1} after the first in {t_gen:.3f} s ({rate})", file=err)
