"""`npgpt eval` (issue 23): perplexity with the Hugging Face guide's strided windows, LAMBADA and multiple
choice against transformers (tests/fixtures/make_eval_fixtures.py wrote tests/fixtures/eval/ with it: a
random-weight character-level GPT-2, small files, and what transformers computed on them), a classifier's
metrics, the named sets' download path against a local server, a training run's own validation loss, MPI,
and the one-line errors."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.config import GPTConfig
from npgpt.eval import lambada, perplexity, windows
from npgpt.eval import data as eval_data
from npgpt.eval.classify import ClassifyResult
from npgpt.eval.perplexity import token_units
from npgpt.eval.tasks import encode_pair
from npgpt.tokens.tokenizers import GPT2Tokenizer, find_tokenizer
from test_distributed import _env, _mpi_cmd, needs_mpi
from test_train_data import _Server as Server       # a threaded HTTP server on 127.0.0.1 serving a directory

ROOT = Path(__file__).parent.parent
FIX = ROOT / "tests" / "fixtures" / "eval"
MODEL = FIX / "model"
TEXT = FIX / "text.txt"
EXPECTED = json.loads((FIX / "expected.json").read_text(encoding="utf-8"))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
VERDICT = ROOT / "npgpt" / "train" / "assets" / "the-verdict.txt"
REL = 1e-5                   # perplexity and log-likelihoods against transformers, float32


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A private $NPGPT_HOME: downloads and token caches land there, never in ~/.cache."""
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run_eval(capsys, *args) -> tuple:
    """`npgpt eval ARGS` in process -> (exit status, stdout, stderr)."""
    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def eval_json(capsys, tmp_path, *args) -> dict:
    """The --json report of a successful `npgpt eval ARGS --no-progress`."""
    path = tmp_path / "report.json"
    code, out, err = run_eval(capsys, *args, "--no-progress", "--json", path)
    assert code == 0, out + err
    return json.loads(path.read_text(encoding="utf-8"))


def one_error_line(capsys, *args) -> str:
    code, out, err = run_eval(capsys, *args)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("npgpt eval: error: "), (code, out, err)
    return lines[0]


def fixture_model():
    return npgpt.load_model(MODEL), find_tokenizer(MODEL)


# ----------------------------------------------------------------------------- the windows
def test_windows_follow_the_guide():
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(5, 8, 3) == [(0, 5, 1)]
    assert windows(17, 16, 16) == [(0, 16, 1)]                 # the one-token window [16, 17) scores nothing
    for n, context, stride in [(37, 8, 3), (37, 8, 8), (64, 16, 5), (17, 16, 16), (50, 9, 1)]:
        plan = windows(n, context, stride)
        counts = np.zeros(n, dtype=int)
        for begin, end, first in plan:
            assert begin < first < end <= begin + context
            counts[first:end] += 1
        assert plan[-1][1] >= n - 1 and counts.max() == 1      # up to the text's end; each token once at most
        unscored = set(np.flatnonzero(counts == 0).tolist())
        assert unscored == (set(range(0, n, stride)) if stride == context else {0})


# ----------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("case", EXPECTED["ppl"], ids=lambda c: f"context{c['context']}-stride{c['stride']}")
def test_perplexity_matches_transformers(case, backend):
    model, tok = fixture_model()
    r = perplexity(model, TEXT.read_text(encoding="utf-8"), case["context"], case["stride"], tokenizer=tok, batch=3)
    assert (r.scored, r.bytes, r.chars, r.words) == (case["scored"], case["bytes"], case["chars"], case["words"])
    assert abs(r.ppl / case["ppl"] - 1) <= REL
    assert r.bytes > r.chars                                   # the text's non-ASCII characters
    assert r.bits_per_byte == pytest.approx(math.log2(r.ppl) * r.scored / r.bytes)
    assert r.word_ppl == pytest.approx(math.exp(r.nll / r.words))


