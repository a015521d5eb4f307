"""Sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds (npgpt.inference.sampling)."""
import numpy as np
import pytest

from npgpt.inference.sampling import (Sampler, apply_repetition_penalty, sample_from_probs, softmax, top_k_filter,
                            top_p_filter)

P4 = np.array([0.5, 0.3, 0.15, 0.05])


def frequencies(sampler, logits, n=20000):
    """Draw n tokens at once (n identical rows: one vectorised call) -> empirical distribution."""
    tok = sampler(np.tile(logits, (n, 1)))
    assert tok.shape == (n,) and tok.dtype == np.int64
    return np.bincount(tok, minlength=logits.shape[-1]) / n


# ----------------------------------------------------------------------------- top-p
def test_top_p_keeps_smallest_set_reaching_p_and_renormalises():
    np.testing.assert_allclose(top_p_filter(P4[None], 0.8)[0], [0.625, 0.375, 0, 0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(top_p_filter(P4[None], 0.5)[0], [1, 0, 0, 0], atol=1e-15)
    np.testing.assert_allclose(top_p_filter(P4[None], 0.81)[0], np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-15)
    np.testing.assert_allclose(top_p_filter(P4[None], 1.0)[0], P4, atol=1e-15)
    np.testing.assert_allclose(top_p_filter(P4[None], 1e-6)[0], [1, 0, 0, 0])   # always at least one token


def test_top_p_batch_in_token_order():
    # rows are filtered independently, and the kept tokens need not be the first ones
    probs = np.stack([P4[[2, 0, 3, 1]], P4, np.full(4, 0.25)])      # (3, 4)
    out = top_p_filter(probs, 0.8)
    np.testing.assert_allclose(out[0], [0, 0.625, 0, 0.375], atol=1e-15)
    np.testing.assert_allclose(out[1], [0.625, 0.375, 0, 0], atol=1e-15)
    # uniform row: mass 0.75 after three tokens < 0.8, so all four are needed
    np.testing.assert_allclose(out[2], np.full(4, 0.25), atol=1e-15)


def test_top_p_sampling_frequencies():
    s = Sampler(temperature=1.0, top_p=0.8, seed=0)
    np.testing.assert_allclose(s.probs(np.log(P4)[None])[0], [0.625, 0.375, 0, 0], atol=1e-12)
    f = frequencies(s, np.log(P4))
    assert f[2] == 0 and f[3] == 0                          # exact support
    assert abs(f[0] - 0.625) < 0.015 and abs(f[1] - 0.375) < 0.015


# ----------------------------------------------------------------------------- top-k
def test_top_k_filter():
    logits = np.array([[1.0, 3.0, 2.0, 0.5], [0.0, -1.0, 5.0, 4.0]])
    out = top_k_filter(logits, 2)
    assert np.isneginf(out[0, [0, 3]]).all() and (out[0, [1, 2]] == [3.0, 2.0]).all()
    assert np.isneginf(out[1, [0, 1]]).all() and (out[1, [2, 3]] == [5.0, 4.0]).all()
    np.testing.assert_array_equal(top_k_filter(logits, 4), logits)
    np.testing.assert_array_equal(top_k_filter(logits, 100), logits)
    ties = top_k_filter(np.array([[1.0, 2.0, 2.0, 0.0]]), 1)   # ties with the k-th are all kept
    assert np.isfinite(ties[0]).tolist() == [False, True, True, False]


def test_top_k_sampling_frequencies():
    logits = np.log(P4)
    s = Sampler(temperature=1.0, top_k=2, seed=1)
    np.testing.assert_allclose(s.probs(logits[None])[0], [0.625, 0.375, 0, 0], atol=1e-12)
    f = frequencies(s, logits)
    assert f[2] == 0 and f[3] == 0
    assert abs(f[0] - 0.625) < 0.015


def test_temperature_scales_logits():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    for T in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(Sampler(temperature=T).probs(logits), softmax(logits / T), atol=1e-15)
    f = frequencies(Sampler(temperature=2.0, seed=3), logits[0], n=40000)
    np.testing.assert_allclose(f, softmax(logits[0] / 2.0), atol=0.012)


# ----------------------------------------------------------------------------- repetition penalty
def test_repetition_penalty_rule():
    logits = np.array([[2.0, -1.0, 0.5, -3.0]])
    seen = np.array([[True, True, False, False]])
    np.testing.assert_array_equal(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -2.0, 0.5, -3.0]])
    np.testing.assert_array_equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    seen = np.array([[True, False, False], [False, False, False]])
    assert Sampler(temperature=0.0)(logits, seen).tolist() == [0, 0]                         # no penalty
    assert Sampler(temperature=0.0, repetition_penalty=2.0)(logits, seen).tolist() == [1, 0]  # 2/2 < 1.5


