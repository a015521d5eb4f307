"""`npgpt serve` over HTTP: the server runs as `python -m npgpt serve` on 127.0.0.1 (a free port) and is
driven with the official `openai` client (and httpx for what a client library would not send).

Two servers, each started once for the module:
  - "tiny": tests/fixtures/tiny_hf (101 tokens, n_ctx 32), --parallel 8, an API key and --max-tokens 24:
    completions, greedy vs `npgpt generate`, n, seeds, logprobs, stop, echo, concurrency, errors;
  - "bytes": a GPT with GPT-2's whole vocabulary (n_ctx 512) whose next token is, at every position,
    the byte 0xC3 (logit 30) or 0xA9 (logit 29) and almost never anything else: sampled, it writes
    "é" (C3 A9) and invalid bytes in a random mix, so a stream that split a UTF-8 character would show;
    chat in the instruct format, long generations (a client leaving mid-stream).
The playground is tested in headless Chromium, driven over the DevTools protocol (websockets).
"""
import base64
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import npgpt  # noqa: E402
from npgpt.finetune.instruct import format_prompt  # noqa: E402
from npgpt.inference.sampling import log_softmax  # noqa: E402
from npgpt.tokens.bpe import get_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_hf")
KEY = "sk-test-0123456789"
PROMPT = "1+1=2"                 # GPT-2 ids [16, 10, 16, 28, 17], all < 101


def env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]]
                                                                   if os.environ.get("PYTHONPATH") else [])))


class Server:
    """`python -m npgpt serve ARGS --port 0` in a subprocess; .url once it says where it listens."""

    def __init__(self, log_path, *args):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "npgpt", "serve", "--port", "0", *args], cwd=ROOT,
                                     env=env(), stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines = queue.Queue()
        self.banner = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.time() + 180
        self.url = None
        while self.url is None:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                self.close()
                raise RuntimeError(f"npgpt serve did not start; log: {open(log_path).read()}") from None
            self.banner.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            self.url = m.group(1) if m else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "tiny.log", "--model", TINY, "--parallel", "8", "--api-key", KEY,
               "--max-tokens", "24")
    yield s
    s.close()