def test_perplexity_with_the_fused_attention_and_nothing_kept(monkeypatch):
    """The fused kernel (forced at these short windows) gives the same figure, and no layer keeps an activation."""
    from npgpt.fast import fused_attention
    monkeypatch.setattr(fused_attention, "FLASH_MIN_T", 0)
    model, tok = fixture_model()
    with npgpt.fast.use_backend("numba"):
        assert model.h[0].attn.runs_fused(24)
        case = EXPECTED["ppl"][1]
        r = perplexity(model, TEXT.read_text(encoding="utf-8"), case["context"], case["stride"], tokenizer=tok)
    assert abs(r.ppl / case["ppl"] - 1) <= REL
    assert not [m for m in model.modules() if getattr(m, "_saved", False)]


def test_eval_command_perplexity_matches_transformers(capsys, tmp_path):
    case = EXPECTED["ppl"][1]
    report = eval_json(capsys, tmp_path, "--model", MODEL, "--data", TEXT, "--stride", case["stride"], "--batch", 2)
    assert report["task"] == "ppl" and report["result"]["scored"] == case["scored"]
    assert abs(report["result"]["ppl"] / case["ppl"] - 1) <= REL


def test_eval_command_prints_a_table_and_a_progress_bar(capsys):
    code, out, err = run_eval(capsys, "--model", MODEL, "--data", TEXT)
    assert code == 0, err
    rows = {line[:20].strip(): line[20:].split()[0] for line in out.splitlines()[1:]}
    assert sorted(rows) == ["bits per byte", "bits per character", "cross-entropy", "perplexity", "tokens scored",
                            "word perplexity"]
    assert abs(float(rows["perplexity"]) / EXPECTED["ppl"][0]["ppl"] - 1) <= REL
    assert "tok/s" in err


def test_eval_command_lambada_matches_transformers(capsys, tmp_path):
    want = EXPECTED["lambada"]
    got = eval_json(capsys, tmp_path, "--model", MODEL, "--data", FIX / "lambada.jsonl", "--task", "lambada")["result"]
    assert (got["items"], got["acc"], got["acc_openai"]) == (want["items"], want["acc"], want["acc_openai"])
    assert 0 < got["acc"] < got["acc_openai"] < 1
    assert abs(got["ppl"] / want["ppl"] - 1) <= REL
    np.testing.assert_allclose(got["logliks"], want["logliks"], rtol=REL)


def test_eval_command_choice_matches_transformers(capsys, tmp_path):
    want = EXPECTED["choice"]
    got = eval_json(capsys, tmp_path, "--model", MODEL, "--data", FIX / "choice.jsonl", "--task", "choice")["result"]
    for key in ("items", "acc", "acc_norm", "acc_mean"):
        assert got[key] == want[key], key
    np.testing.assert_allclose(got["logliks"], want["logliks"], rtol=REL)


def test_limit_and_packed_weights(capsys, tmp_path):
    model, tok = fixture_model()
    full = perplexity(model, TEXT.read_text(encoding="utf-8"), 64, 24, tokenizer=tok)
    report = eval_json(capsys, tmp_path, "--model", MODEL, "--data", TEXT, "--stride", 24, "--limit", 2)
    assert report["result"]["windows"] == 2 and report["result"]["scored"] == 63 + 24
    report = eval_json(capsys, tmp_path, "--model", MODEL, "--data", TEXT, "--stride", 24, "--weights", "bf16")
    assert report["result"]["ppl"] != full.ppl and abs(report["result"]["ppl"] / full.ppl - 1) < 0.02


# ----------------------------------------------------------------------------- interrupted and continued
class _StopAt:
    """Wraps model.forward_hidden: raises KeyboardInterrupt (a Ctrl-C) on call number `stop` (1-based;
    0: never) and counts the calls."""

    def __init__(self, model, stop=0):
        self.calls, self.stop, self.forward = 0, stop, model.forward_hidden
        model.forward_hidden = self

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.forward(x)


def _kept_files(home):
    return sorted(p.name for p in (home / "eval-progress").rglob("*") if p.is_file())