# ----------------------------------------------------------------------------- greedy, seeds, draws
def test_greedy_is_argmax_and_ignores_seed():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 50))
    for seed in (None, 0, 1):
        np.testing.assert_array_equal(Sampler(0.0, top_k=3, top_p=0.5, seed=seed)(logits), logits.argmax(-1))


def test_same_seed_same_tokens_different_seed_different():
    logits = np.random.default_rng(1).standard_normal((4, 1000))
    draws = {seed: np.stack([s(logits) for s in [Sampler(1.0, seed=seed)] for _ in range(10)]) for seed in (0, 1)}
    again = Sampler(1.0, seed=0)
    np.testing.assert_array_equal(np.stack([again(logits) for _ in range(10)]), draws[0])
    assert not np.array_equal(draws[0], draws[1])


def test_sample_from_probs_never_draws_zero_probability():
    probs = np.array([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    rng = np.random.default_rng(0)
    for _ in range(200):
        tok = sample_from_probs(probs, rng)
        assert tok[0] in (1, 3) and tok[1] == 4 and tok[2] == 0


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_k=1.5), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(repetition_penalty=0.0), dict(temperature=float("nan")),
                                    dict(temperature=float("inf")), dict(repetition_penalty=float("nan")),
                                    dict(top_p=float("nan"))])
def test_bad_sampler_arguments(kwargs):
    with pytest.raises(ValueError):
        Sampler(**{"temperature": 1.0, **kwargs})


# ----------------------------------------------------------------------------- transformers' processors (fixture)
import os  # noqa: E402

from npgpt.inference.sampling import (TokenHistory, apply_presence_frequency, log_softmax, min_p_filter,  # noqa: E402
                                      sample_seed, top_logprobs)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def hf():
    """tests/fixtures/sampling.npz, written by make_sampling_fixtures.py with transformers 5.25."""
    with np.load(os.path.join(FIXTURES, "sampling.npz")) as z:
        return {k: z[k] for k in z.files}


def seen_of(hf):
    return TokenHistory(hf["input_ids"], hf["logits"].shape[-1]).seen


def test_repetition_penalty_matches_transformers(hf):
    np.testing.assert_allclose(apply_repetition_penalty(hf["logits"], seen_of(hf), 1.3), hf["rep"], rtol=1e-14)


@pytest.mark.parametrize("kwargs, key", [(dict(top_k=7), "top_k"), (dict(top_p=0.7), "top_p"),
                                         (dict(min_p=0.05), "min_p_005"), (dict(min_p=0.3), "min_p_03")])
def test_filters_match_transformers(hf, kwargs, key):
    probs = Sampler(temperature=1.0, **kwargs).probs(hf["logits"])
    assert ((probs > 0) == np.isfinite(hf[key])).all()                      # the same tokens kept
    np.testing.assert_allclose(probs, softmax(hf[key]), rtol=1e-12, atol=1e-15)


def test_whole_chain_matches_transformers(hf):
    s = Sampler(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, min_p=0.1)
    probs = s.probs(hf["logits"], seen_of(hf))
    assert ((probs > 0) == (hf["chain_probs"] > 0)).all() and (probs > 0).sum() < probs.size // 4
    np.testing.assert_allclose(probs, hf["chain_probs"], rtol=1e-12, atol=1e-15)


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    np.testing.assert_allclose(min_p_filter(probs, 0.31), [[0.625, 0.375, 0, 0]], atol=1e-15)   # 0.15 < 0.31 * 0.5
    np.testing.assert_allclose(min_p_filter(probs, 0.0), probs, atol=1e-15)
    np.testing.assert_allclose(min_p_filter(probs, 1.0), [[1, 0, 0, 0]], atol=1e-15)          # the best stays
    f = frequencies(Sampler(1.0, min_p=0.31, seed=0), np.log(probs[0]))
    assert f[2] == 0 and f[3] == 0 and abs(f[0] - 0.625) < 0.015


