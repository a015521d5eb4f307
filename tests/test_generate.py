"""KV-cached generation (npgpt.inference.kvcache, GPT.forward_cached, npgpt.inference.decode) on the tiny fixture model.

The reference tokens come from transformers' generate(do_sample=False) (tests/fixtures/generate.py);
the cache is also checked against full forward passes at every step, including after the
context window slides.
"""
import os

import numpy as np
import pytest

import npgpt
from npgpt.inference.decode import Decoder, TextStreamer
from npgpt.inference.kvcache import KVCache
from npgpt.tokens.bpe import get_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
N_PROMPTS = 3


def tiny_model(ref, dtype):
    data, files = ref
    V, n_ctx, C, NH, L = (int(x) for x in data["config"])
    model = npgpt.GPT(npgpt.GPTConfig(n_vocab=V, n_ctx=n_ctx, n_embd=C, n_head=NH, n_layer=L), dtype=dtype)
    model.load_state_dict({k[6:]: data[k] for k in files if k.startswith("param/")})
    return model.eval()


@pytest.fixture(params=["float32", "float64"])
def model_and_ref(request, ref_f32, ref_f64):
    ref = ref_f32 if request.param == "float32" else ref_f64
    return tiny_model(ref, np.dtype(request.param)), ref[0]


@pytest.fixture
def model32(ref_f32):
    return tiny_model(ref_f32, np.float32)


def prompts_and_outputs(data):
    return ([data[f"gen/prompt_{k}"] for k in range(N_PROMPTS)], [data[f"gen/out_{k}"] for k in range(N_PROMPTS)])


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def tol(dtype):
    """The rel_err allowed between two computations of the same logits (KV-cached against a full forward,
    a ragged batch against one row): the same products summed in other orders (other matrix shapes and
    blockings, one query against the cache), 64 ulps of the largest logit in the model's dtype (at most
    10 seen, float32 and float64 alike)."""
    return 64 * np.finfo(dtype).eps


# ----------------------------------------------------------------------------- greedy = transformers
def test_greedy_matches_transformers_each_prompt(backend, model_and_ref):
    model, data = model_and_ref
    for prompt, expected in zip(*prompts_and_outputs(data)):
        out = npgpt.generate(model, prompt, len(expected) - len(prompt))
        assert out.shape == (1, len(expected)) and out.dtype == np.int64
        np.testing.assert_array_equal(out[0], expected)
        out2 = npgpt.generate(model, prompt[None, :], len(expected) - len(prompt), temperature=0.0, seed=123)
        np.testing.assert_array_equal(out2[0], expected)


def test_greedy_matches_transformers_ragged_batch(backend, model_and_ref):
    model, data = model_and_ref
    prompts, expected = prompts_and_outputs(data)
    n_new = max(len(e) - len(p) for p, e in zip(prompts, expected))
    out = npgpt.generate(model, prompts, n_new)
    assert isinstance(out, list) and [len(o) for o in out] == [len(p) + n_new for p in prompts]
    for o, e in zip(out, expected):
        np.testing.assert_array_equal(o[:len(e)], e)
    # the batch in another order, and rows alone, give the same tokens
    rev = npgpt.generate(model, prompts[::-1], n_new)
    for o, r, p in zip(out, rev[::-1], prompts):
        np.testing.assert_array_equal(o, r)
        np.testing.assert_array_equal(o, npgpt.generate(model, p, n_new)[0])


def test_equal_length_batch_equals_rows_alone(backend, model32):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 101, size=(3, 6))
    out = npgpt.generate(model32, idx, 12)
    assert out.shape == (3, 18)
    for b in range(3):
        np.testing.assert_array_equal(out[b], npgpt.generate(model32, idx[b], 12)[0])


