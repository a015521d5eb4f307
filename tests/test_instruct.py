"""Instruction fine-tuning (the book's chapter 7): the prompt format, padded batches and their -100
masks, the batch stream, the masked loss against finite differences (with a negative control),
`npgpt finetune instruct` end to end on a tiny model, and `npgpt chat` with piped stdin."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.gradcheck import _randomize, gradcheck_loss_fn
from npgpt.loss import cross_entropy
from npgpt.finetune.instruct import (END_ID, InstructBatches, check_entries, collate, encode_entry, format_entry,
                                  format_prompt, split_entries)
from npgpt.train.lm import count_targets, lm_loss

ROOT = Path(__file__).parent.parent
DATA = ROOT.parent / "shared" / "data" / "instruction-data.json"
E, M = END_ID, -100

HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.")


def test_prompt_format():
    with_input = {"instruction": "Convert to passive voice.", "input": "The cat ate it.", "output": "It was eaten."}
    assert format_prompt(with_input) == (HEADER + "\n\n### Instruction:\nConvert to passive voice."
                                         "\n\n### Input:\nThe cat ate it.\n\n### Response:\n")
    assert format_entry(with_input) == format_prompt(with_input) + "It was eaten."
    for no_input in ({"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Say hi.", "output": "Hi."}):
        assert format_entry(no_input) == HEADER + "\n\n### Instruction:\nSay hi.\n\n### Response:\nHi."


def test_encode_entry_prompt_then_response():
    tok = npgpt.get_tokenizer()
    e = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    ids, p = encode_entry(tok, e)
    assert ids[:p] == tok.encode(format_prompt(e)) and ids[p:] == tok.encode("Blue.")
    assert tok.decode(ids) == format_entry(e)


def test_collate_masks_every_padding_target_after_the_first_end_token():
    x, y = collate([[1, 2, 3], [4, 5], [6]])
    np.testing.assert_array_equal(x, [[1, 2, 3], [4, 5, E], [6, E, E]])
    np.testing.assert_array_equal(y, [[2, 3, E], [5, E, M], [E, M, M]])      # the first end token is a target
    assert x.dtype == y.dtype == np.int64
    assert count_targets((x, y)) == 3 + 2 + 1


def test_collate_mask_prompt_and_max_length():
    seqs, plens = [[1, 2, 3, 4], [5, 6]], [3, 1]
    x, y = collate(seqs, plens)
    np.testing.assert_array_equal(x, [[1, 2, 3, 4], [5, 6, E, E]])
    np.testing.assert_array_equal(y, [[M, M, 4, E], [6, E, M, M]])          # targets of prompt tokens 2, 3 masked
    x, y = collate(seqs, plens, max_length=3)                               # row 0 loses its end token
    np.testing.assert_array_equal(x, [[1, 2, 3], [5, 6, E]])
    np.testing.assert_array_equal(y, [[M, M, 4], [6, E, M]])
    x, y = collate(seqs, [5, 1], max_length=3)                              # a prompt longer than the window
    np.testing.assert_array_equal(y, [[M, M, M], [6, E, M]])


def test_split_85_10_5_in_file_order():
    entries = list(range(1100))
    train, test, val = split_entries(entries)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train + test + val == entries


def test_check_entries_errors():
    check_entries([{"instruction": "a", "output": "b"}])
    for bad, msg in (({"a": 1}, "JSON list"), ([], "empty"), ([1], "entry 0 is a int"),
                     ([{"instruction": "a", "input": ""}], "no 'output'"),
                     ([{"instruction": "a", "output": "b"}, {"output": "b"}], "entry 1 has no 'instruction'"),
                     ([{"instruction": "a", "output": 3}], "'output' is a int")):
        with pytest.raises(ValueError, match=msg):
            check_entries(bad)


def test_batches_shuffle_drop_last_and_resume():
    seqs = [[i] * (1 + i % 4) for i in range(10)]
    b = InstructBatches(seqs, [1] * 10, batch_size=3, seed=1)
    assert b.batches_per_epoch == 3                                          # 10 // 3: the last entry waits
    epoch = [b.next()[0] for _ in range(3)]
    firsts = {int(x[r, 0]) for x in epoch for r in range(3)}
    assert len(firsts) == 9                                                  # an epoch: 9 different entries
    b.next()
    state = json.loads(json.dumps(b.state_dict()))                           # as a checkpoint stores it
    rest = [b.next() for _ in range(5)]
    c = InstructBatches(seqs, [1] * 10, batch_size=3, seed=1)
    c.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, (c.next() for _ in range(5))):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    masked = InstructBatches(seqs, [2] * 10, batch_size=3, mask_prompt=True, seed=1).next()[1]
    assert (masked[:, 0] == M).all()                                         # target 0 is prompt token 1


def leaky_loss(model, batch, normalizer):
    """A deliberately broken masked loss: its value ignores the -100 targets, but its backward treats
    them as end tokens, so gradient flows from padding and masked prompt positions."""
    x, y = batch
    logits = model.forward(x)
    loss, _ = cross_entropy(logits, y, normalizer=normalizer)
    _, dlogits = cross_entropy(logits, np.where(y == M, logits.shape[-1] - 1, y), normalizer=normalizer)
    model.backward(dlogits)
    return float(loss)


def test_masked_instruction_loss_gradcheck_with_negative_control(backend):
    V = 11
    rng = np.random.default_rng(0)
    cfg = npgpt.GPTConfig(n_vocab=V, n_ctx=8, n_embd=8, n_head=2, n_layer=2, dropout=0.1)
    model = _randomize(npgpt.GPT(cfg, dtype=np.float64, seed=0), rng)
    seqs = [rng.integers(0, V - 1, k).tolist() for k in (4, 2, 5, 3)]
    batch = collate(seqs, [2, 1, 3, 2], end_id=V - 1)
    assert (batch[1] == M).sum() == (1 + 0 + 2 + 1) + (1 + 3 + 0 + 2)        # prompt targets, padding targets
    good = gradcheck_loss_fn(model, batch, loss_fn=lm_loss, count_fn=count_targets, micro_batches=2, max_checks=5)
    assert all(r.passed for r in good), [r for r in good if not r.passed]
    bad = gradcheck_loss_fn(model, batch, loss_fn=leaky_loss, count_fn=count_targets, micro_batches=2, max_checks=2)
    assert not all(r.passed for r in bad)
    assert not [r for r in bad if r.parameter == "weight" and r.layer.endswith("wte")][0].passed


# ----------------------------------------------------------------------------- the command line
def cli(*args, cwd, stdin=None):
    """Run npgpt; stdout and stderr decoded as UTF-8 with no newline translation."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NPGPT_HOME=str(Path(cwd) / ".npgpt-home"), NPGPT_KERNELS="numpy",
               PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "npgpt", *map(str, args)], capture_output=True,
                       input=None if stdin is None else stdin.encode("utf-8"), cwd=cwd, env=env, timeout=600)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("instruct") / "tiny"
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=256, n_embd=64, n_head=2, n_layer=2), seed=0), d)
    return d


