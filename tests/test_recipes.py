"""The recipes from Python (npgpt.train.pretrain, npgpt.finetune.finetune_classify / finetune_instruct)
write the run directory that the command writes with the same settings (weights bit for bit, run.json,
metrics), and bad input is a ValueError naming the argument, with nothing written."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.finetune import finetune_classify, finetune_instruct
from npgpt.train import pretrain
from npgpt.train.run import read_metrics

VERDICT = Path(npgpt.__file__).parent / "train" / "assets" / "the-verdict.txt"


def quiet(msg):
    pass


def same_run(a: Path, b: Path, extra_json=()):
    """Two run directories of the same run: the same files, weights, run.json and metrics rows."""
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    wa, wb = npgpt.load_model(a).state_dict(), npgpt.load_model(b).state_dict()
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)

    def rows(d):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(d / "metrics.jsonl")]
    assert rows(a) == rows(b)
    for name in ("run.json", *extra_json):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


# ----------------------------------------------------------------------------- pretrain
TRAIN = dict(data=VERDICT, tokenizer="char", config="tiny", context=16, steps=2, eval_batches=1, sample_tokens=4)


def test_pretrain_writes_what_npgpt_train_writes(tmp_path, capsys):
    r = pretrain(out=tmp_path / "py", progress=False, log=quiet, **TRAIN)
    assert r.out == str(tmp_path / "py") and r.fit.step == 2 and not r.fit.interrupted
    assert r.model.config.n_ctx == 16
    assert main(["train", "--data", str(VERDICT), "--tokenizer", "char", "--config", "tiny", "--context", "16",
                 "--steps", "2", "--eval-batches", "1", "--sample-tokens", "4", "--no-progress",
                 "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    same_run(tmp_path / "py", tmp_path / "cli")

    r = pretrain(out=tmp_path / "py", resume=True, steps=3, progress=False, log=quiet)    # made longer
    assert r.fit.step == 3 and json.loads((tmp_path / "py" / "run.json").read_text())["steps"] == 3
    with pytest.raises(ValueError, match="--batch cannot change when resuming"):
        pretrain(out=tmp_path / "py", resume=True, batch=4, log=quiet)


@pytest.mark.parametrize("bad, needle", [(dict(lr=-1.0), "--lr"), (dict(tokenizer="bpe"), "--tokenizer"),
                                         (dict(steps=2, epochs=1.0), "--steps")])
def test_pretrain_bad_input_names_the_argument_and_writes_nothing(tmp_path, bad, needle):
    with pytest.raises(ValueError, match=needle):
        pretrain(out=tmp_path / "run", log=quiet, **{**TRAIN, **bad})
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT with GPT-2's vocabulary, saved."""
    d = tmp_path_factory.mktemp("recipes") / "base"
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=64, n_embd=32, n_head=2, n_layer=1), seed=0), d)
    return d


def cli_args(**settings) -> list:
    """`--flag value` for each setting (True: the flag alone)."""
    args = []
    for k, v in settings.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def test_finetune_classify_writes_what_the_command_writes(tmp_path, base, capsys):
    data = tmp_path / "texts.tsv"
    data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{'WIN a prize now' if i % 2 else 'see you'} {i}\n"
                            for i in range(20)))
    settings = dict(data=data, init=base, epochs=1, batch=4, lr=1e-3, max_length=8, trainable_blocks="all")
    r = finetune_classify(out=tmp_path / "py", progress=False, log=quiet, **settings)
    assert r.metrics["labels"] == ["ham", "spam"] and r.fit.step == 3
    assert main(["finetune", "classify", *cli_args(**settings), "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    assert "test accuracy" in capsys.readouterr().out
    same_run(tmp_path / "py", tmp_path / "cli", ["metrics.json"])
    ha, hb = (npgpt.Classifier.load(tmp_path / d).head.weight.data for d in ("py", "cli"))
    assert np.array_equal(ha, hb)

    with pytest.raises(ValueError, match="--trainable-blocks"):
        finetune_classify(out=tmp_path / "bad", log=quiet, **{**settings, "trainable_blocks": "x"})
    assert not (tmp_path / "bad").exists()


def test_finetune_instruct_writes_what_the_command_writes(tmp_path, base, capsys):
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": f"Add 1 to {i}.", "input": "", "output": str(i + 1)}
                                for i in range(12)]))
    settings = dict(data=data, init=base, epochs=1, batch=2, lr=1e-3, max_length=32, eval_every=0,
                    eval_batches=1, max_new_tokens=2, mask_prompt=True)
    r = finetune_instruct(out=tmp_path / "py", progress=False, log=quiet, **settings)
    assert r.metrics["entries"] == {"train": 10, "test": 1, "val": 1} and r.fit.step == 5
    assert main(["finetune", "instruct", *cli_args(**settings), "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    assert "test loss" in capsys.readouterr().out
    same_run(tmp_path / "py", tmp_path / "cli", ["metrics.json", "test-responses.json"])

    with pytest.raises(ValueError, match="--epochs"):
        finetune_instruct(out=tmp_path / "bad", log=quiet, **{**settings, "epochs": 0})
    assert not (tmp_path / "bad").exists()
