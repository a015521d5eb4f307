"""A LoRA run directory (`npgpt finetune --lora-rank`): its checkpoints hold the adapters, the head and the
optimizer state of the trainable parameters, and refer to the base (base_model.json) instead of copying
it; the run loads through its base, and a missing or different base, or adapter weights without their
adapter_config.json, is one line."""
import json
import os
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.finetune.recipes import finish_lora
from npgpt.layers.lora import apply_lora, lora_layers
from npgpt.finetune.classify import ClassRows, classify_loss, count_rows
from npgpt.train.data import BatchStream, Windows
from npgpt.train.lm import count_targets, lm_loss
from npgpt.train.loop import LoopConfig, fit
from npgpt.train.run import load_checkpoint_state

TINY_HF = Path(__file__).parent / "fixtures" / "tiny_hf"    # GPT-2 of 63,024 parameters, vocabulary 101
LABELS = ["ham", "spam"]
IDS, LENGTHS = np.array([[5, 17, 3, 90, 41, 2]]), np.array([6])


def copy_base(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(TINY_HF, base)
    return base


def lora_model(kind, base, seed=0):
    """What `npgpt finetune KIND --init BASE --lora-rank 1` trains: adapters (and a classifier's head)."""
    model = npgpt.Classifier.from_pretrained(base, LABELS, seed=seed) if kind == "classify" else \
        npgpt.load_model(base)
    apply_lora(model, rank=1, alpha=2.0, seed=seed, base=str(base))
    return model


def batches(kind):
    rng = np.random.default_rng(0)
    if kind == "classify":                  # rows of one length: no padding token (tiny_hf has 101 tokens)
        return BatchStream(ClassRows(list(rng.integers(0, 101, (16, 8))), [i % 2 for i in range(16)], 8), 4)
    return BatchStream(Windows(rng.integers(0, 101, 200), 8), 4)


def train(kind, model, run, merge=False):
    """A 4-update run with checkpoints at 2 and 4, then what `npgpt finetune` does after training."""
    opt = npgpt.AdamW(model, lr=1e-2)
    loss_fn, count_fn = (classify_loss, count_rows) if kind == "classify" else (lm_loss, count_targets)
    result = fit(model, opt, batches(kind), LoopConfig(steps=4, lr=1e-2, min_lr=1e-2, save_every=2),
                 loss_fn=loss_fn, count_fn=count_fn, run_dir=run, progress=False, log=lambda msg: None)
    finish_lora(model, Namespace(lora_rank=1, merge=merge), run, result.checkpoint)
    return model.eval(), opt


def outputs(model):
    return model(IDS, LENGTHS) if isinstance(model, npgpt.Classifier) else model(IDS)


def load(kind, run):
    return npgpt.Classifier.load(run) if kind == "classify" else npgpt.load_model(run)


def one_line_error(capsys, argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind", ["classify", "instruct"])
def test_lora_run_dir_refers_to_its_base_and_stays_small(tmp_path, kind):
    base, run = copy_base(tmp_path), tmp_path / "run"
    model, opt = train(kind, lora_model(kind, base), run)
    ckpt = run / "checkpoint"
    head = {"classifier.safetensors", "classifier.json"} if kind == "classify" else set()
    assert set(os.listdir(ckpt)) == {"config.json", "adapter_config.json", "adapter_model.safetensors",
                                     "base_model.json", "optimizer.safetensors", "trainer.json"} | head
    stored = sum(f.stat().st_size for f in run.rglob("*.safetensors"))
    assert stored < (TINY_HF / "model.safetensors").stat().st_size / 5, stored
    ref = json.loads((ckpt / "base_model.json").read_text())
    assert ref["name_or_path"] == ref["path"] == str(base) and ref["parameters"] == 63_024
    assert ref["fingerprint"].startswith("sha256:")
    saved_opt = npgpt.io.read_safetensors(ckpt / "optimizer.safetensors")[0]
    assert {k[2:] for k in saved_opt if k.startswith("m/")} == \
        {name for name, p in model.named_parameters() if p.requires_grad}            # adapters (and head) only
    assert (base / "model.safetensors").read_bytes() == (TINY_HF / "model.safetensors").read_bytes()

    back = load(kind, run)                                # the base from base_model.json, then the adapters
    assert lora_layers(back) and np.abs(lora_layers(back)[0][1].lora_B.data).max() > 0
    np.testing.assert_array_equal(outputs(back), outputs(model))


@pytest.mark.parametrize("kind", ["classify", "instruct"])
def test_lora_run_with_a_different_or_missing_base_is_one_line(tmp_path, kind, capsys):
    base, run = copy_base(tmp_path), tmp_path / "run"
    train(kind, lora_model(kind, base), run)
    command = ["classify", "--model", run, "hi"] if kind == "classify" else ["generate", "--model", run, "hi"]

    config = npgpt.load_model(base).config
    npgpt.save_model(npgpt.GPT(config, seed=1), base)                  # same shape and file layout, other weights
    with pytest.raises(ValueError, match=f"trained on the base {base} .* but the base it is applied to differs"):
        load(kind, run)
    assert "the base it is applied to differs" in one_line_error(capsys, command)

    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match=f"{base} does not exist"):
        load(kind, run)
    assert str(base) in one_line_error(capsys, command)

    (run / "checkpoint" / "base_model.json").write_text('{"name_or_path": "base", "path": 3}')
    assert "base_model.json: invalid LoRA base reference" in one_line_error(capsys, command)


def test_resume_loads_adapters_head_and_optimizer_state_and_checks_the_base(tmp_path):
    base, run = copy_base(tmp_path), tmp_path / "run"
    model, opt = train("classify", lora_model("classify", base), run)
    fresh = lora_model("classify", base, seed=5)          # other adapters and head to start from
    fresh_opt = npgpt.AdamW(fresh, lr=1e-2)
    state = load_checkpoint_state(run, fresh, fresh_opt)
    assert state["step"] == 4
    for (name, p), (name2, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert name == name2 and np.array_equal(p.data, q.data), name
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(fresh_opt.state_dict()[k], v, err_msg=k)

    other = copy_base(tmp_path / "other")
    npgpt.save_model(npgpt.GPT(npgpt.load_model(other).config, seed=1), other)
    stranger = lora_model("classify", other)
    with pytest.raises(ValueError, match="but the base it is applied to differs"):
        load_checkpoint_state(run, stranger, npgpt.AdamW(stranger))


def test_merge_still_writes_the_whole_merged_model(tmp_path):
    base, run = copy_base(tmp_path), tmp_path / "run"
    model, _ = train("classify", lora_model("classify", base), run, merge=True)
    ckpt = set(os.listdir(run / "checkpoint"))
    assert {"config.json", "model.safetensors", "classifier.safetensors"} <= ckpt
    assert not ckpt & {"base_model.json", "adapter_config.json", "adapter_model.safetensors"}
    shutil.rmtree(base)                                   # a merged run needs no base
    back = npgpt.Classifier.load(run)
    assert not lora_layers(back)
    np.testing.assert_allclose(outputs(back), outputs(model), rtol=1e-5, atol=1e-6)


def test_a_model_whose_base_trains_too_is_saved_whole(tmp_path):
    """Adapters and unfrozen base weights (a LoRA model fine-tuned again without --lora-rank): the base
    changes, so the checkpoint holds the whole model, not a reference to the base it started from."""
    base, run = copy_base(tmp_path), tmp_path / "run"
    model = lora_model("classify", base)
    model.gpt.h[-1].requires_grad_(True)
    model, _ = train("classify", model, run)
    assert {"model.safetensors", "adapter_config.json"} <= set(os.listdir(run / "checkpoint"))
    assert "base_model.json" not in os.listdir(run / "checkpoint")
    np.testing.assert_array_equal(outputs(npgpt.Classifier.load(run)), outputs(model))


def test_finetune_classify_lora_cli_run_dir(tmp_path, capsys):
    base = tmp_path / "tiny"
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1), seed=0), base)
    data = tmp_path / "d.tsv"
    data.write_text("".join(f"spam\tWIN a free prize now {i}\n" if i % 2 else f"ham\tsee you at lunch {i}\n"
                            for i in range(24)))
    run = tmp_path / "run"
    assert main(["finetune", "classify", "--data", str(data), "--init", str(base), "--out", str(run), "--epochs", "1",
                 "--batch", "4", "--lr", "1e-2", "--max-length", "16", "--no-progress", "--lora-rank", "4"]) == 0
    stored = sum(f.stat().st_size for f in run.rglob("*.safetensors"))
    assert stored < (base / "model.safetensors").stat().st_size / 5 and not list(run.rglob("model.safetensors"))
    capsys.readouterr()
    assert main(["classify", "--model", str(run), "WIN a prize"]) == 0
    label, p = capsys.readouterr().out.split()
    clf = npgpt.Classifier.load(run)
    ids = np.array([npgpt.get_tokenizer().encode("WIN a prize")])
    probs = np.exp(clf(ids, np.array([ids.shape[1]])).astype(np.float64))[0]
    assert label == LABELS[int(probs.argmax())] and float(p) == pytest.approx(probs.max() / probs.sum(), abs=1e-4)
    shutil.move(base, tmp_path / "moved")
    assert str(base) in one_line_error(capsys, ["classify", "--model", run, "WIN a prize"])


def test_adapter_weights_without_their_config_are_refused(tmp_path, capsys):
    base = copy_base(tmp_path)
    saved = lora_model("classify", base)                  # Classifier.save: the base + adapter files + head
    for _, layer in lora_layers(saved):
        layer.lora_B.data[...] = 0.5
    npgpt.save_model(saved, tmp_path / "saved")
    train("classify", lora_model("classify", base), tmp_path / "run")
    for d in (tmp_path / "saved", tmp_path / "run" / "checkpoint"):
        os.remove(d / "adapter_config.json")
        with pytest.raises(FileNotFoundError, match=f"{d / 'adapter_config.json'} is missing"):
            npgpt.Classifier.load(d)
        assert "adapter_config.json is missing" in one_line_error(capsys, ["classify", "--model", d, "hi"])
    os.remove(d / "adapter_model.safetensors")            # the reference to the base alone: still no adapter
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing: .* holds base_model.json"):
        npgpt.Classifier.load(d)