@pytest.mark.parametrize("task", ["ppl", "choice"])
def test_an_interrupted_evaluation_continues_where_it_stopped(home, task):
    """Each finished batch is kept on disk; the same evaluation run again after a Ctrl-C scores only the
    batches not kept and gives the uninterrupted run's figures to the bit; the folder goes once it is
    complete. Another batch size (other batches) starts afresh."""
    from npgpt.eval import choice
    model, tok = fixture_model()
    text = TEXT.read_text(encoding="utf-8")
    items = eval_data.read_jsonl(FIX / "choice.jsonl", "choice")

    def run(keep, batch=2):
        if task == "ppl":
            return perplexity(model, text, 64, 16, tokenizer=tok, batch=batch, keep=keep).to_dict()
        return choice(model, items, tok, batch=batch, keep=keep).to_dict()
    counter = _StopAt(model)
    whole = run(keep=False)
    batches = counter.calls
    assert batches >= 4 and not (home / "eval-progress").exists()

    counter.calls, counter.stop = 0, 3
    with pytest.raises(KeyboardInterrupt):
        run(keep=True)
    assert len(_kept_files(home)) == 2                         # the two batches done before the third
    counter.calls, counter.stop = 0, 0
    assert run(keep=True) == whole                             # every figure, to the bit
    assert counter.calls == batches - 2
    assert not list((home / "eval-progress").iterdir())        # complete: its folder is gone

    counter.calls = 0
    by_three = run(keep=False, batch=3)
    batches_of_three = counter.calls
    counter.calls, counter.stop = 0, 2
    with pytest.raises(KeyboardInterrupt):
        run(keep=True)
    counter.calls, counter.stop = 0, 0
    assert run(keep=True, batch=3) == by_three                 # another batching: nothing kept applies
    assert counter.calls == batches_of_three


