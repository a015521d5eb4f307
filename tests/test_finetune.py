"""Fine-tuning: freezing, hidden states, the last-real-token classification head under padding,
and `npgpt finetune classify` / `npgpt classify` end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.gradcheck import _randomize, gradcheck_classifier, gradcheck_layer
from npgpt.layers import LastTokenHead

ROOT = Path(__file__).parent.parent
SMS = ROOT.parent / "shared" / "data" / "SMSSpamCollection.tsv"


def tiny(dtype=np.float32, V=50257, L=2, dropout=0.0):
    return npgpt.GPT(npgpt.GPTConfig(n_vocab=V, n_ctx=32, n_embd=16, n_head=2, n_layer=L, dropout=dropout),
                     dtype=dtype, seed=0)


class HeadAtPositionMinusOne(LastTokenHead):
    """A deliberately broken backward: scatters the head's dx to position -1 (the book's choice),
    while forward reads the last real token."""

    def backward(self, dlogits):
        shape, _ = self.saved("shape", "last")
        dx = super(LastTokenHead, self).backward(dlogits)
        dhidden = np.zeros(shape, dtype=dx.dtype)
        dhidden[:, -1] += dx
        return dhidden


def test_last_token_head_gradcheck_under_padding_with_negative_control():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6, 8))
    lengths = np.array([2, 6, 4])                                      # rows 0 and 2 are padded
    good = gradcheck_layer(LastTokenHead(8, 3, dtype=np.float64, rng=rng), x, lengths)
    assert all(r.passed for r in good), good
    bad = gradcheck_layer(HeadAtPositionMinusOne(8, 3, dtype=np.float64, rng=rng), x, lengths)
    assert not bad[0].passed                                            # the input gradient is wrong


def test_classifier_gradcheck_under_padding():
    rng = np.random.default_rng(1)
    clf = _randomize(npgpt.Classifier(tiny(np.float64, V=11, dropout=0.1), ["a", "b", "c"], seed=0), rng)
    ids = rng.integers(0, 11, (2, 5))
    results = gradcheck_classifier(clf, ids, np.array([3, 5]), np.array([2, 0]), max_checks=30)
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_padding_does_not_change_the_logits():
    clf = npgpt.Classifier(tiny(), ["ham", "spam"], seed=0).eval()
    ids = np.array([[5, 6, 7, 50256, 50256], [1, 2, 3, 4, 5]])
    padded = clf(ids, np.array([3, 5]))
    alone = clf(ids[:1, :3], np.array([3]))
    np.testing.assert_allclose(padded[0], alone[0], rtol=1e-5, atol=1e-6)


def test_forward_hidden_matches_forward():
    model = tiny(np.float64)
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_allclose(model.lm_head(model.forward_hidden(ids)), model.forward(ids))


def test_frozen_parameters_bit_identical_no_state_and_lower_blocks_skipped(monkeypatch):
    clf = npgpt.Classifier(tiny(L=3), ["a", "b"], seed=0).set_trainable(1)
    frozen = {n: p.data.copy() for n, p in clf.named_parameters() if not p.requires_grad}
    assert "gpt.transformer.h.1.attn.c_attn.weight" in frozen and "gpt.transformer.h.2.mlp.c_fc.weight" not in frozen
    opt = npgpt.AdamW(clf, lr=1e-2)
    assert all(not k.startswith(("m/gpt.transformer.h.0", "m/gpt.transformer.wte")) for k in opt.state_dict())
    assert {k[2:] for k in opt.state_dict() if k.startswith("m/")} == \
        {n for n, p in clf.named_parameters() if p.requires_grad}
    for l in (0, 1):                                                    # blocks below the lowest trainable never run
        monkeypatch.setattr(clf.gpt.h[l], "backward", lambda dx: pytest.fail("a frozen lower block ran backward"))
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = rng.integers(0, 50257, (4, 7))
        clf.zero_grad()
        loss, dl = npgpt.cross_entropy(clf(ids, np.array([7, 3, 5, 1])), np.array([0, 1, 1, 0]))
        clf.backward(dl)
        npgpt.clip_grad_norm(clf, 1.0)
        opt.step()
    for n, p in clf.named_parameters():
        if n in frozen:
            assert not p.has_grad and np.array_equal(p.data, frozen[n]), n
    assert clf.head.weight.has_grad and clf.gpt.h[2].mlp.c_fc.weight.has_grad
    opt2 = npgpt.AdamW(clf)
    opt2.load_state_dict(opt.state_dict())                              # consistent state dicts


def test_frozen_linear_skips_weight_gradient():
    lin = npgpt.layers.Linear(4, 3, rng=np.random.default_rng(0)).freeze()
    lin.zero_grad()
    lin(np.ones((2, 4), dtype=np.float32))
    lin.backward(np.ones((2, 3), dtype=np.float32))
    assert not lin.weight.has_grad and not lin.bias.has_grad and lin.weight._grad is None


def test_classifier_save_load(tmp_path):
    clf = npgpt.Classifier(tiny(), ["ham", "spam"], seed=3)
    clf.save(tmp_path / "c")
    back = npgpt.Classifier.load(tmp_path / "c")
    assert back.labels == ["ham", "spam"]
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(back(ids, np.array([3])), clf.eval()(ids, np.array([3])))
    assert npgpt.load_model(tmp_path / "c").config.n_layer == 2   # the body loads as a GPT


@pytest.mark.parametrize("weights,tol", [("bf16", 2e-2), ("int8", 5e-2)])
def test_classifier_load_packed_weights(tmp_path, weights, tol):
    """Classifier.load(weights=...) packs the transformer (the head stays float32) and classifies as the
    float32 classifier does, up to the packing's rounding; the CLI takes --weights."""
    clf = npgpt.Classifier(tiny(), ["ham", "spam", "eggs"], seed=3)
    clf.save(tmp_path / "c")
    packed = npgpt.Classifier.load(tmp_path / "c", weights=weights)
    assert packed.gpt.weight_format == weights and packed.head.weight.data.dtype == np.float32
    ids, lengths = np.array([[1, 2, 3, 4], [5, 6, 7, 0]]), np.array([4, 3])
    ref = clf.eval()(ids, lengths)
    got = packed(ids, lengths)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < tol, err
    r = cli("classify", "--model", tmp_path / "c", "--weights", weights, "hello", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split("\t")[0] in ("ham", "spam", "eggs"), r.stderr


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NPGPT_HOME=str(Path(cwd) / ".npgpt-home"))
    return subprocess.run([sys.executable, "-m", "npgpt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture
def tiny_dir(tmp_path):
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=128, n_embd=64, n_head=2, n_layer=2), seed=0), tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.skipif(not SMS.exists(), reason="SMSSpamCollection.tsv not present")
def test_finetune_sms_spam_end_to_end(tmp_path, tiny_dir):
    out = tmp_path / "spam"
    r = cli("finetune", "classify", "--data", SMS, "--init", tiny_dir, "--out", out, "--epochs", 2,
            "--trainable-blocks", "all", "--max-length", 64, "--lr", "1e-3", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.9 and len(m["epochs"]) == 2 and m["labels"] == ["ham", "spam"]
    assert {"train_accuracy", "val_accuracy", "test_accuracy"} <= set(m["epochs"][-1])
    c = cli("classify", "--model", out, "WINNER!! You have won a free prize. Call 09061701461 to claim", cwd=tmp_path)
    assert c.returncode == 0 and c.stdout.split("\t")[0] == "spam", c.stdout + c.stderr


def test_finetune_cli_errors(tmp_path, tiny_dir):
    one = tmp_path / "one.tsv"
    one.write_text("ham\thello\nham\tthere\n")
    two = tmp_path / "two.csv"
    two.write_text("text,label\nhi,a\nyo,b\n")
    base = ["finetune", "classify", "--init", tiny_dir, "--out", tmp_path / "o", "--no-progress"]
    cases = [(["--data", tmp_path / "missing.tsv"], "no such file"),
             (["--data", one], "two classes"),
             (["--data", two, "--text-col", "body"], "no column"),
             (["--data", one, "--text-col", "5"], "no text column"),
             (["--data", two, "--text-col", "text", "--label-col", "label", "--trainable-blocks", "x"],
              "--trainable-blocks"),
             (["--data", two, "--text-col", "text", "--label-col", "label", "--epochs", "0"], "--epochs")]
    for extra, msg in cases:
        r = cli(*base, *extra, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
    r = cli("classify", "--model", tmp_path / "nothing", "hi", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(not SMS.exists(), reason="SMSSpamCollection.tsv not present")
def test_finetune_cli_trainable_blocks_keeps_frozen_weights_bit_identical(tmp_path, tiny_dir):
    out = tmp_path / "frozen"
    r = cli("finetune", "classify", "--data", SMS, "--init", tiny_dir, "--out", out, "--epochs", 1, "--limit", 400,
            "--trainable-blocks", 1, "--max-length", 16, "--lr", "1e-3", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before, after = npgpt.load_model(tiny_dir).state_dict(), npgpt.load_model(out).state_dict()
    trained = [k for k in before if ".h.1." in k or ".ln_f." in k]
    assert all(np.array_equal(before[k], after[k]) for k in before if k not in trained)
    assert not np.array_equal(before["transformer.h.1.mlp.c_fc.weight"], after["transformer.h.1.mlp.c_fc.weight"])


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_finetune_shard_optimizer_flag_reaches_the_optimizer(task):
    """`npgpt finetune TASK --shard-optimizer` sets the recipe's shard_optimizer, which builds a ShardedAdamW
    over several processes (each keeps 1/N of AdamW) and AdamW whole in one process."""
    from types import SimpleNamespace
    from npgpt.cli import build_parser
    from npgpt.cli.finetune import _invocation
    from npgpt.finetune.recipes import ClassifyConfig, InstructConfig, _adamw
    from npgpt.optim import AdamW, ShardedAdamW
    args = build_parser().parse_args(["finetune", task, "--data", "d", "--init", "m", "--out", "o", "--shard-optimizer"])
    settings = {k: v for k, v in _invocation(args).items() if k not in ("out", "overwrite", "progress")}
    cfg = {"classify": ClassifyConfig, "instruct": InstructConfig}[task](**settings)
    assert cfg.shard_optimizer is True
    model = npgpt.GPT(npgpt.GPTConfig(n_vocab=11, n_ctx=4, n_embd=8, n_head=2, n_layer=1), seed=0)
    assert type(_adamw(model, cfg, SimpleNamespace(rank=1, world_size=2))) is ShardedAdamW
    assert type(_adamw(model, cfg, SimpleNamespace(rank=0, world_size=1))) is AdamW