def byte_model(path):
    """The "bytes" model (see the module docstring), saved to path."""
    tok = get_tokenizer()
    c3, a9 = (tok.encoding.encode_single_token(bytes([b])) for b in (0xC3, 0xA9))
    cfg = npgpt.GPTConfig(n_vocab=50257, n_ctx=512, n_embd=32, n_head=2, n_layer=2)
    model = npgpt.GPT(cfg, dtype=np.float32, seed=0)
    wte = model.wte.weight.data
    wte[[c3, a9]] = 0.0
    wte[c3, 0] = wte[a9, 1] = 1.0
    model.ln_f.weight.data[:] = 0.0                  # ln_f(x) = its bias, whatever x
    model.ln_f.bias.data[:] = 0.0
    model.ln_f.bias.data[:2] = [30.0, 29.0]          # logits: C3 30, A9 29, any other ~N(0, 0.8)
    npgpt.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def bytes_server(tmp_path_factory):
    d = byte_model(str(tmp_path_factory.mktemp("bytes_model")))
    s = Server(tmp_path_factory.mktemp("serve") / "bytes.log", "--model", d, "--parallel", "2",
               "--chat-format", "instruct")
    yield s
    s.close()


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def cli_generate(*args):
    r = subprocess.run([sys.executable, "-m", "npgpt", "generate", "--model", TINY, *args], capture_output=True,
                       text=True, encoding="utf-8", cwd=ROOT, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout[:-1]                            # generate ends its output with a newline


# ----------------------------------------------------------------------------- basics
def test_binds_localhost_says_where_and_describes_the_model(tiny, bytes_server):
    assert tiny.url.startswith("http://127.0.0.1:") and "API key required" in "".join(tiny.banner)
    models = client(tiny).models.list()
    assert [m.id for m in models.data] == ["tiny_hf"]
    raw = httpx.get(tiny.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert raw["context_length"] == 32 and raw["chat_format"] == "transcript" and raw["max_tokens"] == 24
    assert httpx.get(bytes_server.url + "/v1/models").json()["data"][0]["chat_format"] == "instruct"
    h = tiny.health()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 8


def test_greedy_completion_equals_npgpt_generate(tiny):
    expected = cli_generate("-n", "16", "--temperature", "0", "--no-echo", PROMPT)
    # the server decodes with batch-invariant kernels, generate with BLAS: the same tokens follow as long as
    # no greedy choice is closer than rounding (~1e-6); check that it is not (tiny_hf's gaps are > 0.02)
    model, ids = npgpt.load_model(TINY), [16, 10, 16, 28, 17]
    tokens = npgpt.generate(model, np.array(ids), 16)[0]
    logits = model.forward(tokens[None])[0, len(ids) - 1:-1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3
    c = client(tiny)
    r = c.completions.create(model="anything-at-all", prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == expected and len(expected) > 0
    assert r.choices[0].finish_reason == "length" and r.model == "anything-at-all"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 16, 21)
    chunks = list(c.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == expected and len([ch for ch in chunks if ch.choices]) > 2
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_sse_wire_format(tiny):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode("utf-8")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: {") and json.loads(e[6:])["object"] == "text_completion"


def test_n_choices_and_seeds(tiny):
    c = client(tiny)
    kw = dict(model="m", prompt=PROMPT, max_tokens=12, temperature=1.0)
    a = c.completions.create(n=2, seed=7, **kw)
    b = c.completions.create(n=2, seed=7, **kw)
    assert sorted(ch.index for ch in a.choices) == [0, 1]
    texts = [ch.text for ch in sorted(a.choices, key=lambda ch: ch.index)]
    assert texts == [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]     # the same seed, the same text
    assert texts[0] != texts[1]                                                       # each choice its own stream
    assert c.completions.create(seed=7, **kw).choices[0].text == texts[0]              # choice 0 = a plain seeded run
    assert c.completions.create(seed=8, **kw).choices[0].text != texts[0]
    assert a.usage.prompt_tokens == 5 and a.usage.completion_tokens == 24
    both = c.completions.create(model="m", prompt=[PROMPT, "2+2=4"], n=2, max_tokens=3, temperature=0)
    assert len(both.choices) == 4 and both.choices[0].text == both.choices[1].text != both.choices[2].text


def test_logprobs_are_the_models_own(tiny):
    r = client(tiny).completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    raw = [token_bytes(t) for t in lp.tokens]
    assert b"".join(raw).decode("utf-8", errors="replace") == r.choices[0].text
    model, tok = npgpt.load_model(TINY), get_tokenizer()
    ids = tok.encode(PROMPT) + [tok.encoding.encode_single_token(t) for t in raw]
    ref = log_softmax(model.forward(np.array([ids]))[0])[4:-1]                  # (6, V): predicting the new tokens
    for i, (t, v, top) in enumerate(zip(ids[5:], lp.token_logprobs, lp.top_logprobs)):
        assert len(top) == 3 and v == max(top.values())                           # greedy: the chosen is the best
        np.testing.assert_allclose(v, ref[i, t], atol=1e-4)
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(ref[i])[::-1][:3], atol=1e-4)
    echo = client(tiny).completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    e = echo.choices[0]
    assert e.text == PROMPT and e.logprobs.tokens == ["1", "+", "1", "=", "2"] and e.logprobs.token_logprobs[0] is None
    prompt_ref = log_softmax(model.forward(np.array([ids[:5]]))[0])[np.arange(4), ids[1:5]]
    np.testing.assert_allclose(e.logprobs.token_logprobs[1:], prompt_ref, atol=1e-4)


def test_stop_and_echo(tiny):
    c = client(tiny)
    full = c.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full[4:6]
    r = c.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "never"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="m", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]
    assert c.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0,
                                echo=True).choices[0].text == PROMPT + full


def test_api_key_refused_and_accepted(tiny):
    with pytest.raises(openai.AuthenticationError):
        client(tiny, key="sk-wrong").completions.create(model="m", prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        client(tiny, key=KEY + "x").models.list()
    r = httpx.post(tiny.url + "/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client(tiny).completions.create(model="m", prompt=PROMPT, max_tokens=1).choices[0].text
    assert httpx.get(tiny.url + "/health").status_code == 200                      # no key needed there


# ----------------------------------------------------------------------------- continuous batching
PROMPTS = ["1+1=2", "2+2=4", "3", "9-9", "=1=", "[1]", "1+2+3=6", "x=y"]       # each token id < 101


def test_concurrent_streams_get_what_they_get_alone(tiny):
    c = client(tiny)
    tok = get_tokenizer()
    jobs = [(p, 26 - len(tok.encode(p)) - 2 * i) for i, p in enumerate(PROMPTS)]        # 8 different lengths

    def run(prompt, n):
        pieces = [ch.choices[0].text for ch in c.completions.create(model="m", prompt=prompt, max_tokens=n,
                                                                    temperature=0, stream=True)]
        return "".join(pieces)
    alone = [run(p, n) for p, n in jobs]
    before = tiny.health()
    barrier, out = threading.Barrier(len(jobs)), [None] * len(jobs)

    def worker(i):
        barrier.wait()
        out[i] = run(*jobs[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = tiny.health()
    assert out == alone and all(alone)
    steps, rows = after["decode_steps"] - before["decode_steps"], after["decoded_rows"] - before["decoded_rows"]
    assert rows > 1.5 * steps                      # the requests really shared steps


# ----------------------------------------------------------------------------- bad requests
BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": PROMPT, "temperature": "hot"}), 400, "temperature"),
    (json.dumps({"prompt": PROMPT, "max_tokens": 2.5}), 400, "max_tokens"),
    (json.dumps({"prompt": PROMPT, "n": True}), 400, "n"),
    (json.dumps({"prompt": PROMPT, "stream": "yes"}), 400, "stream"),
    (json.dumps({"prompt": PROMPT, "stop": 5}), 400, "stop"),
    (json.dumps({"prompt": PROMPT, "top_p": 0}), 400, "top_p"),
    (json.dumps({"prompt": PROMPT, "logprobs": 99}), 400, "logprobs"),
    (json.dumps({"prompt": PROMPT, "seed": "x"}), 400, "seed"),
    (json.dumps({"prompt": 12}), 400, "prompt"),
    (json.dumps({"max_tokens": 2}), 400, "prompt"),
    (json.dumps({"prompt": "1+" * 20}), 400, "prompt"),                      # 40 tokens: longer than the context (32)
    (json.dumps({"prompt": PROMPT, "max_tokens": 25}), 400, "max_tokens"),   # above --max-tokens 24
    (json.dumps({"prompt": "1+" * 10, "max_tokens": 20}), 400, "max_tokens"),  # prompt + max_tokens > 32
    (json.dumps({"prompt": [7, 500]}), 400, "prompt"),                       # a token outside the vocabulary
    (json.dumps({"prompt": PROMPT, "suffix": "x"}), 400, "suffix"),
    (json.dumps({"prompt": PROMPT, "max_tokens": 1, "x": " " * (1 << 20)}), 413, None),
    (json.dumps({"prompt": PROMPT, "top_k": 10 ** 400}), 400, "top_k"),        # an int no float holds
    (json.dumps({"prompt": PROMPT, "temperature": 10 ** 400}), 400, "temperature"),
    (json.dumps({"prompt": PROMPT, "repetition_penalty": 1e-300}), 400, "repetition_penalty"),
    (b"[" * 100_000, 400, None),                                              # nested past Python's recursion limit
]


@pytest.mark.parametrize("body, status, param", BAD, ids=range(len(BAD)))
def test_bad_request_status_and_the_server_serves_on(tiny, body, status, param):
    r = httpx.post(tiny.url + "/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert (err["code"] == "context_length_exceeded") == ("1+1+" in str(body))
    assert client(tiny).completions.create(model="m", prompt=PROMPT, max_tokens=1).choices[0].text
    assert tiny.alive()


def test_chat_field_errors_routes_and_a_chunked_oversized_body(tiny, bytes_server):
    url = bytes_server.url
    for body, param in (({"messages": "hi"}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                             "messages[0].role"),
                        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs")):
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert httpx.get(url + "/v1/nothing").status_code == 404
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json() and "POST" in r.headers["allow"]

    def chunks():                                        # no Content-Length: the limit is counted as it comes
        for _ in range(20):
            yield b" " * 100_000
    r = httpx.post(url + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert bytes_server.alive() and tiny.alive()


def wait_idle(server):
    deadline = time.time() + 10
    while server.health()["slots_processing"] and time.time() < deadline:
        time.sleep(0.05)
    return server.health()


def test_a_client_leaving_mid_stream_frees_its_row(bytes_server):
    before = bytes_server.health()
    body = {"prompt": "x", "max_tokens": 500, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", bytes_server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
    after = wait_idle(bytes_server)                      # the connection was closed, mid-stream
    assert after["slots_processing"] == 0
    assert after["decoded_rows"] - before["decoded_rows"] < 450      # stopped well before its 500 tokens
    assert client(bytes_server).completions.create(model="m", prompt="x", max_tokens=3).choices[0].text


def test_a_client_leaving_before_its_answer_frees_its_row(bytes_server):
    before = bytes_server.health()
    with pytest.raises(httpx.ReadTimeout):                # not streamed: the client gives up waiting
        httpx.post(bytes_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 500}, timeout=0.3)
    after = wait_idle(bytes_server)
    assert after["slots_processing"] == 0 and after["decoded_rows"] - before["decoded_rows"] < 450


# ----------------------------------------------------------------------------- UTF-8 and chat
def token_bytes(t: str) -> bytes:
    """A logprobs token string back to its bytes ("bytes:\\xc3" for a token that is not whole UTF-8)."""
    if t.startswith("bytes:"):
        return bytes(int(h, 16) for h in t[6:].split("\\x")[1:])
    return t.encode("utf-8")


def test_streamed_utf8_is_never_split(bytes_server):
    stream = client(bytes_server).completions.create(model="m", prompt="x", max_tokens=60, temperature=1.0, seed=3,
                                                     logprobs=0, stream=True)
    text, raw = "", b""
    for ch in stream:
        text += ch.choices[0].text
        raw += b"".join(token_bytes(t) for t in (ch.choices[0].logprobs.tokens if ch.choices[0].logprobs else []))
    assert set(raw) == {0xC3, 0xA9} and len(raw) == 60
    assert text == raw.decode("utf-8", errors="replace")        # what decoding all the bytes at once gives
    assert "é" in text and "\ufffd" in text                      # whole characters across tokens, and invalid bytes


def test_chat_in_the_instruct_format(bytes_server):
    c = client(bytes_server)
    question = "Name the capital of France."
    msgs = [{"role": "user", "content": question}]
    r = c.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0.7, seed=1)
    assert r.usage.prompt_tokens == len(get_tokenizer().encode(format_prompt({"instruction": question})))
    m = r.choices[0]
    assert m.message.role == "assistant" and m.finish_reason == "length" and r.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0.7, seed=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == m.message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
    lp = c.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                   top_logprobs=2).choices[0].logprobs.content
    assert len(lp) == 4 and all(e.token == "bytes:\\xc3" and e.bytes == [0xC3] for e in lp)
    assert [t.bytes for t in lp[0].top_logprobs] == [[0xC3], [0xA9]]
    np.testing.assert_allclose(lp[0].logprob, -np.log1p(np.exp(-1.0)), atol=1e-3)   # C3 vs A9: logits 30 and 29
    two = c.chat.completions.create(model="m", messages=msgs + [{"role": "assistant", "content": "Paris"},
                                                                {"role": "user", "content": "And Spain?"}],
                                    max_tokens=2)
    assert two.usage.prompt_tokens > r.usage.prompt_tokens


def test_llama_servers_repeat_penalty_is_the_repetition_penalty(tiny):
    def text(**extra):
        r = httpx.post(tiny.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    plain, penalised = text(), text(repetition_penalty=5.0)
    assert penalised != plain and text(repeat_penalty=5.0) == penalised


def test_a_continued_assistant_message_keeps_its_leading_space():
    from npgpt.serve import protocol
    from npgpt.serve.app import Choice
    from npgpt.serve.engine import Event
    assert Choice(strip=True).add(Event(text=" Paris")) == "Paris"
    assert Choice(strip=False).add(Event(text=" is")) == " is"
    model = npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=128, n_embd=8, n_head=2, n_layer=1), seed=0)
    args = (model, get_tokenizer(), 50257, 24, "transcript")
    ask = {"messages": [{"role": "user", "content": "1+1"}]}
    go_on = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
    assert not protocol.parse_chat(ask, *args).continues and protocol.parse_chat(go_on, *args).continues


def test_prompt_logprobs_in_blocks_equal_all_at_once():
    from npgpt.inference.sampling import top_logprobs
    from npgpt.serve.engine import PROMPT_LOGPROB_ROWS, Engine
    rng = np.random.default_rng(0)
    T = 2 * PROMPT_LOGPROB_ROWS + 7
    ids, logits = rng.integers(0, 50, T), rng.standard_normal((T, 50)).astype(np.float32)
    got = Engine._prompt_logprobs(ids, logits, 3)
    ref = top_logprobs(logits[:-1], ids[1:], 3)
    assert got[0] == (int(ids[0]), None, None) and len(got) == T
    assert [g[1] for g in got[1:]] == ref.chosen.tolist()
    assert [[i for i, _ in g[2]] for g in got[1:]] == ref.ids.tolist()


# ----------------------------------------------------------------------------- the command line
def test_serve_command_errors_are_one_line(tiny):
    port = tiny.url.rsplit(":", 1)[1]
    for args, msg in ((["--model", "no/such/dir"], "cannot load model"), (["--port", "70000"], "--port"),
                      (["--model", TINY, "--port", port], "cannot listen"), (["--parallel", "0"], "--parallel"),
                      (["--model", TINY, "--max-tokens", "99"], "context"),
                      (["--model", TINY, "--api-key", "sk key"], "whitespace")):
        r = subprocess.run([sys.executable, "-m", "npgpt", "serve", *args], capture_output=True, text=True,
                           cwd=ROOT, env=env(), timeout=120)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------- the playground, in a browser
def find_chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                               "google-chrome-stable")) if p), None)


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, exe, profile):
        from websockets.sync.client import connect
        self.proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                     "--no-default-browser-check", f"--user-data-dir={profile}",
                                     "--remote-debugging-port=0", "--window-size=1100,800", "about:blank"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = os.path.join(profile, "DevToolsActivePort"), time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()) and time.time() < deadline:
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None))
        self.n = 0

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expr):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def open(self, url):
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.getElementById('send') !== null")

    def wait(self, expr, timeout=60):
        deadline = time.time() + timeout
        while not self.js(expr):
            assert time.time() < deadline, f"timed out waiting for {expr}"
            time.sleep(0.05)

    def fill(self, **values):
        for k, v in values.items():
            self.js(f"document.getElementById({json.dumps(k)}).value = {json.dumps(v)}")

    def close(self):
        self.stack.close()
        self.proc.terminate()
        self.proc.wait(15)