# ----------------------------------------------------------------------------- presence and frequency (OpenAI)
def test_presence_and_frequency_penalties_are_openais_formula():
    # mu[j] -> mu[j] - c[j] * frequency - (c[j] > 0) * presence, c[j] = times j was generated so far
    logits = np.array([[1.0, 2.0, 3.0, 4.0]])
    counts = np.array([[0, 1, 2, 0]])
    np.testing.assert_array_equal(apply_presence_frequency(logits, counts, 0.5, 0.25), [[1.0, 1.25, 2.0, 4.0]])
    np.testing.assert_array_equal(apply_presence_frequency(logits, counts, -0.5, 0.0), [[1.0, 2.5, 3.5, 4.0]])


def test_history_counts_only_generated_tokens_and_penalties_use_them():
    h = TokenHistory([np.array([3, 3])], 4)                  # the prompt: seen, not counted
    assert h.seen.tolist() == [[False, False, False, True]] and not h.counts.any()
    logits = np.array([[0.0, 0.0, 2.9, 3.0]])
    s = Sampler(0.0, presence_penalty=0.5)
    assert s.penalised and s(logits, h.seen, h.counts).tolist() == [3]        # the prompt's 3 is not penalised
    h.add(np.array([3]))
    h.add(np.array([3]))
    assert h.counts.tolist() == [[0, 0, 0, 2]]
    assert s(logits, h.seen, h.counts).tolist() == [2]                         # 3 - 0.5 < 2.9
    assert Sampler(0.0, frequency_penalty=0.06)(logits, h.seen, h.counts).tolist() == [2]   # 3 - 2 * 0.06
    assert Sampler(0.0, frequency_penalty=0.06)(logits).tolist() == [3]        # no history, no penalty
    assert not Sampler(0.0, repetition_penalty=1.0).penalised


def test_generate_applies_presence_and_frequency_penalties():
    """A frequency penalty far above any logit gap: greedy never picks a token it generated before."""
    import npgpt
    from npgpt.inference.decode import generate
    model = npgpt.load_model(os.path.join(FIXTURES, "tiny_hf"))
    prompt = np.array([16, 10, 16, 28, 17])
    plain = generate(model, prompt, 24)[0, 5:]
    assert len(set(plain.tolist())) < 24                                       # the tiny model repeats itself
    fresh = generate(model, prompt, 24, sampler=Sampler(0.0, frequency_penalty=1e3))[0, 5:]
    assert len(set(fresh.tolist())) == 24 and fresh[0] == plain[0]             # the first token: nothing counted yet


# ----------------------------------------------------------------------------- logprobs and seeds of n samples
def test_top_logprobs_are_the_models_own_best_first():
    logits = np.random.default_rng(2).standard_normal((3, 40))
    lp = log_softmax(logits)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-14)
    shift = lp - logits                                                      # log softmax = z - logsumexp(z)
    np.testing.assert_allclose(shift, -np.log(np.exp(logits).sum(-1, keepdims=True)) + 0 * shift, rtol=1e-14)
    top = top_logprobs(logits, np.array([0, 5, 39]), 4)
    np.testing.assert_array_equal(top.ids, np.argsort(-logits, axis=-1)[:, :4])
    np.testing.assert_array_equal(top.values, np.take_along_axis(lp, top.ids, -1))
    np.testing.assert_array_equal(top.chosen, lp[[0, 1, 2], [0, 5, 39]])
    s = Sampler(0.7, top_k=3, seed=0, logprobs=2)
    tok = s(logits)
    np.testing.assert_array_equal(s.last.chosen, lp[np.arange(3), tok])      # before temperature and filters
    assert s.last.ids.shape == (3, 2) and Sampler(0.0).last is None


def test_sample_seeds():
    assert sample_seed(7, 0) == 7 and sample_seed(None, 3) is None
    draws = [np.random.default_rng(sample_seed(7, i)).random() for i in range(3)]
    assert len(set(draws)) == 3 and draws[0] == np.random.default_rng(7).random()


