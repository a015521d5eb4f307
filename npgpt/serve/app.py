"""The HTTP side of `npgpt serve`: OpenAI's endpoints as Starlette routes on uvicorn, in front of
one Engine (npgpt/serve/engine.py) that decodes every request's sequences together.

    GET  /                      the playground (npgpt/serve/playground.html)
    GET  /health                {"status": "ok", slots processing / idle, requests waiting}
    GET  /v1/models             the one model: its id, context length, chat format
    POST /v1/completions        prompt(s) -> text (npgpt/serve/protocol.py lists the fields)
    POST /v1/chat/completions   messages -> the assistant's answer

Each choice of a request (n per prompt) is one engine Sequence; its events come back through an
asyncio queue (the engine's thread hands them to the event loop). A non-streamed answer is built
when every choice has finished; a streamed one is Server-Sent Events as OpenAI sends them, one
`data: {chunk}` per piece of text (UTF-8 never split, stop strings never shown), then `data: [DONE]`.
A client that goes away (noticed within DISCONNECT_POLL_S, or at the next write) cancels its
sequences, which frees their cache rows before the engine's next step.

Errors are OpenAI's error object with an HTTP status: 400 for a malformed body or field, a prompt
too long for the context or max_tokens above the cap; 401 for a missing or wrong API key (compared
with hmac.compare_digest); 404 / 405 for an unknown route or method; 413 for a body over
MAX_BODY_BYTES; 500 when decoding fails (NaN weights, say). Nothing a request sends can stop the
server: every handler's failure is answered, and the engine's loop survives its sequences' errors.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import socket
import sys

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..inference.sampling import sample_seed
from . import protocol
from .chat_format import FORMATS
from .engine import Engine, Sequence
from .protocol import APIError

MAX_BODY_BYTES = 1 << 20          # 1 MiB: far more than a prompt of n_ctx tokens needs
DISCONNECT_POLL_S = 0.1
PLAYGROUND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground.html")


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class Service:
    """What the routes share: the engine, the model's description, the API key and the max_tokens cap."""

    def __init__(self, engine: Engine, model_id: str, chat_format: str, api_key=None, max_tokens=None,
                 weights: str = "fp32"):
        self.engine, self.model_id, self.chat_format, self.weights = engine, model_id, chat_format, weights
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.n_ctx = engine.model.config.n_ctx
        self.cap = self.n_ctx if max_tokens is None else int(max_tokens)
        self.logprobs = protocol.Logprobs(engine.tokenizer)
        with open(PLAYGROUND, encoding="utf-8") as f:
            self.playground = f.read()

    def check_key(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if not auth:
            raise APIError(401, "You didn't provide an API key. Send it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self.api_key):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def read_json(request: HTTPRequest) -> dict:
    """The request's body as a JSON object: 413 past MAX_BODY_BYTES (declared or sent), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"Invalid Content-Length header: {declared!r}.")
        if int(declared) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is {declared} bytes; the limit is {MAX_BODY_BYTES}.",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is over the limit of {MAX_BODY_BYTES} bytes.",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                            f"object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {protocol._json_type(body)}.",
                       code="invalid_json")
    return body


class Run:
    """One request's sequences, checked against the engine when made and queued in it by start(), and the
    queue their events arrive on."""

    def __init__(self, service: Service, req: protocol.Request):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine, self.req = service.engine, req
        self.seqs = []
        for i, ids in enumerate(req.prompts):
            for j in range(req.n):
                params = dataclasses.replace(req.params, seed=sample_seed(req.params.seed, j))
                index = i * req.n + j
                emit = (lambda ev, index=index: loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev)))
                self.seqs.append(Sequence(ids, params, emit))
        self.open = len(self.seqs)
        self.engine.check(self.seqs)           # before any response: a request that cannot run is an error

    def start(self) -> "Run":
        self.engine.submit(self.seqs)
        return self

    async def events(self, request: HTTPRequest):
        """(choice index, Event) until every choice has finished; ClientGone if the client left first."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while self.open:
            try:
                item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            if loop.time() - checked >= DISCONNECT_POLL_S:    # also while events flow
                checked = loop.time()
                if await request.is_disconnected():
                    raise ClientGone()
            if item is None:
                continue
            index, ev = item
            if ev.finish_reason or ev.error:
                self.open -= 1
            yield index, ev

    def cancel(self) -> None:
        self.engine.cancel([s for s in self.seqs if not s.finished])

    def usage(self) -> dict:
        return protocol.usage(sum(len(p) for p in self.req.prompts), sum(s.n_new for s in self.seqs))


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class Choice:
    """One choice's text and logprobs as its events arrive (with strip, as for a chat answer to a user's
    turn, its leading whitespace dropped; a continued assistant message keeps it)."""

    def __init__(self, strip: bool, echo_text: str = ""):
        self.text, self.tokens, self.finish_reason = echo_text, [], None
        self.started = not strip         # a stripped answer starts at its first non-space character
        self.fresh = True                # no event taken yet

    def add(self, ev) -> str:
        """Take an event; returns the new text it brings."""
        piece, self.fresh = ev.text, False
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        self.text += piece
        self.tokens += ev.tokens
        self.finish_reason = ev.finish_reason or self.finish_reason
        return piece


def create_app(service: Service) -> Starlette:
    """The Starlette application serving `service`."""

    def logprobs_of(req, tokens, offset):
        if req.params.logprobs is None:
            return None
        return service.logprobs.chat(tokens) if req.chat else service.logprobs.completion(tokens, offset)

    async def generate(request: HTTPRequest, chat: bool):
        service.check_key(request)
        body = await read_json(request)
        engine = service.engine
        args = (engine.model, engine.tokenizer, engine.n_vocab, service.cap)
        req = (protocol.parse_chat(body, *args, service.chat_format) if chat else
               protocol.parse_completion(body, *args))
        meta = {"id": protocol.new_id(chat), "created": protocol.now(), "model": req.model or service.model_id}
        run = Run(service, req)
        if req.stream:
            return StreamingResponse(stream(request, run, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        run.start()
        try:
            return JSONResponse(await answer(request, run, meta))
        except ClientGone:
            return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed"}}, 499)
        finally:
            run.cancel()

    async def answer(request, run, meta) -> dict:
        req = run.req
        echo = [req.prompt_texts[i // req.n] if req.echo else "" for i in range(len(run.seqs))]
        choices = [Choice(req.chat and not req.continues, e) for e in echo]
        prompt_lp = [[] for _ in choices]
        async for index, ev in run.events(request):
            if ev.error:
                raise APIError(500, f"decoding failed: {ev.error}", type="server_error")
            if ev.prompt_logprobs:
                prompt_lp[index] = ev.prompt_logprobs
            choices[index].add(ev)
        out = []
        for i, c in enumerate(choices):
            lp = logprobs_of(req, prompt_lp[i] + c.tokens, 0)
            if req.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
            else:
                out.append({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        kind = "chat.completion" if req.chat else "text_completion"
        return {**meta, "object": kind, "choices": out, "usage": run.usage()}

    async def stream(request, run, meta):
        # the sequences start here, as the response does: a client gone before it began (the server
        # then never runs this generator, or stops it before its first line) leaves nothing decoding
        req = run.start().req
        kind = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(index, text=None, lp=None, finish=None, role=False):
            if req.chat:
                delta = ({"role": "assistant", "content": ""} if role else
                         {} if text is None else {"content": text})
                c = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                c = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return _sse({**meta, "object": kind, "choices": [c]})

        choices = [Choice(req.chat and not req.continues) for _ in run.seqs]
        try:
            if req.chat:
                for i in range(len(choices)):
                    yield chunk(i, role=True)
            async for index, ev in run.events(request):
                if ev.error:
                    yield _sse(APIError(500, f"decoding failed: {ev.error}", type="server_error").body())
                    break
                c = choices[index]
                prefix = req.prompt_texts[index // req.n] if req.echo and c.fresh else ""   # echo: the prompt first
                offset = len(c.text)
                c.text += prefix
                text = prefix + c.add(ev)
                tokens = (ev.prompt_logprobs or []) + ev.tokens
                lp = logprobs_of(req, tokens, offset) if tokens else None
                if text or ev.finish_reason or lp:
                    yield chunk(index, text or (None if req.chat else ""), lp, ev.finish_reason)
            else:
                if req.include_usage:
                    yield _sse({**meta, "object": kind, "choices": [], "usage": run.usage()})
                yield b"data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            run.cancel()

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def models(request):
        service.check_key(request)
        return JSONResponse({"object": "list", "data": [{
            "id": service.model_id, "object": "model", "created": protocol.now(), "owned_by": "npgpt",
            "context_length": service.n_ctx, "max_tokens": service.cap, "weights": service.weights,
            "chat_format": service.chat_format, "chat_format_description": FORMATS[service.chat_format]}]})

    async def health(request):
        return JSONResponse({"status": "ok", **service.engine.load()})

    async def playground(request):
        return HTMLResponse(service.playground)

    async def api_error(request, e: APIError):
        return _error_response(e)

    async def http_error(request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        response = _error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                            code=kind))
        response.headers.update(e.headers or {})          # 405: Allow
        return response

    async def server_error(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    routes = [Route("/", playground), Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        Exception: server_error})


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); OSError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(service: Service, sock: socket.socket, out=sys.stdout) -> None:
    """Serve on the listening socket until Ctrl-C (or SIGTERM); prints where, once ready."""
    import uvicorn
    url = url_of(sock)
    e = service.engine
    print(f"npgpt serve: {service.model_id} ({service.weights}, {len(e.slots)} parallel, n_ctx {service.n_ctx}, "
          f"chat format {service.chat_format}{', API key required' if service.api_key else ''})", file=out)
    print(f"npgpt serve: listening on {url}  (OpenAI API: {url}/v1; playground: {url}/)", file=out, flush=True)
    if sock.getsockname()[0] not in ("127.0.0.1", "::1"):
        print("npgpt serve: reachable from other machines; use --api-key unless that is what you want",
              file=out, flush=True)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        e.stop()