def test_a_kept_batch_that_cannot_be_read_is_scored_again(home):
    model, tok = fixture_model()
    text = TEXT.read_text(encoding="utf-8")
    whole = perplexity(model, text, 64, 16, tokenizer=tok, batch=2).to_dict()
    counter = _StopAt(model, stop=3)
    with pytest.raises(KeyboardInterrupt):
        perplexity(model, text, 64, 16, tokenizer=tok, batch=2, keep=True)
    kept = sorted((home / "eval-progress").rglob("*.npz"))
    data = kept[0].read_bytes()
    kept[0].write_bytes(data[:len(data) // 2])                 # cut short (a lost machine); a .part a kill left
    (kept[0].parent / "rank0-4.npz.123.part").write_bytes(b"half")
    counter.calls, counter.stop = 0, 0
    assert perplexity(model, text, 64, 16, tokenizer=tok, batch=2, keep=True).to_dict() == whole
    assert counter.calls == len(range(0, whole["windows"], 2)) - 1


def test_a_full_disk_stops_the_keeping_not_the_evaluation(home, monkeypatch):
    import errno
    from npgpt.eval import resume
    model, tok = fixture_model()
    text = TEXT.read_text(encoding="utf-8")
    whole = perplexity(model, text, 64, 16, tokenizer=tok, batch=2).to_dict()
    tries = []

    def full(*a, **k):
        tries.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(resume.np, "savez", full)
    assert perplexity(model, text, 64, 16, tokenizer=tok, batch=2, keep=True).to_dict() == whole
    assert len(tries) == 1 and not list((home / "eval-progress").rglob("*"))   # tried once; no .part left


def test_the_kept_batches_are_named_by_the_weights_not_by_kept_activations():
    from npgpt.eval.resume import model_digest
    from npgpt.inference import quant
    model, _ = fixture_model()
    before = model_digest(model)
    model.forward(np.zeros((1, 8), dtype=np.int64))            # a training forward keeps activations
    assert model_digest(model) == before
    model.h[1].mlp.c_proj.bias.data[3] += 1e-6
    assert model_digest(model) != before
    packed = [model_digest(quant.quantize(fixture_model()[0], w)) for w in ("int8", "bf16")]
    assert len({before, *packed}) == 3


def test_eval_command_continues_after_ctrl_c(capsys, tmp_path, home, monkeypatch):
    """`npgpt eval` interrupted says its batches are kept and exits 130; the same command then prints the
    figures an uninterrupted run prints, and --no-resume scores everything (keeping nothing)."""
    from npgpt.cli import generate
    calls = []
    real = generate._load_model

    def load(*a, **k):
        model = real(*a, **k)
        calls.append(_StopAt(model, stop=2 if len(calls) == 0 else 0))
        return model
    monkeypatch.setattr(generate, "_load_model", load)
    args = ("--model", MODEL, "--data", TEXT, "--stride", 16, "--batch", 2, "--no-progress")
    code, out, err = run_eval(capsys, *args)
    assert code == 130 and "the same command continues" in err and _kept_files(home), err
    code, fresh, err = run_eval(capsys, *args, "--no-resume")          # right after: scores every batch
    assert code == 0, err
    code, out, err = run_eval(capsys, *args[:-1])                     # with its progress bar
    assert code == 0 and out == fresh, err
    assert 0 < calls[2].calls < calls[1].calls and not _kept_files(home)
    assert f"(continued: 1 of {calls[1].calls} batches kept)" in err


# ----------------------------------------------------------------------------- tokens, words and bytes
def test_token_units_count_bytes_characters_and_words_of_bpe_tokens():
    tok = GPT2Tokenizer()
    text = "Héllo wörld  \u2014 naïve\tcafé\n\n end \U0001F600x  \u3000 last"
    units = token_units(np.array(tok.encode(text)), tok)
    assert units["bytes"].sum() == len(text.encode("utf-8")) and units["chars"].sum() == len(text)
    assert units["words"].sum() == len(text.split())
    assert token_units(np.array(tok.encode("\U0001F600")[:1]), tok) is None      # half a character: not text


def test_encode_pair_moves_the_contexts_trailing_spaces_into_the_continuation():
    tok = GPT2Tokenizer()
    ctx, cont = encode_pair(tok, "He said hello to the  ", "world")
    assert tok.decode(ctx) == "He said hello to the" and tok.decode(cont) == "  world"


class MergingTokenizer:
    """Characters, except that "e " is one token: the context's own tokens are then not a prefix of the text's."""
    chars = "abcdefghijklmnopqrstuvwxyz "
    n_vocab = len(chars) + 1

    def encode(self, s):
        out, i = [], 0
        while i < len(s):
            if s[i:i + 2] == "e ":
                out.append(len(self.chars))
                i += 2
            else:
                out.append(self.chars.index(s[i]))
                i += 1
        return out


def test_lambada_scores_the_word_and_the_last_token_from_their_own_sequences(backend):
    """When the context's tokens are not the text's prefix (lm-evaluation-harness's encoding then differs from
    the text's), the word and OpenAI's last token come from two sequences, each scored as a direct forward says."""
    tok = MergingTokenizer()
    model = npgpt.GPT(GPTConfig(n_vocab=tok.n_vocab, n_ctx=32, n_embd=16, n_head=2, n_layer=1), seed=3)
    model.wte.weight.data *= 8                                 # confident predictions: some of them right
    rng = np.random.default_rng(0)
    def word():
        return "".join(rng.choice(list("abcdet"), rng.integers(1, 4)))
    texts = [" ".join(word() for _ in range(3)) + "e " + word() for _ in range(48)]    # the context ends in "e"
    r = lambada(model, texts, tok, batch=5)

    def logp(ids):                                   # log p(ids[t] | ids[:t]) for t >= 1 and greedy hits, directly
        z = model.forward(np.array(ids[:-1])[None])[0].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return lp[np.arange(len(ids) - 1), ids[1:]], lp.argmax(axis=1) == np.array(ids[1:])
    want_ll, want_word, want_last, word_last = [], [], [], []
    for text in texts:
        context, word = text.rsplit(" ", 1)
        ctx, cont = encode_pair(tok, context, " " + word)
        assert ctx + cont != tok.encode(text)                  # "e " merges in the text, not in the context alone
        lp, greedy = logp(ctx + cont)
        want_ll.append(lp[-len(cont):].sum())
        want_word.append(greedy[-len(cont):].all())
        word_last.append(greedy[-1])
        want_last.append(logp(tok.encode(text))[1][-1])
    np.testing.assert_allclose(r.logliks, want_ll, rtol=1e-5)
    assert r.acc == np.mean(want_word) and r.acc_openai == np.mean(want_last)
    assert 0 < np.mean(want_last) != np.mean(word_last)        # reading the word's sequence instead would show


# ----------------------------------------------------------------------------- a classifier
def test_classify_metrics_from_a_confusion_matrix():
    r = ClassifyResult(["a", "b", "c"], [[5, 1, 0], [2, 3, 1], [0, 0, 0]])
    assert r.items == 12 and r.accuracy == pytest.approx(8 / 12)
    assert r.precision == pytest.approx([5 / 7, 3 / 4, 0.0])
    assert r.recall == pytest.approx([5 / 6, 3 / 6, 0.0])
    assert r.f1 == pytest.approx([2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6), 2 * 0.75 * 0.5 / 1.25, 0.0])


def test_eval_command_classify(capsys, tmp_path):
    from npgpt.finetune.classify import pad_batch
    gpt = npgpt.GPT(GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1), seed=0)
    clf = npgpt.Classifier(gpt, ["ham", "spam", "eggs"], seed=1)
    clf.head.weight.data *= 30                                  # predictions that vary from text to text
    clf.save(tmp_path / "clf")
    rng = np.random.default_rng(0)
    words = "free prize call now meet lunch today win cash see you soon claim".split()
    rows = [(["ham", "spam", "eggs"][i % 3], " ".join(rng.choice(words, 6))) for i in range(30)]
    (tmp_path / "t.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    report = eval_json(capsys, tmp_path, "--model", tmp_path / "clf", "--data", tmp_path / "t.tsv", "--task", "classify",
                       "--batch", 4)["result"]
    tok = GPT2Tokenizer()
    confusion = np.zeros((3, 3), dtype=int)
    for label, text in rows:                                    # one row at a time, straight through the classifier
        ids, lengths = pad_batch([tok.encode(text)])
        confusion[clf.labels.index(label), int(clf.forward(ids, lengths)[0].argmax())] += 1
    assert report["confusion"] == confusion.tolist() and len(set(np.flatnonzero(confusion.sum(axis=0)))) > 1
    assert report["accuracy"] == pytest.approx(np.trace(confusion) / 30)
    for k in range(3):
        p = confusion[k, k] / confusion[:, k].sum() if confusion[:, k].sum() else 0.0
        rc = confusion[k, k] / confusion[k].sum()
        assert report["precision"][k] == pytest.approx(p) and report["recall"][k] == pytest.approx(rc)
        assert report["f1"][k] == pytest.approx(2 * p * rc / (p + rc) if p + rc else 0.0)
    code, out, _ = run_eval(capsys, "--model", tmp_path / "clf", "--data", tmp_path / "t.tsv", "--task", "classify")
    assert code == 0 and "confusion matrix" in out and "precision" in out


