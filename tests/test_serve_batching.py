"""npgpt serve's engine without HTTP: batch-invariant kernels and step, continuous batching, cancelling.

Batch invariance is checked bit for bit: a row's result computed beside other rows (any number, any
order, any thread count) must equal the same row computed alone, because the kernels fix each row's
arithmetic by construction (npgpt/serve/kernels.py). Against NumPy / the ordinary forward pass the
comparisons are to a float32 tolerance.
"""
import copy
import os
import threading

import numpy as np
import pytest

import npgpt
from npgpt import fast
from npgpt.inference.decode import generate
from npgpt.inference.kvcache import KVCache
from npgpt.inference.quant import quantize, unpack
from npgpt.serve import kernels
from npgpt.serve.batched import BatchedStep
from npgpt.serve.engine import Engine, Params, Sequence
from npgpt.tokens.bpe import get_tokenizer
from test_few_rows import fma_chain          # the exact float32 FMA chain, emulated in float64

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_hf")


def rows_alone(fn, x):
    """fn on each row of x alone (A = 1), stacked."""
    return np.concatenate([fn(x[a:a + 1]) for a in range(len(x))])


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    import numba
    old = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(old)


# ----------------------------------------------------------------------------- kernels
def test_in_out_matmul_rows_are_independent_of_the_batch(threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 37)).astype(np.float32)
    w = rng.standard_normal((37, 64 + 53)).astype(np.float32)         # a whole tile of columns and a tail
    b = rng.standard_normal(64 + 53).astype(np.float32)
    y = kernels.in_out_matmul(x, w, b)
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, rows_alone(lambda r: kernels.in_out_matmul(r, w, b), x))
    perm = np.array([3, 0, 6, 1])
    np.testing.assert_array_equal(kernels.in_out_matmul(x[perm], w, b), y[perm])
    # the sum over k runs in order, one fused multiply-add a term: exactly that chain, whatever the CPU
    np.testing.assert_array_equal(y, fma_chain(x, w) + b)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)   # other dtypes: row by row
    y64 = kernels.in_out_matmul(x64, w64, b64)
    np.testing.assert_allclose(y64, np.einsum("ak,kn->an", x64, w64) + b64, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(y64, rows_alone(lambda r: kernels.in_out_matmul(r, w64, b64), x64))
    assert kernels.in_out_matmul(x[:0], w, b).shape == (0, w.shape[1])
    assert kernels.in_out_matmul(x64[:0], w64, b64).shape == (0, w.shape[1])


@pytest.mark.parametrize("kind", ["float", "bf16", "int8"])
def test_out_in_matmul_rows_are_independent_of_the_batch(threads, kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 45)).astype(np.float32)
    w = rng.standard_normal((29, 45)).astype(np.float32)                      # (out, in)
    b = rng.standard_normal(29).astype(np.float32)
    from npgpt.inference.quant import pack
    packed, scale = (w, None) if kind == "float" else pack(w, kind)
    dense = w if kind == "float" else unpack(packed, scale)
    y = kernels.out_in_matmul(x, packed, scale, b)
    from npgpt.inference.quant import q8_product          # int8: x quantized in blocks, as decoding does
    ref = q8_product(x, packed, scale) + b if kind == "int8" else x @ dense.T + b
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, rows_alone(lambda r: kernels.out_in_matmul(r, packed, scale, b), x))
    np.testing.assert_array_equal(kernels.out_in_matmul(x[::-1], packed, scale, b), y[::-1])
    if kind == "float":                    # float32 runs few_rows' dot products, other floats the _dot kernel
        x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
        y64 = kernels.out_in_matmul(x64, w64, None, b64)
        np.testing.assert_allclose(y64, x64 @ w64.T + b64, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(y64, rows_alone(lambda r: kernels.out_in_matmul(r, w64, None, b64), x64))


def test_attend_rows_uses_each_rows_own_length(threads):
    rng = np.random.default_rng(2)
    B, NH, n_ctx, hs = 5, 3, 20, 8
    K = rng.standard_normal((B, NH, n_ctx, hs)).astype(np.float32)
    V = rng.standard_normal((B, NH, n_ctx, hs)).astype(np.float32)
    rows, lengths = np.array([4, 0, 2]), np.array([7, 20, 1])
    q = rng.standard_normal((3, NH, hs)).astype(np.float32)
    out = kernels.attend_rows(q, K, V, rows, lengths)
    for a, (r, L) in enumerate(zip(rows, lengths)):
        s = np.einsum("hd,htd->ht", q[a].astype(np.float64), K[r, :, :L]) / np.sqrt(hs)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("ht,htd->hd", p / p.sum(-1, keepdims=True), V[r, :, :L])
        np.testing.assert_allclose(out[a], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[a], kernels.attend_rows(q[a:a + 1], K, V, [r], [L])[0])


# ----------------------------------------------------------------------------- the batched step
def prefilled(step, model, prompts, B=None):
    cache = KVCache.for_model(model, B or len(prompts))
    for r, p in enumerate(prompts):
        step.prefill(cache, r, p)
    return cache


@pytest.fixture(scope="module")
def tiny():
    return npgpt.load_model(TINY)


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
def test_batched_step_rows_equal_rows_alone(tiny, weights):
    model = copy.deepcopy(tiny)
    quantize(model, weights)
    step = BatchedStep(model)
    assert step.mode == ("kernels" if fast.use_numba() else "rows")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 101, n) for n in (1, 9, 4, 17, 2, 6)]
    cache = prefilled(step, model, prompts)
    rows, tokens = np.array([5, 0, 3, 1, 4, 2]), rng.integers(0, 101, 6)
    together = step(copy.deepcopy(cache), rows, tokens)
    for a, r in enumerate(rows):
        alone = step(copy.deepcopy(cache), [r], [tokens[a]])
        np.testing.assert_array_equal(together[a], alone[0])
    # and what the ordinary decoding step computes for that row, to rounding
    for a, r in enumerate(rows):
        view = copy.deepcopy(cache)
        ref = model.forward_cached(np.array([[tokens[a]]]), view.rows(int(r)))[0]
        np.testing.assert_allclose(together[a], ref, rtol=1e-4, atol=1e-4)