# ----------------------------------------------------------------------------- cache = full forward
def check_decoder_against_full_forward(model, prompts, n_steps, keep=None):
    """Greedy-decode with a Decoder; at every step, every row's cached logits must equal a full forward
    over that row's current window. Returns the decoder."""
    dec = Decoder(model, len(prompts), max(map(len, prompts)) + n_steps, keep=keep)
    logits = dec.prefill(prompts)
    for step in range(n_steps + 1):
        assert logits.shape == (len(prompts), model.config.n_vocab) and logits.dtype == model.dtype
        for b in range(len(prompts)):
            window = dec.tokens[b, dec.start[b]:dec.n[b]]
            assert len(window) == dec.cache.lengths[b] <= model.config.n_ctx
            full = model.forward(window[None])[0, -1]
            assert rel_err(logits[b], full) < tol(model.dtype), (step, b, rel_err(logits[b], full))
        if step < n_steps:
            logits = dec.step(logits.argmax(-1))
    return dec


def test_cached_logits_equal_full_forward_with_sliding_window(backend, model_and_ref):
    model, data = model_and_ref
    prompts, _ = prompts_and_outputs(data)
    assert model.config.n_ctx == 32
    for p in prompts:
        dec = check_decoder_against_full_forward(model, [p], 60)
        assert dec.slides >= 2                       # the window slid, and the checks went on after it


def test_cached_logits_ragged_batch_sliding_rows_one_at_a_time(backend, model_and_ref):
    model, data = model_and_ref
    prompts, _ = prompts_and_outputs(data)
    dec = check_decoder_against_full_forward(model, prompts, 40)
    assert dec.slides >= 3
    # keep = n_ctx - 1 (slide by one token) and keep = 1 (start over) are valid policies too
    check_decoder_against_full_forward(model, prompts, 12, keep=31)
    check_decoder_against_full_forward(model, prompts[:1], 40, keep=1)


def test_prompt_longer_than_context(backend, model32):
    rng = np.random.default_rng(5)
    long = rng.integers(0, 101, size=45)
    check_decoder_against_full_forward(model32, [long, long[:7]], 10)
    out = npgpt.generate(model32, long, 5)
    assert out.shape == (1, 50)


def test_forward_cached_all_positions_and_chunked_prefill(backend, model_and_ref):
    model, _ = model_and_ref
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 101, size=(2, 20))
    full = model.forward(idx)                                        # (2, 20, V)
    cache = KVCache.for_model(model, 2)
    assert cache.k[0].shape == (2, 4, 32, 12) and cache.k[0].dtype == model.dtype and cache.length == 0
    a = model.forward_cached(idx[:, :8], cache, last_only=False)     # (2, 8, V)
    b = model.forward_cached(idx[:, 8:19], cache, last_only=False)   # (2, 11, V)
    c = model.forward_cached(idx[:, 19:], cache)                     # (2, 1): decode one token
    assert a.shape == (2, 8, 101) and b.shape == (2, 11, 101) and c.shape == (2, 101)
    assert cache.length == 20
    got = np.concatenate([a, b, c[:, None]], axis=1)
    assert rel_err(got, full) < tol(model.dtype)
    with pytest.raises(ValueError, match="no room"):
        model.forward_cached(idx[:, :13], cache)
    assert cache.length == 20


def test_last_only_runs_one_position_through_the_last_block(backend, model_and_ref):
    """last_only: the last block's attention output, c_proj and MLP see one position a row, yet every
    key and value goes into the cache, exactly as with last_only=False; chunks into a filled cache too."""
    model, _ = model_and_ref
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 101, size=(2, 20))
    full = model.forward(idx)                                        # (2, 20, V)
    seen = []
    mlp = model.h[-1].mlp
    mlp.forward = lambda x, _f=mlp.forward: seen.append(x.shape) or _f(x)
    last, every = KVCache.for_model(model, 2), KVCache.for_model(model, 2)
    for lo, hi in [(0, 8), (8, 19)]:                                 # a prompt, then a chunk after it
        seen.clear()
        logits = model.forward_cached(idx[:, lo:hi], last)           # (2, V)
        assert seen == [(2, 1, model.config.n_embd)]                 # one position a row in the last block
        assert rel_err(logits, full[:, hi - 1]) < tol(model.dtype)
        all_logits = model.forward_cached(idx[:, lo:hi], every, last_only=False)
        assert seen[1:] == [(2, hi - lo, model.config.n_embd)]
        assert rel_err(logits, all_logits[:, -1]) < tol(model.dtype)
        for l in range(len(model.h)):                                # the same keys and values, every layer
            np.testing.assert_array_equal(last.k[l], every.k[l])
            np.testing.assert_array_equal(last.v[l], every.v[l])


