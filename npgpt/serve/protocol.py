"""OpenAI's API as data: request bodies checked field by field, and the response and stream-chunk
objects built from the engine's events.

A request body is a JSON object. Each field npgpt knows is checked for its JSON type and range,
and a bad one is an APIError (HTTP 400) naming it in OpenAI's error object:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Fields npgpt does not know are ignored (as llama-server does; OpenAI's clients and UIs send
some, e.g. "user"); null means "the default". Known fields it cannot honour (suffix, best_of > n,
tools, logit_bias, a response_format other than text) are refused by name.

Sampling fields and defaults (OpenAI's; top_k, min_p and repetition_penalty (or llama-server's name for it,
repeat_penalty) as llama-server takes them):

    max_tokens         completions: 16; chat: the rest of the context (also max_completion_tokens)
    temperature  1     0 = greedy          top_p        1      (0, 1]
    top_k        0     0 = off             min_p        0      [0, 1]
    presence_penalty, frequency_penalty   0, in [-2, 2]        repetition_penalty   1 (off), in [0.01, 100]
    n            1     choices per prompt  seed         null   an int: the same text again
    stop         null  a string or up to 4 (not included in the text)
    stream       false stream_options {"include_usage": true}: a last chunk with the usage
    logprobs     completions: N in 0..20 (the top-N at each token); chat: true/false + top_logprobs N
    echo         false completions: the prompt before the text (with logprobs: the prompt's too)

The prompt of a completion may be a string, a list of strings, a list of token ids or a list of
such lists; a chat's messages are rendered by npgpt/serve/chat_format.py. A prompt must leave room
in the context for max_tokens (prompt + max_tokens <= n_ctx), and max_tokens may not exceed the
server's cap (--max-tokens).

Logprobs are the model's own distribution at each position (log-softmax of its logits, before
penalties, temperature and filters). Log-probabilities of -inf are sent as -9999.0 (JSON has no inf).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from ..inference.decode import check_token_ids, encode_prompt
from .chat_format import ROLES, STOPS, render
from .engine import Params

MAX_LOGPROBS = 20        # top-N per token (OpenAI: 20 for chat, 5 for completions; llama-server: more)
MAX_CHOICES = 64         # n times the number of prompts, per request
MAX_STOPS = 4
NEG_INF_LOGPROB = -9999.0


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, param=None, code=None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- field checks
def _json_type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _type_error(name, what, v):
    return APIError(400, f"Invalid type for '{name}': expected {what}, but got {_json_type(v)} instead.", name,
                    "invalid_type")


def _value_error(name, why):
    return APIError(400, f"Invalid value for '{name}': {why}", name, "invalid_value")


def _number(body, name, default, lo=-math.inf, hi=math.inf, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if type(v) not in (int, float):
        raise _type_error(name, "a number", v)
    try:
        v = float(v)                             # an int too large for a float overflows here
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]" if math.isfinite(hi) else f"{'>' if lo_open else '>='} {lo:g}"
        raise _value_error(name, f"expected a number {'in ' if math.isfinite(hi) else ''}{rng}, got {v!r}.")
    return float(v)


def _integer(body, name, default, lo, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if type(v) is not int:
        raise _type_error(name, "an integer", v)
    if v < lo or (hi is not None and v > hi):
        raise _value_error(name, f"expected an integer {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}, "
                                 f"got {v}.")
    return v


def _boolean(body, name, default):
    v = body.get(name)
    if v is None:
        return default
    if type(v) is not bool:
        raise _type_error(name, "a boolean", v)
    return v


def _stops(body) -> list:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", v)
    if len(stops) > MAX_STOPS:
        raise _value_error("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}.")
    if any(not s for s in stops):
        raise _value_error("stop", "stop strings must not be empty.")
    return stops


def _refuse_unsupported(body):
    for name, ok in (("suffix", lambda v: v in (None, "")), ("tools", lambda v: v in (None, [])),
                     ("functions", lambda v: v in (None, [])), ("logit_bias", lambda v: v in (None, {})),
                     ("best_of", lambda v: v is None or v == body.get("n", 1) or v == 1),
                     ("response_format", lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"))):
        if not ok(body.get(name)):
            raise APIError(400, f"'{name}' is not supported by this server.", name, "unsupported_parameter")


@dataclass
class Request:
    """A checked completion or chat request: token ids per prompt, and how to decode and answer."""
    chat: bool
    prompts: list            # [list of token ids]
    prompt_texts: list       # the prompts as text (echo)
    n: int
    params: Params
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    model: str | None = None
    continues: bool = False  # a chat that ends with an assistant message: its answer continues that text


MIN_TEMPERATURE = 1e-4     # below it a temperature is greedy (0)


def _sampling(body, max_tokens, stops, logprobs, prompt_logprobs) -> Params:
    top_k = _integer(body, "top_k", 0, 0, 1 << 31)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    if "repetition_penalty" not in body and "repeat_penalty" in body:     # llama-server's name for it
        body = dict(body, repetition_penalty=body["repeat_penalty"])
    rep = _number(body, "repetition_penalty", 1.0, 0.01, 100.0)     # beyond: logits overflow to inf
    seed = body.get("seed")
    if seed is not None and type(seed) is not int:
        raise _type_error("seed", "an integer", seed)
    temperature = _number(body, "temperature", 1.0, 0.0)
    if temperature < MIN_TEMPERATURE:            # logits / temperature would overflow: greedy, as 0 is
        temperature = 0.0
    return Params(max_tokens=max_tokens, temperature=temperature,
                  top_k=top_k or None, top_p=top_p if top_p < 1.0 else None, min_p=min_p or None,
                  repetition_penalty=rep if rep != 1.0 else None,
                  presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                  frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                  seed=None if seed is None else seed % 2**64, stop=stops, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)


def _max_tokens(body, default, prompts, n_ctx: int, cap: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _integer(body, name, None, 0)
    if asked is not None and asked > cap:
        raise _value_error(name, f"{asked} is more than this server allows (--max-tokens {cap}).")
    longest = max(len(p) for p in prompts)
    if longest > n_ctx or (longest == n_ctx and asked != 0):
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has {longest} "
                             f"tokens, which leaves no room for the completion. Please shorten the prompt.",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")
    if asked is None:
        return max(0, min(default, cap, n_ctx - longest))
    if longest + asked > n_ctx:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                             f"{longest + asked} tokens ({longest} in the prompt, {asked} for the completion). "
                             f"Please reduce the prompt or the completion length.", name, "context_length_exceeded")
    return asked


def _common(body):
    _refuse_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    include_usage = _boolean(opts or {}, "include_usage", False)
    return model, _integer(body, "n", 1, 1, MAX_CHOICES), _boolean(body, "stream", False), include_usage


def _prompt_ids(value, model, tokenizer, n_vocab: int, param: str) -> list:
    """Token ids of one prompt: text, or a list of token ids checked against the vocabulary."""
    try:
        if isinstance(value, str):
            if not value and tokenizer.eot_token is None:
                raise ValueError("the prompt is empty, and this model's tokenizer has no <|endoftext|> to start from")
            ids = encode_prompt(model, tokenizer, value)
        else:
            ids = list(value)
            if not ids:
                raise ValueError("a prompt of token ids is empty")
        check_token_ids(ids, n_vocab)
    except ValueError as e:
        raise APIError(400, str(e), param, "invalid_prompt") from None
    return ids


def parse_completion(body: dict, model, tokenizer, n_vocab: int, cap: int) -> Request:
    """POST /v1/completions' body -> Request (APIError when a field is wrong)."""
    name, n, stream, include_usage = _common(body)
    prompt = body.get("prompt")
    is_ids = lambda p: isinstance(p, list) and bool(p) and all(type(t) is int for t in p)   # noqa: E731
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    elif prompt is None:
        raise APIError(400, "'prompt' is required.", "prompt", "missing_required_parameter")
    else:
        raise _type_error("prompt", "a string, an array of strings, an array of token ids or an array of such "
                                    "arrays", prompt)
    if n * len(prompts) > MAX_CHOICES:
        raise _value_error("n", f"n times the number of prompts is {n * len(prompts)}; at most {MAX_CHOICES}.")
    ids = [_prompt_ids(p, model, tokenizer, n_vocab, "prompt") for p in prompts]
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _boolean(body, "echo", False)
    max_tokens = _max_tokens(body, 16, ids, model.config.n_ctx, cap)
    params = _sampling(body, max_tokens, _stops(body), logprobs, echo and logprobs is not None)
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    return Request(False, ids, texts, n, params, stream, include_usage, echo, name)


