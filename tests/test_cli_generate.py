"""`python -m npgpt generate` in a subprocess, on the tiny fixture model (101 tokens: a prompt such as
"1+1=2" has GPT-2 token ids [16, 10, 16, 28, 17], all < 101)."""
import os
import subprocess
import sys

import pytest

import npgpt
from npgpt.tokens.bpe import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_hf")
PROMPT = "1+1=2"


def run_cli(*args, stdin=None, kernels="numpy"):
    env = dict(os.environ, NPGPT_KERNELS=kernels, PYTHONPATH=os.pathsep.join(
        [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, "-m", "npgpt", "generate", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny():
    return npgpt.load_model(TINY)


@pytest.fixture(scope="module")
def greedy_text(tiny):
    tok = get_tokenizer()
    assert max(tok.encode(PROMPT)) < 101
    return npgpt.generate_text(tiny, tok, PROMPT, 16, temperature=0.0)


@pytest.mark.parametrize("kernels", ["numpy", "numba"])
def test_greedy_output_equals_library(greedy_text, kernels):
    r = run_cli("--model", TINY, "-n", "16", "--temperature", "0", PROMPT, kernels=kernels)
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + greedy_text + "\n" and len(greedy_text) > 0   # the prompt, then the continuation
    assert "Traceback" not in r.stderr


def test_no_echo_prints_only_the_continuation(greedy_text):
    r = run_cli("--model", TINY, "-n", "16", "--temperature", "0", "--no-echo", PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy_text + "\n"


def test_prompt_from_stdin(greedy_text):
    r = run_cli("--model", TINY, "-n", "16", "--temperature", "0", stdin=PROMPT + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + greedy_text + "\n"


def test_seeded_sampling_is_reproducible(tiny):
    args = ["--model", TINY, "-n", "30", "--temperature", "1.0", "--top-k", "40", "--top-p", "0.95",
            "--repetition-penalty", "1.1"]
    a = run_cli(*args, "--seed", "0", PROMPT)
    b = run_cli(*args, "--seed", "0", PROMPT)
    c = run_cli(*args, "--seed", "1", PROMPT)
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout != c.stdout
    expected = npgpt.generate_text(tiny, get_tokenizer(), PROMPT, 30, temperature=1.0, top_k=40, top_p=0.95,
                                   repetition_penalty=1.1, seed=0)
    assert a.stdout == PROMPT + expected + "\n"


def test_stop_string_and_stats(greedy_text):
    stop = greedy_text[5:8]
    r = run_cli("--model", TINY, "-n", "16", "--temperature", "0", "--stop", stop, "--stats", PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + greedy_text[:greedy_text.index(stop)] + "\n"
    assert "tokens/s" in r.stderr and "first token" in r.stderr and "prompt: 5 tokens" in r.stderr


def test_zero_new_tokens():
    r = run_cli("--model", TINY, "-n", "0", PROMPT)
    assert r.returncode == 0 and r.stdout == PROMPT + "\n", r.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", TINY, "Hello world"], "token id 15496"),          # ids >= 101
    (["--model", TINY, "-n", "-1", PROMPT], "-n"),
    (["--model", "", PROMPT], "model"),
    (["--model", os.path.join(ROOT, "no", "such", "model"), PROMPT], "does not exist"),
    (["--model", os.path.join(ROOT, "tests"), PROMPT], "tests"),      # exists, but is not a checkpoint
    (["--model", TINY, "--top-p", "0", PROMPT], "--top-p"),
    (["--model", TINY, "--temperature", "-1", PROMPT], "--temperature"),
    (["--model", TINY, "--temperature", "nan", PROMPT], "--temperature"),
    (["--model", TINY, "--temperature", "inf", PROMPT], "--temperature"),
    (["--model", TINY, "--repetition-penalty", "nan", PROMPT], "--repetition-penalty"),
    (["--model", TINY, "--top-p", "nan", PROMPT], "--top-p"),
    (["--model", TINY, "--top-k", "-1", PROMPT], "--top-k"),
    (["--model", TINY, "--seed", "-1", PROMPT], "--seed"),
    (["--model", TINY, "--stop", "\\x", PROMPT], "--stop"),             # a truncated \x escape
])
def test_bad_input_one_line_error(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "error" in lines[0], r.stderr
    if "Hello" in args[-1]:
        assert "101" in lines[0]                                    # names the vocabulary size
    assert r.stdout == ""
