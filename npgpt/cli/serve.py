"""`npgpt serve`: an OpenAI-compatible HTTP server for one model (npgpt/serve/).

    npgpt serve --model gpt2                                   # http://127.0.0.1:8000/v1
    npgpt serve --model runs/instruct --weights int8 --parallel 8 --api-key "$KEY" --port 8080

It loads the model, compiles and warms the decoding kernels, binds (127.0.0.1 unless --host says
otherwise; --port 0 takes a free port), prints the URL, and serves until Ctrl-C. Needs the serve
extra (pip install 'npgpt[serve]': Starlette and uvicorn). User errors (a model that cannot be
loaded, a port in use, bad flag values) print one line and exit with status 2.
"""
from __future__ import annotations

import os

from . import CLIError

API_KEY_ENV = "NPGPT_API_KEY"


def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) for one model",
        description="Serve one model over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models) with "
                    "streaming, continuous batching of up to --parallel sequences, and a playground page at /.")
    p.add_argument("--model", default="gpt2",
                   help="a model name (gpt2, gpt2-medium, ...) or a checkpoint / run directory (default gpt2)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8"], default=None,
                   help="pack the weights for faster decoding (as npgpt generate --weights)")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="sequences decoded together in one batched step; more requests wait in a queue (default 4)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="CAP",
                   help="the most tokens one completion may ask for (default: the model's context length)")
    p.add_argument("--chat-format", choices=["auto", "instruct", "transcript"], default="auto",
                   help="how chat messages become a prompt: instruct (npgpt finetune instruct's format), "
                        "transcript (a base model), or auto: instruct for an instruct run, else transcript")
    p.set_defaults(func=run)
    return p


def _check_args(args):
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    if args.parallel < 1:
        raise CLIError(f"--parallel must be >= 1, got {args.parallel}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.api_key is not None and not args.api_key.strip():
        raise CLIError(f"--api-key (or ${API_KEY_ENV}) is empty")
    if args.api_key is not None and (args.api_key != args.api_key.strip() or any(c.isspace() for c in args.api_key)):
        raise CLIError(f"--api-key (or ${API_KEY_ENV}) holds whitespace, which no Authorization header can carry")
    if not args.model.strip():
        raise CLIError("--model is empty: give a model name (gpt2, ...) or a checkpoint path")


def run(args) -> int:
    _check_args(args)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CLIError(f"npgpt serve needs the serve extra ({e.name} is not installed): "
                       f"pip install 'npgpt[serve]'") from None
    import numpy as np

    from ..serve import app, chat_format
    from ..serve.engine import Engine
    from ..tokens.bpe import get_tokenizer
    from .generate import _load_model, _tokenizer_for

    model = _load_model(args.model, args.weights, decoding=True)     # a LoRA adapter merged: one plain weight a layer
    tokenizer = _tokenizer_for(args.model) or get_tokenizer()
    ctx = model.config.n_ctx
    if args.max_tokens is not None and args.max_tokens > ctx:
        raise CLIError(f"--max-tokens {args.max_tokens} is more than the model's context of {ctx} tokens")
    fmt = chat_format.detect(args.model) if args.chat_format == "auto" else args.chat_format
    try:
        sock = app.listen(args.host, args.port)
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    engine = Engine(model, tokenizer, args.parallel)
    with sock:
        try:                                # compile and load the kernels before saying "ready"
            engine.step.prefill(engine.cache, 0, np.zeros(1, np.int64))
            engine.step(engine.cache, [0], [0])
        except FloatingPointError as e:
            raise CLIError(f"--model {args.model}: {e}") from None
        engine.cache.reset()
        engine.start()
        model_id = os.path.basename(os.path.normpath(args.model)) or args.model
        service = app.Service(engine, model_id, fmt, args.api_key, args.max_tokens, model.weight_format)
        app.run_server(service, sock)
    return 0
