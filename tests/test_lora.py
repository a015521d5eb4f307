"""LoRA (the book's appendix E): LoRALinear's hand-written backward against finite differences (with a
negative control), adapters that learn while the base weights stay bit-identical, merging, PEFT's file
layout (checked against Hugging Face PEFT's own logits, a committed fixture), and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.io.safetensors import read_safetensors
from npgpt.gradcheck import _randomize, gradcheck_classifier, gradcheck_layer
from npgpt.layers import Linear, LoRALinear
from npgpt.io.peft import load_adapter, save_adapter
from npgpt.layers.lora import apply_lora, lora_layers, merge

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
F64 = np.float64


def tiny(dtype=np.float32, V=64, L=2, C=16, dropout=0.0, seed=0):
    return npgpt.GPT(npgpt.GPTConfig(n_vocab=V, n_ctx=32, n_embd=C, n_head=2, n_layer=L, dropout=dropout),
                     dtype=dtype, seed=seed)


def lora_linear(rng, freeze_base=True):
    layer = LoRALinear(Linear(6, 5, dtype=F64, rng=rng), 3, 6.0, rng=rng, freeze_base=freeze_base)   # s = 2
    return _randomize(layer, rng)                      # B nonzero too, so dA is not trivially zero


def backward_without_scale_in_dA(self, dy):
    """A plausible mistake: dA = x^T (dy B^T), forgetting the s = alpha/r of the forward."""
    x2, h = self.saved("x", "h")
    W, A, B, s = self.weight.data, self.lora_A.data, self.lora_B.data, self.scale
    self.lora_B.grad += (s * h).T @ dy
    self.lora_A.grad += x2.T @ (dy @ B.T)
    return dy @ W.T + s * (dy @ B.T) @ A.T


def backward_without_adapter_in_dx(self, dy):
    """Another: dx = dy W^T only, as if the adapter did not feed back into x."""
    x2, h = self.saved("x", "h")
    W, B, s = self.weight.data, self.lora_B.data, self.scale
    self.lora_B.grad += (s * h).T @ dy
    self.lora_A.grad += x2.T @ (s * (dy @ B.T))
    return dy @ W.T


def test_lora_linear_gradcheck_with_negative_controls(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6))
    good = {r.parameter: r for r in gradcheck_layer(lora_linear(rng), x)}
    assert set(good) == {"input 0", "lora_A", "lora_B"} and all(r.passed for r in good.values()), good
    full = gradcheck_layer(lora_linear(rng, freeze_base=False), rng.standard_normal((2, 3, 6)))
    assert {r.parameter for r in full} == {"input 0", "weight", "bias", "lora_A", "lora_B"}
    assert all(r.passed for r in full), full

    layer = lora_linear(rng)
    monkeypatch.setattr(LoRALinear, "backward", backward_without_scale_in_dA)
    bad = {r.parameter: r for r in gradcheck_layer(layer, x)}
    assert not bad["lora_A"].passed and bad["lora_B"].passed and bad["input 0"].passed, bad
    monkeypatch.setattr(LoRALinear, "backward", backward_without_adapter_in_dx)
    bad = {r.parameter: r for r in gradcheck_layer(layer, x)}
    assert not bad["input 0"].passed and bad["lora_A"].passed and bad["lora_B"].passed, bad


def test_classifier_with_lora_gradcheck():
    rng = np.random.default_rng(1)
    clf = _randomize(npgpt.Classifier(tiny(F64, V=11, C=8, dropout=0.1), ["a", "b", "c"], seed=0), rng)
    apply_lora(clf, rank=2, alpha=3.0, seed=0)
    for _, layer in lora_layers(clf):
        layer.lora_B.data[...] = 0.3 * rng.standard_normal(layer.lora_B.data.shape)
    ids = rng.integers(0, 11, (2, 5))
    results = gradcheck_classifier(clf, ids, np.array([3, 5]), np.array([2, 0]), max_checks=8)
    assert {r.parameter for r in results} == {"lora_A", "lora_B", "weight", "bias"}   # adapters + the head
    assert len(results) == 2 * 4 * 2 + 2
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_fresh_adapter_changes_nothing_and_counts():
    model = tiny()
    x = np.arange(10).reshape(2, 5)
    before = model.forward(x)
    r = 4
    n = apply_lora(model, rank=r, alpha=8)
    C = 16
    assert n == 2 * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))     # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert np.array_equal(model.forward(x), before)                           # B = 0: exactly the base model
    names = [name for name, _ in lora_layers(model)]
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert {k for k, p in model.named_parameters() if p.requires_grad} == \
        {f"{name}.{w}" for name in names for w in ("lora_A", "lora_B")}
    A = lora_layers(model)[0][1].lora_A.data
    assert np.abs(A).max() <= 1 / np.sqrt(C) and np.abs(A).max() > 0.5 / np.sqrt(C)   # PEFT's kaiming-uniform
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=2, alpha=2)

    only = tiny()
    apply_lora(only, rank=2, alpha=2, targets=["c_attn"])
    assert [n for n, _ in lora_layers(only)] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="no Linear"):
        apply_lora(tiny(), rank=2, alpha=2, targets=["q_proj"])


def test_gpt2_124m_trainable_count():
    """npgpt's fused c_attn (768 -> 2304): 12 * 16 * ((768+2304) + (768+768) + (768+3072) + (3072+768))
    = 2,359,296 adapter parameters, plus the 2-class head 768*2+2 = 1,538 (trained in full)."""
    cfg = npgpt.GPTConfig(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12)
    gpt = npgpt.GPT(cfg, init=False)                    # zero pages: nothing drawn, nothing touched
    assert apply_lora(gpt, rank=16, alpha=16) == 2_359_296
    clf = npgpt.Classifier(npgpt.GPT(cfg, init=False), ["ham", "spam"], init=False)
    assert apply_lora(clf, rank=16, alpha=16) == 2_359_296 + 1_538
    # the book's model has separate q, k, v Linears (768 -> 768 each) and an adapter on its 2-class head
    book = 12 * 16 * (3 * (768 + 768) + (768 + 768) + (768 + 3072) + (3072 + 768)) + 16 * (768 + 2)
    assert book == 2_666_528


def test_lora_learns_and_base_weights_stay_bit_identical():
    model = _randomize(tiny(V=64), np.random.default_rng(2), std=0.2)   # logits big enough to learn from
    base = {k: p.data.copy() for k, p in model.named_parameters()}
    apply_lora(model, rank=4, alpha=8, seed=0)
    opt = npgpt.AdamW(model, lr=1e-2, weight_decay=0.0)
    assert {k[2:] for k in opt.state_dict() if k.startswith("m/")} == \
        {k for k, p in model.named_parameters() if p.requires_grad}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (4, 12))
    y = np.roll(x, -1, axis=1)
    model.train()
    losses = []
    for _ in range(25):
        model.zero_grad()
        loss, dl = npgpt.cross_entropy(model.forward(x), y)
        model.backward(dl)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    for k, p in model.named_parameters():
        if k in base:
            assert np.array_equal(p.data, base[k]) and not p.has_grad, k
        else:
            assert p.has_grad
    assert all(np.abs(layer.lora_B.data).max() > 0 for _, layer in lora_layers(model))


def test_classifier_lora_trains_head_and_adapters_only():
    clf = npgpt.Classifier(tiny(V=64, L=2), ["a", "b"], seed=0)
    frozen = {k: p.data.copy() for k, p in clf.named_parameters() if not k.startswith("head.")}
    apply_lora(clf, rank=2, alpha=4, targets=["c_attn", "c_proj"])
    head = clf.head.weight.data.copy()
    opt = npgpt.AdamW(clf, lr=1e-2)
    rng = np.random.default_rng(0)
    ids, lengths, labels = rng.integers(0, 64, (4, 7)), np.array([7, 3, 5, 1]), np.array([0, 1, 1, 0])
    losses = []
    for _ in range(15):
        clf.zero_grad()
        loss, dl = npgpt.cross_entropy(clf(ids, lengths), labels)
        clf.backward(dl)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(np.array_equal(p.data, frozen[k]) for k, p in clf.named_parameters() if k in frozen)
    assert not np.array_equal(clf.head.weight.data, head)
    assert not any(isinstance(m, LoRALinear) for m in clf.head.modules())


def trained_adapter(model, seed=1, scale=0.1):
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = scale * rng.standard_normal(layer.lora_B.data.shape)
    return model


def test_merge_folds_adapters_into_plain_linears():
    model = tiny(F64)
    apply_lora(model, rank=3, alpha=6)
    trained_adapter(model)
    x = np.arange(12).reshape(2, 6)
    with_adapter = model.forward(x)
    layer = lora_layers(model)[0][1]
    expect = layer.weight.data + 2.0 * layer.lora_A.data @ layer.lora_B.data
    merge(model)
    assert not lora_layers(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.h[0].attn.c_attn, Linear)
    np.testing.assert_allclose(model.h[0].attn.c_attn.weight.data, expect, rtol=1e-14)
    np.testing.assert_allclose(model.forward(x), with_adapter, rtol=1e-10, atol=1e-12)
    assert set(model.state_dict()) == set(tiny().state_dict())


def test_save_adapter_in_peft_layout_and_load_back(tmp_path):
    model = tiny()
    apply_lora(model, rank=4, alpha=8, targets=["c_attn", "c_proj"], base="some/base")
    trained_adapter(model)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["c_attn", "c_proj"] and cfg["fan_in_fan_out"] is True
    assert cfg["bias"] == "none" and cfg["lora_dropout"] == 0 and cfg["base_model_name_or_path"] == "some/base"
    tensors, meta = read_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    C = 16
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, C)        # (r, in)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * C, 4)    # (out, r)
    assert tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (4, 4 * C)
    assert len(tensors) == 2 * 2 * 3 and meta["format"] == "pt"
    x = np.arange(10).reshape(2, 5)
    back = load_adapter(tiny(), tmp_path / "a")
    np.testing.assert_array_equal(back.forward(x), model.forward(x))
    with pytest.raises(ValueError, match="do not match"):
        bad = tiny()
        apply_lora(bad, rank=4, alpha=8, targets=["c_attn"])
        load_adapter(bad, tmp_path / "a")


def test_model_with_adapter_saves_base_plus_adapter_and_loads_as_is(tmp_path):
    base = tiny()
    npgpt.save_model(base, tmp_path / "base")
    model = npgpt.load_model(tmp_path / "base")
    apply_lora(model, rank=2, alpha=4, base=str(tmp_path / "base"))
    trained_adapter(model)
    npgpt.save_model(model, tmp_path / "run")
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= \
        set(os.listdir(tmp_path / "run"))
    stored, _ = read_safetensors(tmp_path / "run" / "model.safetensors")
    assert all(np.array_equal(stored[k], v) for k, v in base.state_dict().items())   # the base, untouched
    x = np.arange(10).reshape(2, 5)
    again = npgpt.load_model(tmp_path / "run")
    np.testing.assert_array_equal(again.forward(x), model.forward(x))
    assert lora_layers(again)
    bf16 = npgpt.load_model(tmp_path / "run", weights="bf16")      # the adapter merged, then packed
    assert bf16.weight_format == "bf16" and not lora_layers(bf16)
    np.testing.assert_allclose(bf16.forward(x), model.forward(x), rtol=0, atol=0.05 * np.abs(model.forward(x)).max())
    with pytest.raises(ValueError, match="adapter_config.json"):   # a plain model over it would load with
        npgpt.save_model(merge(again), tmp_path / "run")            # the old adapter: refused, nothing removed
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "run"))
    npgpt.save_model(again, tmp_path / "merged")
    np.testing.assert_allclose(npgpt.load_model(tmp_path / "merged").forward(x), model.forward(x),
                               rtol=1e-5, atol=1e-5)
    clf = npgpt.Classifier(npgpt.load_model(tmp_path / "base"), ["a", "b"], seed=0)
    apply_lora(clf, rank=2, alpha=4)
    trained_adapter(clf)
    clf.save(tmp_path / "clf")
    back = npgpt.Classifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(back(x, np.array([5, 3])), clf.eval()(x, np.array([5, 3])))


def test_npgpt_logits_with_adapter_equal_peft():
    """tests/fixtures/lora_f32.npz: Hugging Face PEFT ran tiny_hf with the npgpt-written tiny_lora/."""
    ref = np.load(FIXTURES / "lora_f32.npz")
    model = load_adapter(npgpt.load_model(FIXTURES / "tiny_hf"), FIXTURES / "tiny_lora")
    idx = ref["idx"]
    logits = model.forward(idx)
    scale = np.abs(ref["logits"]).max()
    assert np.abs(ref["logits"] - ref["base_logits"]).max() > 1e-2 * scale   # the adapter matters
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-5, atol=1e-5 * scale)
    merged = merge(model)
    params = dict(merged.named_parameters())
    keys = [k for k in ref.files if k.startswith("merged/")]
    assert len(keys) == 2 * 3                                                  # c_attn, attn.c_proj, mlp.c_proj
    for k in keys:
        np.testing.assert_allclose(params[k[len("merged/"):]].data, ref[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.forward(idx), ref["merged_logits"], rtol=1e-5, atol=1e-5 * scale)


def test_committed_adapter_is_what_npgpt_writes(tmp_path):
    """tests/fixtures/make_tiny_lora.py reproduces tests/fixtures/tiny_lora/ exactly."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_tiny_lora
    finally:
        sys.path.remove(str(FIXTURES))
    save_adapter(make_tiny_lora.build(), tmp_path / "t", base="tiny_hf")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "t" / f).read_bytes() == (FIXTURES / "tiny_lora" / f).read_bytes(), f


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NPGPT_HOME=str(Path(cwd) / ".npgpt-home"))
    return subprocess.run([sys.executable, "-m", "npgpt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_finetune_classify_lora_cli(tmp_path):
    base_dir = tmp_path / "tiny"
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=64, n_embd=32, n_head=2, n_layer=2), seed=0), base_dir)
    rows = [f"spam\tWIN a free prize now {i}" if i % 2 else f"ham\tsee you at lunch {i}" for i in range(40)]
    data = tmp_path / "d.tsv"
    data.write_text("\n".join(rows) + "\n")
    common = ["finetune", "classify", "--data", data, "--init", base_dir, "--epochs", 1, "--batch", 4,
              "--lr", "1e-2", "--max-length", 16, "--no-progress", "--lora-rank", 4, "--lora-alpha", 8]
    r = cli(*common, "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "run" / "checkpoint"
    assert {"adapter_config.json", "adapter_model.safetensors", "classifier.safetensors"} <= set(os.listdir(ckpt))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_size < 100_000
    assert "model.safetensors" not in os.listdir(ckpt)                       # the base referred to, not copied
    assert json.loads((ckpt / "base_model.json").read_text())["path"] == str(base_dir)
    clf = npgpt.Classifier.load(tmp_path / "run")
    assert lora_layers(clf) and json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    assert np.abs(lora_layers(clf)[0][1].lora_B.data).max() > 0            # the adapters trained

    r = cli(*common, "--merge", "--out", tmp_path / "merged", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "adapter_config.json" not in os.listdir(tmp_path / "merged" / "checkpoint")
    merged = npgpt.Classifier.load(tmp_path / "merged")
    assert not lora_layers(merged)
    ids, lengths = np.array([[1, 2, 3, 4]]), np.array([4])
    np.testing.assert_allclose(merged(ids, lengths), clf(ids, lengths), rtol=1e-4, atol=1e-5)   # same seed, same run

    r = cli("finetune", "classify", "--data", data, "--init", base_dir, "--out", tmp_path / "x", "--merge",
            cwd=tmp_path)
    assert r.returncode == 2 and "--merge needs --lora-rank" in r.stderr, r.stderr
