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