@pytest.fixture(scope="module")
def finetuned(tiny_dir):
    if not DATA.exists():
        pytest.skip("instruction-data.json not present")
    out = tiny_dir.parent / "run"
    r = cli("finetune", "instruct", "--data", DATA, "--init", tiny_dir, "--out", out, "--limit", 40, "--epochs", 2,
            "--batch", 4, "--lr", "1e-3", "--max-length", 64, "--eval-every", 4, "--eval-batches", 2,
            "--max-new-tokens", 6, "--no-progress", cwd=tiny_dir.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_finetune_instruct_end_to_end(finetuned):
    out, r = finetuned
    assert "34 train / 4 test / 2 val entries" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in evals] == [0, 4, 8, 12, 16]               # 2 epochs of 34 // 4 = 8 batches
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    entries = json.loads(DATA.read_text())
    responses = json.loads((out / "test-responses.json").read_text())
    assert [{k: v for k, v in e.items() if k != "model_response"} for e in responses] == entries[34:38]
    assert all(isinstance(e["model_response"], str) for e in responses)
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["test_loss"]) and m["entries"] == {"train": 34, "test": 4, "val": 2}
    assert npgpt.load_model(out).config.n_ctx == 256                # the run directory loads


@pytest.mark.parametrize("which", ["random", "finetuned"])
def test_chat_with_piped_stdin(which, tiny_dir, request):
    """One answer per non-empty line, each the stripped greedy continuation of its prompt, as the library
    decodes it; the random model's answers are not empty (the tiny fine-tuned one may stop at once)."""
    from npgpt.cli.chat import STOP
    model_dir = tiny_dir if which == "random" else request.getfixturevalue("finetuned")[0]
    questions = ["Name a colour.", "", "  What is the capital of France?"]
    r = cli("chat", "--model", model_dir, "-n", 8, cwd=model_dir.parent, stdin="\n".join(questions) + "\n")
    assert r.returncode == 0, r.stderr
    model, tok = npgpt.load_model(model_dir), npgpt.get_tokenizer()
    with npgpt.fast.use_backend("numpy"):
        want = [npgpt.generate_text(model, tok, format_prompt({"instruction": q.strip()}), 8, stop=[STOP]).strip()
                for q in questions if q]
    assert r.stdout == "".join(a + "\n" for a in want)
    if which == "random":
        assert all(want), want
        empty = cli("chat", "--model", model_dir, cwd=model_dir.parent, stdin="")
        assert empty.returncode == 0 and empty.stdout == ""


def test_instruct_cli_errors(tmp_path, tiny_dir):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": "a", "output": "b"},')
    missing_key = tmp_path / "missing.json"
    missing_key.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    few = tmp_path / "few.json"
    few.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 4))
    base = ["finetune", "instruct", "--init", tiny_dir, "--out", tmp_path / "o", "--no-progress"]
    cases = [(["--data", tmp_path / "nothing.json"], "no such file"),
             (["--data", bad_json], "not valid JSON"),
             (["--data", missing_key], "entry 1 has no 'output' key"),
             (["--data", few], "make no batch of 8"),
             (["--data", few, "--epochs", "0"], "--epochs")]
    for extra, msg in cases:
        r = cli(*base, *extra, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
    r = cli("chat", "--model", tmp_path / "no-model", cwd=tmp_path, stdin="hi\n")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_finetune_instruct_with_lora_trains_only_the_adapters(tiny_dir):
    if not DATA.exists():
        pytest.skip("instruction-data.json not present")
    out = tiny_dir.parent / "lora"
    r = cli("finetune", "instruct", "--data", DATA, "--init", tiny_dir, "--out", out, "--limit", 20, "--epochs", 1,
            "--batch", 4, "--lr", "1e-2", "--max-length", 48, "--eval-every", 0, "--max-new-tokens", 2,
            "--lora-rank", 4, "--lora-alpha", 8, "--no-progress", cwd=tiny_dir.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (out / "checkpoint" / "model.safetensors").exists()   # the base referred to, not copied
    assert (out / "adapter" / "adapter_config.json").exists()       # the adapter alone, PEFT's layout
    tuned = npgpt.load_model(out)                            # base + adapter
    ids = np.arange(10)[None]
    assert not np.allclose(tuned.forward(ids), npgpt.load_model(tiny_dir).forward(ids))