def ragged_prompts(seed):
    """Three token rows of 3, 7 and 5 prompt tokens plus 4 more each, and the prompts right-padded to 7."""
    rng = np.random.default_rng(seed)
    lens = [3, 7, 5]
    seqs = [rng.integers(0, 101, size=n + 4) for n in lens]
    padded = np.zeros((3, 7), dtype=np.int64)
    for b, n in enumerate(lens):
        padded[b, :n] = seqs[b][:n]
    return lens, seqs, padded


def test_last_only_chunk_into_a_ragged_cache(backend, model32):
    lens, seqs, padded = ragged_prompts(4)
    cache = KVCache.for_model(model32, 3)
    model32.forward_cached(padded, cache, n_valid=lens)
    chunk = np.stack([s[n:n + 4] for s, n in zip(seqs, lens)])      # (3, 4): 4 more tokens a row
    logits = model32.forward_cached(chunk, cache)                    # (3, V): each row's query at its own position
    for b, n in enumerate(lens):
        assert rel_err(logits[b], model32.forward(seqs[b][None, :n + 4])[0, -1]) < tol(model32.dtype)


def test_ragged_cache_with_n_valid(backend, model32):
    lens, seqs, padded = ragged_prompts(2)
    cache = KVCache.for_model(model32, 3)
    logits = model32.forward_cached(padded, cache, n_valid=lens)
    assert cache.ragged and cache.lengths.tolist() == lens
    with pytest.raises(ValueError):
        cache.length
    for t in range(4):
        for b, n in enumerate(lens):
            assert rel_err(logits[b], model32.forward(seqs[b][None, :n + t])[0, -1]) < tol(model32.dtype)
        logits = model32.forward_cached(np.array([s[n + t] for s, n in zip(seqs, lens)])[:, None], cache)
    # a row view shares the batch cache's memory
    view = cache.rows(1)
    view.reset()
    assert cache.lengths.tolist() == [7, 0, 9] and np.shares_memory(view.k[0], cache.k[0])


def test_generate_with_sliding_equals_naive_loop(backend, model32):
    """generate() past n_ctx = argmax of full forwards over the window the documented policy keeps."""
    prompt = np.array([24, 12, 90, 9, 4])
    n_ctx, keep, n_new = 32, 16, 50
    seq, start = list(prompt), 0
    while len(seq) < len(prompt) + n_new:
        seq.append(int(model32.forward(np.array(seq[start:])[None])[0, -1].argmax()))
        if len(seq) - start > n_ctx:
            start = len(seq) - keep
    np.testing.assert_array_equal(npgpt.generate(model32, prompt, n_new)[0], seq)


# ----------------------------------------------------------------------------- sampling, eos, streaming
def test_seeded_sampling_reproducible(model32):
    prompts = [np.array([1, 2, 3]), np.array([50, 40])]
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2)
    a = npgpt.generate(model32, prompts, 20, seed=7, **kw)
    b = npgpt.generate(model32, prompts, 20, seed=7, **kw)
    c = npgpt.generate(model32, prompts, 20, seed=8, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))
    assert all(np.isin(x, np.arange(101)).all() for x in a)


def test_stream_tokens_equals_generate(backend, model32):
    p = np.array([5, 6, 7])
    kw = dict(temperature=0.9, top_k=20, seed=3, repetition_penalty=1.3)
    streamed = list(npgpt.stream_tokens(model32, p, 40, **kw))
    assert all(type(t) is int for t in streamed)
    np.testing.assert_array_equal(npgpt.generate(model32, p, 40, **kw)[0], np.r_[p, streamed])