# ----------------------------------------------------------------------------- named sets, downloaded
@pytest.fixture
def served(tmp_path, monkeypatch):
    """A server of tmp_path/www, with npgpt.eval.data.NAMED[name] pointed at a file there: served(name, file)."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    server = Server(www)

    def serve(name, path, sha256=None):
        shutil.copyfile(path, www / Path(path).name)
        s = eval_data.NAMED[name]
        body = Path(path).read_bytes()
        monkeypatch.setitem(eval_data.NAMED, name, eval_data.NamedSet(
            f"{server.url}/{Path(path).name}", s.file, len(body), sha256 or hashlib.sha256(body).hexdigest(),
            s.task, s.member))
        return server
    yield serve
    server.close()


def test_hf_rows_text_is_the_datasets_rows_joined():
    raw = " = Title = \n \n Some text .\n\n Next @-@ line\n"
    rows = [" = Title = \n", "", " Some text .\n", "", " Next @-@ line\n"]   # the datasets library's rows
    assert eval_data.hf_rows_text(raw) == "\n\n".join(rows)


def test_named_wikitext_is_downloaded_once_verified_and_scored_as_the_guide(capsys, tmp_path, served, home):
    raw = TEXT.read_text(encoding="utf-8")[:700].replace(". ", " .\n \n")
    zpath = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("wikitext-2-raw/wiki.test.raw", raw)
    server = served("wikitext-2", zpath)
    report = eval_json(capsys, tmp_path, "--model", MODEL, "--data", "wikitext-2", "--stride", 32)
    model, tok = fixture_model()
    want = perplexity(model, eval_data.hf_rows_text(raw), 64, 32, tokenizer=tok)
    assert report["what"].startswith("wikitext-2 (test)") and report["result"]["ppl"] == pytest.approx(want.ppl, rel=1e-9)
    assert sorted(os.listdir(home / "data")) == ["wikitext-2-raw-v1.zip"]
    eval_json(capsys, tmp_path, "--model", MODEL, "--data", "wikitext-2")
    assert server.requests == ["/wikitext-2-raw-v1.zip"]                       # cached


def test_named_set_with_the_wrong_hash_is_refused_and_deleted(capsys, served, home):
    served("lambada", FIX / "lambada.jsonl", sha256="0" * 64)
    line = one_error_line(capsys, "--model", MODEL, "--data", "lambada", "--no-progress")
    assert "sha256" in line and "not the lambada file" in line
    assert not os.listdir(home / "data")


def test_named_lambada_downloads_and_picks_its_task(capsys, tmp_path, served):
    served("lambada", FIX / "lambada.jsonl")
    report = eval_json(capsys, tmp_path, "--model", MODEL, "--data", "lambada")
    assert report["task"] == "lambada" and report["result"]["acc"] == EXPECTED["lambada"]["acc"]


def test_offline_named_set_says_where_to_put_the_file(capsys, monkeypatch, home):
    s = eval_data.NAMED["hellaswag"]
    monkeypatch.setitem(eval_data.NAMED, "hellaswag", eval_data.NamedSet("http://127.0.0.1:9/hellaswag_val.jsonl",
                                                                         s.file, s.bytes, s.sha256, s.task))
    monkeypatch.setattr("npgpt.io.download.BACKOFF", 0.0)
    line = one_error_line(capsys, "--model", MODEL, "--data", "hellaswag", "--no-progress")
    assert "offline" in line and str(home / "data" / "hellaswag_val.jsonl") in line


# ----------------------------------------------------------------------------- a training run's own evaluation
def test_eval_reproduces_the_training_runs_validation_loss(capsys, tmp_path):
    """`npgpt train` evaluates windows of T inputs and T targets (T + 1 tokens) every T tokens while a whole
    one fits; `npgpt eval --context T+1 --stride T` on the tokens those windows cover scores the same tokens
    with the same contexts: exp(the run's last val_loss) is its perplexity."""
    from npgpt.train.data import split_text
    data = SHAKESPEARE if SHAKESPEARE.is_file() else VERDICT
    T, run = 16, tmp_path / "run"
    code = main(["train", "--config", "tiny", "--tokenizer", "char", "--data", str(data), "--context", str(T),
                 "--batch", "8", "--steps", "3", "--eval-every", "0", "--eval-batches", "0", "--sample-tokens", "0",
                 "--no-progress", "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    val_loss = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r][-1]
    val = split_text(data.read_text(encoding="utf-8"), 0.9)[1]          # characters = tokens
    n_windows = len(range(0, len(val) - T, T))
    (tmp_path / "val.txt").write_text(val[:n_windows * T + 1], encoding="utf-8")
    report = eval_json(capsys, tmp_path, "--model", run, "--data", tmp_path / "val.txt", "--context", T + 1,
                       "--stride", T, "--batch", 64)["result"]
    assert report["scored"] == n_windows * T
    assert abs(report["ppl"] / math.exp(val_loss["val_loss"]) - 1) <= 1e-5


# ----------------------------------------------------------------------------- MPI
@needs_mpi
def test_two_ranks_score_what_transformers_scores(tmp_path):
    out = tmp_path / "two.json"
    case = EXPECTED["ppl"][1]
    r = subprocess.run(_mpi_cmd(2, "-m", "npgpt", "eval", "--model", MODEL, "--data", FIX / "choice.jsonl", "--task",
                                "choice", "--no-progress", "--json", out), capture_output=True, text=True,
                       env=_env(), timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(out.read_text())["result"]
    assert [got[k] for k in ("acc", "acc_norm", "acc_mean")] == [EXPECTED["choice"][k] for k in ("acc", "acc_norm", "acc_mean")]
    np.testing.assert_allclose(got["logliks"], EXPECTED["choice"]["logliks"], rtol=REL)
    r = subprocess.run(_mpi_cmd(2, "-m", "npgpt", "eval", "--model", MODEL, "--data", TEXT, "--stride", case["stride"],
                                "--batch", 3, "--no-progress", "--json", out), capture_output=True, text=True,
                       env=_env(), timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.count("npgpt eval:") == 1, r.stdout + r.stderr   # rank 0 reports alone
    assert abs(json.loads(out.read_text())["result"]["ppl"] / case["ppl"] - 1) <= REL
    (tmp_path / "empty.txt").write_text("")                 # rank 0 fails while rank 1 waits for its data: no hang
    r = subprocess.run(_mpi_cmd(2, "-m", "npgpt", "eval", "--model", MODEL, "--data", tmp_path / "empty.txt",
                                "--no-progress"), capture_output=True, text=True, env=_env(), timeout=60, cwd=ROOT)
    assert r.returncode != 0 and "npgpt eval: error: --data" in r.stderr and "the file is empty" in r.stderr


def test_each_rank_scores_its_share_of_the_requests(monkeypatch):
    """Longest first, every world_size-th request from the rank's own: rank 1 of 2 runs 3 of 7 requests."""
    from npgpt.eval import score as score_module

    class Rank1Of2:
        rank, world_size, is_main = 1, 2, False
    monkeypatch.setattr(score_module, "collect", lambda local, n, dist: sorted(local))
    model = npgpt.GPT(GPTConfig(n_vocab=11, n_ctx=16, n_embd=8, n_head=2, n_layer=1), seed=0)
    requests = [score_module.Request(np.arange(k + 2) % 11, 1) for k in range(7)]      # request k: k + 2 tokens
    assert score_module.score(model, requests, batch=2, dist=Rank1Of2()) == [1, 3, 5]


# ----------------------------------------------------------------------------- bad input: one line
def test_bad_input_is_one_line(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "nokey.jsonl").write_text('{"text": "a b c"}\n{"txt": "a b c"}\n')
    (tmp_path / "nolabel.jsonl").write_text('{"ctx": "a", "endings": ["b", "c"]}\n')
    clf = tmp_path / "clf"
    npgpt.Classifier(npgpt.GPT(GPTConfig(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=1), seed=0),
                     ["a", "b"], seed=0).save(clf)
    cases = [
        (("--model", MODEL, "--data", tmp_path / "empty.txt"), "empty.txt: the file is empty"),
        (("--model", MODEL, "--data", tmp_path / "empty.jsonl", "--task", "lambada"), "empty.jsonl: the file is empty"),
        (("--model", MODEL, "--data", tmp_path / "nokey.jsonl", "--task", "lambada"), "nokey.jsonl line 2: no 'text' key"),
        (("--model", MODEL, "--data", tmp_path / "nolabel.jsonl", "--task", "choice"), "line 1: no 'label' key"),
        (("--model", MODEL, "--data", TEXT, "--stride", 65), "--stride 65 must be in [1, --context 64]"),
        (("--model", MODEL, "--data", TEXT, "--context", 32, "--stride", 40), "--stride 40 must be in [1, --context 32]"),
        (("--model", MODEL, "--data", TEXT, "--stride", 0), "--stride must be >= 1, got 0"),
        (("--model", MODEL, "--data", TEXT, "--context", 66), "--context 66 must be in [2, n_ctx + 1 = 65]"),
        (("--model", clf, "--data", FIX / "lambada.jsonl", "--task", "lambada"), "is a classifier"),
        (("--model", MODEL, "--data", TEXT, "--task", "classify"), "--task classify needs a classifier"),
        (("--model", MODEL, "--data", "lambada", "--task", "ppl"), "--data lambada is a set for --task lambada"),
        (("--model", MODEL, "--data", "wikitext-3"), "unknown set name"),
        (("--model", MODEL, "--data", FIX / "lambada.jsonl", "--task", "lambada", "--stride", 4), "--stride is for"),
    ]
    for args, message in cases:
        assert message in one_error_line(capsys, *args, "--no-progress"), args


def test_jsonl_rows_are_checked():
    with pytest.raises(ValueError, match="line 1: 'label' must be the index"):
        eval_data._choice_item({"ctx": "a", "endings": ["b", "c"], "label": 2}, "f line 1")
    assert eval_data._choice_item({"ctx": "a", "endings": ["b", "c"], "label": "1"}, "f").label == 1
    with pytest.raises(ValueError, match="last word"):
        eval_data._lambada_text({"text": "oneword"}, "f line 1")