def test_playground_in_headless_chromium(tiny, bytes_server, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium to drive (Debian: apt-get install chromium; .ci/run installs it when it can)")
    expected = client(tiny).completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    b = Browser(exe, str(tmp_path / "profile"))
    try:
        b.open(tiny.url + "/")
        b.fill(api_key=KEY, prompt=PROMPT, temperature="0", max_tokens="12")
        b.js("document.getElementById('send').click()")
        b.wait("document.getElementById('status').textContent.startsWith('done')")
        assert b.js("document.querySelector('#output .prompt').textContent") == PROMPT
        assert b.js("document.querySelector('#output .text').textContent") == expected
        pieces = int(re.search(r"(\d+) pieces", b.js("document.getElementById('status').textContent")).group(1))
        assert pieces > 1                                   # the text came as a stream, piece by piece
        shot = tmp_path / "playground-completion.png"
        shot.write_bytes(base64.b64decode(b.call("Page.captureScreenshot", format="png")["data"]))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        b.open(bytes_server.url + "/")                      # chat mode, on the instruct-format server
        b.js("document.getElementById('mode-chat').click()")
        b.fill(prompt="Say something.", temperature="0", max_tokens="5")
        b.js("document.getElementById('send').click()")
        b.wait("document.getElementById('status').textContent.startsWith('done')")
        roles = b.js("[...document.querySelectorAll('#output .role')].map(e => e.textContent)")
        answer = b.js("document.querySelectorAll('#output .turn .text')[1].textContent")
        assert roles == ["user", "assistant"] and answer == "\ufffd" * 5
        (tmp_path / "playground-chat.png").write_bytes(
            base64.b64decode(b.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        b.close()