def test_eos_stops_row_and_pads(model_and_ref):
    model, data = model_and_ref
    (p0, p1, p2), (o0, o1, o2) = prompts_and_outputs(data)
    # greedy continuations: row 0 -> 45 51 ..., row 1 never emits 51, row 2 -> 50 37 27 51 ...
    out = npgpt.generate(model, [p0, p1, p2], 10, eos_id=51)
    np.testing.assert_array_equal(out[0], np.r_[p0, 45, [51] * 9])
    np.testing.assert_array_equal(out[1], o1[:len(p1) + 10])
    np.testing.assert_array_equal(out[2], np.r_[p2, 50, 37, 27, [51] * 7])
    # every row finished: generation ends early, after the last row's eos
    out = npgpt.generate(model, [p0, p2], 10, eos_id=51)
    np.testing.assert_array_equal(out[0], np.r_[p0, 45, 51, 51, 51])
    np.testing.assert_array_equal(out[1], np.r_[p2, 50, 37, 27, 51])
    assert list(npgpt.stream_tokens(model, p2, 10, eos_id=51)) == [50, 37, 27, 51]


def test_bad_arguments(model32):
    with pytest.raises(ValueError, match="token id 101 .* 101 tokens"):
        npgpt.generate(model32, [3, 101, 4], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        npgpt.generate(model32, [3], -1)
    with pytest.raises(ValueError, match="empty"):
        npgpt.generate(model32, [np.array([1]), np.array([], dtype=np.int64)], 2)
    np.testing.assert_array_equal(npgpt.generate(model32, [[3, 4]], 0)[0], [3, 4])
    assert npgpt.generate(model32, np.array([[3, 4]]), 0).shape == (1, 2)
    assert list(npgpt.stream_tokens(model32, [3], 0)) == []


# ----------------------------------------------------------------------------- text
def test_generate_text_and_stop_strings(model32):
    tok = get_tokenizer()
    prompt = "1+1=2"
    assert max(tok.encode(prompt)) < 101
    ids = npgpt.generate(model32, tok.encode(prompt), 20)[0, len(tok.encode(prompt)):]
    text = npgpt.generate_text(model32, tok, prompt, 20)
    assert text == tok.decode(ids)
    assert "".join(npgpt.stream_text(model32, tok, prompt, 20)) == text
    # stop at a string that occurs in the continuation: the text ends right before it
    stop = text[7:10]
    cut = text.index(stop)
    assert npgpt.generate_text(model32, tok, prompt, 20, stop=[stop, "never"]) == text[:cut]
    assert npgpt.generate_text(model32, tok, prompt, 20, stop=stop) == text[:cut]
    assert npgpt.generate_text(model32, tok, prompt, 20, stop=["not in there"]) == text
    with pytest.raises(ValueError, match="token id 15496"):
        npgpt.generate_text(model32, tok, "Hello", 5)


def test_text_streamer_stop_string_across_tokens_and_utf8():
    tok = get_tokenizer()
    text = "smile 🙂 and café, then STOP here"
    ids = tok.encode(text)
    for stop, expected in ((["STOP"], "smile 🙂 and café, then "), (["🙂"], "smile "), ([" and caf"], "smile 🙂"),
                           ([], text), (["ST", "é, t"], "smile 🙂 and caf")):
        ts = TextStreamer(tok, stop)
        pieces = []
        for t in ids:
            pieces.append(ts.push(t))
            if ts.stopped:
                break
        pieces.append(ts.finish())
        assert "".join(pieces) == expected, (stop, pieces)
        assert all("\ufffd" not in p for p in pieces)            # no character ever split
    # text that only looks like the start of a stop string is released at the end
    ts = TextStreamer(tok, ["Stop!"])
    assert "".join([ts.push(t) for t in tok.encode("a Sto")] + [ts.finish()]) == "a Sto"