def test_batched_step_advances_only_its_rows_and_refuses_a_full_row(tiny):
    step = BatchedStep(tiny)
    cache = prefilled(step, tiny, [np.array([1, 2, 3]), np.array([4])])
    step(cache, [1], [7])
    assert cache.lengths.tolist() == [3, 2]
    cache.lengths[0] = tiny.config.n_ctx
    with pytest.raises(ValueError, match="full"):
        step(cache, [0], [1])
    with pytest.raises(ValueError, match="once"):
        step(cache, [1, 1], [1, 2])


# ----------------------------------------------------------------------------- the engine
def run_engine(engine, prompts, params, cancel_after=None):
    """Submit one sequence per prompt; wait for all; -> [(tokens, text, finish_reason)]."""
    done = threading.Event()
    results = [[[], "", None] for _ in prompts]
    left = [len(prompts)]
    lock = threading.Lock()

    def emitter(i):
        def emit(ev):
            r = results[i]
            r[0] += [t for t, _, _ in ev.tokens]
            r[1] += ev.text
            if ev.finish_reason or ev.error:
                r[2] = ev.finish_reason or ev.error
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return emit
    seqs = [Sequence(p, params, emitter(i)) for i, p in enumerate(prompts)]
    engine.submit(seqs)
    assert done.wait(120), "the engine did not finish"
    return [tuple(r) for r in results]


PROMPTS = [[16, 10, 16, 28, 17], [39, 68, 75, 75, 78], [16], [24, 25, 26, 27, 28, 29, 30], [45, 46],
           [11, 12, 13], [50, 60, 70, 80], [5, 6, 7, 8, 9, 10]]


def test_concurrent_sequences_get_what_they_get_alone(tiny):
    tok = get_tokenizer()
    params = [Params(max_tokens=m, temperature=0.0) for m in (20, 7, 25, 12, 3, 18, 9, 14)]
    alone_engine = Engine(tiny, tok, parallel=1).start()
    busy = Engine(tiny, tok, parallel=4).start()          # 8 sequences, 4 rows: rows are refilled
    try:
        alone = [run_engine(alone_engine, [p], q)[0] for p, q in zip(PROMPTS, params)]
        out = [None] * 8
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, run_engine(busy, [PROMPTS[i]], params[i])[0]))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert busy.rows_decoded > busy.steps                  # steps really held several rows
        assert out == alone
        for (tokens, _, finish), q in zip(alone, params):
            assert finish == "length" and len(tokens) == q.max_tokens
        # greedy equals npgpt's decoding loop (the library generate) token for token
        for p, q, (tokens, _, _) in zip(PROMPTS, params, alone):
            assert generate(tiny, np.array(p), q.max_tokens)[0, len(p):].tolist() == tokens
    finally:
        alone_engine.stop()
        busy.stop()