@pytest.mark.parametrize("kwargs", [dict(min_p=1.5), dict(min_p=-0.1), dict(presence_penalty=float("nan")),
                                    dict(frequency_penalty=float("inf")), dict(logprobs=-1), dict(logprobs=1.5)])
def test_bad_new_sampler_arguments(kwargs):
    with pytest.raises(ValueError):
        Sampler(**{"temperature": 1.0, **kwargs})


# ----------------------------------------------------------------------------- npgpt generate's sampling flags
def generate_cli(*args):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + ([os.environ["PYTHONPATH"]]
                                                                  if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, "-m", "npgpt", "generate", "--model", os.path.join(FIXTURES, "tiny_hf"),
                           *args], capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)


TINY_PROMPT = "1+1=2"                                   # ids [16, 10, 16, 28, 17], all in tiny_hf's 101


@pytest.fixture(scope="module")
def tiny_model():
    import npgpt
    return npgpt.load_model(os.path.join(FIXTURES, "tiny_hf"))


def test_generate_prints_logprobs(tiny_model):
    import json
    from npgpt.tokens.bpe import get_tokenizer
    r = generate_cli("-n", "6", "--temperature", "0", "--logprobs", "2", "--no-echo", TINY_PROMPT)
    assert r.returncode == 0, r.stderr
    text, header, *rows = r.stdout.split("\n")[:-1]
    assert header.startswith("# token") and len(rows) == 6
    enc = get_tokenizer().encoding
    ids = [16, 10, 16, 28, 17]
    for row in rows:
        cols = row.split("\t")
        tok = json.loads(cols[0])
        ids.append(enc.encode_single_token(bytes(int(h, 16) for h in tok[6:].split("\\x")[1:])
                                           if tok.startswith("bytes:") else tok.encode()))
        assert len(cols) == 4 and cols[2] == f"{cols[0]} {cols[1]}"            # greedy: the token is the best
    ref = log_softmax(tiny_model.forward(np.array([ids]))[0])[4:-1]            # (6, V)
    got = np.array([float(row.split("\t")[1]) for row in rows])
    np.testing.assert_allclose(got, ref[np.arange(6), ids[5:]], atol=2e-4)
    second = np.array([float(row.split("\t")[3].rsplit(" ", 1)[1]) for row in rows])
    np.testing.assert_allclose(second, np.sort(ref, axis=-1)[:, -2], atol=2e-4)


def test_generate_samples_and_penalties_use_the_one_sampler(tiny_model):
    from npgpt.inference.decode import generate_text
    from npgpt.tokens.bpe import get_tokenizer
    tok = get_tokenizer()
    r = generate_cli("-n", "10", "--temperature", "1", "--top-k", "0", "--top-p", "1", "--samples", "2",
                     "--seed", "3", "--no-echo", TINY_PROMPT)
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split("\n---\n")
    assert len(samples) == 2 and samples[1].endswith("\n")
    for i, s in enumerate(samples):
        expected = generate_text(tiny_model, tok, TINY_PROMPT, 10, sampler=Sampler(1.0, seed=sample_seed(3, i)))
        assert s.rstrip("\n") == expected
    assert samples[0] != samples[1].rstrip("\n")
    r = generate_cli("-n", "12", "--temperature", "0", "--frequency-penalty", "2", "--presence-penalty", "0.5",
                     "--min-p", "0.2", "--no-echo", TINY_PROMPT)
    expected = generate_text(tiny_model, tok, TINY_PROMPT, 12,
                             sampler=Sampler(0.0, frequency_penalty=2.0, presence_penalty=0.5))
    assert r.returncode == 0 and r.stdout == expected + "\n"
    assert expected != generate_text(tiny_model, tok, TINY_PROMPT, 12)          # the penalties changed the text


@pytest.mark.parametrize("args, flag", [(["--min-p", "2"], "--min-p"), (["--presence-penalty", "5"], "--presence-penalty"),
                                        (["--frequency-penalty", "nan"], "--frequency-penalty"),
                                        (["--samples", "0"], "--samples"), (["--logprobs", "-1"], "--logprobs")])
def test_generate_bad_sampling_flags_are_one_line(args, flag):
    r = generate_cli(*args, TINY_PROMPT)
    assert r.returncode == 2 and flag in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