def _messages(body) -> list:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "'messages' is required.", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _type_error("messages", "a non-empty array of messages", msgs)
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, "an object", m)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _value_error(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}.")
        if isinstance(content, list):            # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _value_error(f"{where}.content", "only text content parts are supported.")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string or an array of text parts", content)
        out.append((role, content))
    return out


def parse_chat(body: dict, model, tokenizer, n_vocab: int, cap: int, chat_format: str) -> Request:
    """POST /v1/chat/completions' body -> Request (APIError when a field is wrong)."""
    name, n, stream, include_usage = _common(body)
    messages = _messages(body)
    text = render(messages, chat_format)
    ids = [_prompt_ids(text, model, tokenizer, n_vocab, "messages")]
    want = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise _value_error("top_logprobs", "'logprobs' must be true when 'top_logprobs' is given.")
    max_tokens = _max_tokens(body, cap, ids, model.config.n_ctx, cap)
    stops = _stops(body) + STOPS[chat_format]
    params = _sampling(body, max_tokens, stops, (top or 0) if want else None, False)
    return Request(True, ids, [text], n, params, stream, include_usage, False, name,
                   continues=messages[-1][0] == "assistant")


# ----------------------------------------------------------------------------- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def token_text(token_bytes: bytes) -> str:
    """A token as OpenAI writes it: its text, or "bytes:\\xNN..." when it is not whole UTF-8."""
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes)


def _lp(v):
    return NEG_INF_LOGPROB if v is None or not math.isfinite(v) else v


class Logprobs:
    """Builds the logprobs objects of both endpoints from the engine's (id, logprob, top) tuples."""

    def __init__(self, tokenizer):
        enc = getattr(tokenizer, "encoding", tokenizer)
        self.bytes_of = enc.decode_single_token_bytes

    def completion(self, tokens, offset: int) -> dict:
        """The legacy object {tokens, token_logprobs, top_logprobs, text_offset}; offset: where the
        first token's text starts in the choice's text."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp, top in tokens:
            text = token_text(self.bytes_of(tok))
            out["tokens"].append(text)
            out["token_logprobs"].append(None if lp is None else _lp(lp))
            out["top_logprobs"].append(None if top is None else
                                       {token_text(self.bytes_of(i)): _lp(v) for i, v in top})
            out["text_offset"].append(offset)
            offset += len(self.bytes_of(tok).decode("utf-8", errors="replace"))
        return out

    def chat(self, tokens) -> dict:
        """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}."""
        def entry(tok, lp):
            b = self.bytes_of(tok)
            return {"token": token_text(b), "logprob": _lp(lp), "bytes": list(b)}
        return {"content": [{**entry(tok, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for tok, lp, top in tokens], "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