def test_cancel_frees_the_row_and_a_failing_listener_does_not_stop_the_engine(tiny):
    engine = Engine(tiny, get_tokenizer(), parallel=1).start()
    try:
        started = threading.Event()
        long = Sequence(PROMPTS[0], Params(max_tokens=26, temperature=0.0), lambda ev: started.set())
        engine.submit([long])
        assert started.wait(60)
        engine.cancel([long])
        broken = Sequence(PROMPTS[1], Params(max_tokens=5), lambda ev: 1 / 0)
        engine.submit([broken])
        (tokens, _, finish), = run_engine(engine, [PROMPTS[2]], Params(max_tokens=4, temperature=0.0))
        assert finish == "length" and len(tokens) == 4 and not long.finished
        assert engine.load()["slots_processing"] == 0
    finally:
        engine.stop()


def test_nan_weights_end_the_sequence_with_an_error_not_the_engine(tiny):
    model = copy.deepcopy(tiny)
    model.h[0].mlp.c_fc.weight.data[0, 0] = np.nan
    engine = Engine(model, get_tokenizer(), parallel=2).start()
    try:
        results = run_engine(engine, [PROMPTS[0], PROMPTS[1]], Params(max_tokens=4))
        assert all("not finite" in r[2] for r in results)
        model.h[0].mlp.c_fc.weight.data[0, 0] = 0.0            # the same engine serves on
        assert run_engine(engine, [PROMPTS[0]], Params(max_tokens=3))[0][2] == "length"
    finally:
        engine.stop()


def test_a_sequence_that_cannot_fit_is_refused_at_submit(tiny):
    engine = Engine(tiny, get_tokenizer(), parallel=1)
    for prompt, m in (([], 3), ([1] * 30, 3), ([1] * 33, 0)):
        with pytest.raises(ValueError, match="prompt"):
            engine.submit([Sequence(prompt, Params(max_tokens=m), print)])
    assert not engine.waiting
    engine.submit([Sequence([1] * 29, Params(max_tokens=3), print)])       # 29 + 3 = n_ctx fits
    assert len(engine.waiting) == 1


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_a_stream_whose_client_left_before_it_began_leaves_nothing_decoding(tiny, spec):
    """The ASGI app driven directly: a streamed completion (n = 2) whose client is gone by the time the
    response starts. ASGI 2.3: the request's body, then http.disconnect at once (Starlette stops the
    response); 2.4: the server's send fails (OSError: Starlette raises ClientDisconnect before reading
    the stream at all). Nothing may be left decoding for nobody: every sequence submitted is cancelled
    (the engine is not started, so what was submitted stays in its queue to be looked at)."""
    import asyncio
    import json
    pytest.importorskip("starlette")
    from npgpt.serve import app as serve_app
    engine = Engine(tiny, get_tokenizer(), parallel=1)
    application = serve_app.create_app(serve_app.Service(engine, "tiny", "instruct"))
    body = json.dumps({"prompt": "1+1=2", "max_tokens": 5, "n": 2, "stream": True}).encode()
    inbox = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        if spec == "2.4":
            raise OSError("the client is gone")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    from starlette.requests import ClientDisconnect
    try:
        asyncio.run(application(scope, receive, send))
    except (ClientDisconnect, OSError):                 # 2.4: the disconnect, passed on to the server
        assert spec == "2.4"
    assert [s for s in engine.waiting if not s.cancelled] == []


def test_an_error_whose_traceback_cannot_be_printed_does_not_stop_the_engine(tiny, monkeypatch):
    """A step that raises something unexpected is logged and ends only its sequences with an error; when the
    log cannot be written either (stderr gone: a closed pipe), the engine thread still lives on and serves
    the next request (it would die, and every later request wait forever while /health said ok)."""
    import traceback

    def stderr_gone(*args, **kwargs):
        raise OSError("stderr is gone")

    monkeypatch.setattr(traceback, "print_exc", stderr_gone)
    engine = Engine(tiny, get_tokenizer(), parallel=1)
    prefill, failed = engine._prefill, []

    def failing_once(seq):
        if not failed:
            failed.append(seq)
            raise RuntimeError("a bug in a step")
        return prefill(seq)

    engine._prefill = failing_once
    engine.start()
    try:
        events, ended = [], threading.Event()
        engine.submit([Sequence(PROMPTS[0], Params(max_tokens=3), lambda ev: (events.append(ev), ended.set()))])
        assert ended.wait(30) and "a bug in a step" in events[-1].error
        (tokens, _, finish), = run_engine(engine, [PROMPTS[1]], Params(max_tokens=3, temperature=0.0))
        assert finish == "length" and len(tokens) == 3
    finally:
        engine.stop()
