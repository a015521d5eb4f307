"""npgpt.inference.quant.decode_layout: a float32 model's Linear weights laid out (out, in) for decoding.
The values are the model's: its logits (a prompt through BLAS, decoded tokens through the dot products)
match the (in, out) model's up to float32 rounding, its files are the same, its memory is not doubled,
and what it cannot do (backward) says so in one line."""
from __future__ import annotations

import numpy as np
import pytest

import npgpt
from npgpt import fast
from npgpt.inference.decode import Decoder
from npgpt.inference.quant import QuantLinear, decode_layout, quantize, weight_bytes
from npgpt.layers.linear import Linear

CFG = dict(n_layer=2, n_embd=48, n_head=4, n_ctx=40, n_vocab=97)


def _model(seed=0, dtype=np.float32):
    model = npgpt.GPT(npgpt.GPTConfig(**CFG), dtype=dtype, seed=seed).eval()
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():                      # biases away from 0: read from the right place
        if name.endswith(".bias"):
            p.data[...] = rng.normal(0, 0.1, p.data.shape)
    return model


def _twins():
    """The same weights twice: as loaded, and laid out for decoding."""
    a, b = _model(), _model()
    return a, decode_layout(b)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_every_linear_becomes_rows_of_the_same_values():
    model, rows = _twins()
    linears = {n: m for n, m in model.named_modules() if type(m) is Linear}
    assert linears and not any(type(m) is Linear for m in rows.modules())
    for name, m in rows.named_modules():
        if name in linears:
            assert type(m) is QuantLinear and m.kind == "fp32" and m.packed.flags.c_contiguous
            np.testing.assert_array_equal(m.packed, linears[name].weight.data.T)    # (out, in), exactly
            np.testing.assert_array_equal(m.bias.data, linears[name].bias.data)
    assert weight_bytes(rows) == weight_bytes(model)              # no second copy kept
    assert rows.weight_format == "fp32" and decode_layout(rows) is rows


def test_prompt_and_decoded_tokens_match_the_model():
    """A 30-token prompt (BLAS on the rows), then decoded batches of 1 to 9 rows: the dot products (up to
    fast.dots_limit() rows, compiled blocks and modules) and BLAS beyond."""
    model, rows = _twins()
    x = np.random.default_rng(1).integers(0, 97, (1, 30))
    _close(rows.forward(x), model.forward(x))
    for B in (1, 2, 5, 9):
        prompts = [np.random.default_rng(B + r).integers(0, 97, 3 + r) for r in range(B)]
        tokens = np.random.default_rng(B).integers(0, 97, (6, B))
        for compiled in (True, False):
            got, want = Decoder(rows, B, 20, compiled=compiled), Decoder(model, B, 20)
            _close(got.prefill(prompts), want.prefill(prompts))
            for t in tokens:
                _close(got.step(t), want.step(t))


def test_saved_and_loaded_as_float32(tmp_path):
    model, rows = _twins()
    npgpt.save_model(rows, tmp_path / "m")
    back = npgpt.load_model(tmp_path / "m")
    assert back.weight_format == "fp32"
    want = model.state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_inference_only_and_what_it_leaves_alone():
    _, rows = _twins()
    x = np.zeros((1, 3), np.int64)
    rows.train()
    rows.forward(x)
    with pytest.raises(RuntimeError, match="laid out for decoding"):
        rows.backward(np.ones((1, 3, 97), np.float32))
    double = _model(dtype=np.float64)                            # float64 (gradient checks): left as it is
    assert decode_layout(double) is double and any(type(m) is Linear for m in double.modules())
    packed = quantize(_model(), "bf16")                          # packed already
    assert decode_layout(packed) is packed and packed.weight_format == "bf16"
    lora = _model()
    npgpt.layers.lora.apply_lora(lora, rank=2, alpha=4)
    with pytest.raises(ValueError, match="merge"):
        decode_layout(lora)


def test_numpy_backend_runs_the_rows_through_blas():
    model, rows = _twins()
    x = np.random.default_rng(2).integers(0, 97, (2, 4))
    with fast.use_backend("numpy"):
        _close(rows.forward(x), model.forward(x))


def test_generating_commands_load_the_rows(tmp_path):
    from npgpt.cli.generate import _load_model
    npgpt.save_model(_model(), tmp_path / "m")
    assert not any(type(m) is Linear for m in _load_model(str(tmp_path / "m"), decoding=True).modules())
    assert any(type(m) is Linear for m in _load_model(str(tmp_path / "m")).modules())   # npgpt eval: as stored


def test_generating_commands_merge_a_lora_adapter_first(tmp_path):
    """A save holding a LoRA adapter: generate, chat and serve merge it, then lay the merged weights out."""
    from npgpt.cli.generate import _load_model
    from npgpt.layers.lora import apply_lora, lora_layers, merge
    model = _model()
    apply_lora(model, rank=2, alpha=4, seed=1)
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = np.random.default_rng(0).normal(0, 0.1, layer.lora_B.data.shape)   # an adapter that matters
    npgpt.save_model(model, tmp_path / "lora")
    loaded = _load_model(str(tmp_path / "lora"), decoding=True)
    assert not lora_layers(loaded) and not any(type(m) is Linear for m in loaded.modules())
    x = np.random.default_rng(3).integers(0, 97, (1, 6))
    merge(model)
    _close(loaded.forward(x), model.forward(x))


def test_quantizing_the_rows_packs_them(tmp_path):
    """quantize after decode_layout packs the rows as it packs Linears (the same arrays), and saves."""
    _, rows = _twins()
    want = quantize(_model(), "bf16")
    got = quantize(rows, "bf16")
    assert all(getattr(m, "kind", "bf16") == "bf16" for m in got.modules())
    packed = {name: m.packed for name, m in want.named_modules() if hasattr(m, "packed")}
    got_packed = {name: m.packed for name, m in got.named_modules() if hasattr(m, "packed")}
    assert got_packed.keys() == packed.keys()
    for name, a in got_packed.items():
        np.testing.assert_array_equal(a, packed[name], err_msg=name)
    npgpt.save_model(got, tmp_path / "q")
    assert npgpt.load_model(tmp_path / "q").weight_format == "bf16"


def test_attention_knows_which_products_ran_on_the_kernel_threads():
    _, rows = _twins()
    c_attn = rows.h[0].attn.c_attn
    assert c_attn.runs_on_kernel_threads(1) and c_attn.runs_on_kernel_threads(fast.dots_limit())
    assert not c_attn.runs_on_kernel_threads(fast.dots_limit() + 1)       # BLAS on the rows
    with fast.use_backend("numpy"):
        assert not c_attn.runs_on_kernel_threads(1)


def test_nan_in_the_rows_is_named():
    _, rows = _twins()
    rows.h[1].mlp.c_fc.packed[3, 5] = np.nan
    with pytest.raises(FloatingPointError, match=r"h\.1\.mlp\.c_fc\.weight"):
        npgpt.generate(rows, np.zeros((1, 2), np.int64), 2)


def test_mixed_kinds_are_not_saved_as_a_quantized_checkpoint(tmp_path):
    """A bf16 model holding one module of float32 rows is not a file load_model reads: refused, named."""
    from npgpt.io.quantized import save_quantized
    model = quantize(_model(), "bf16")
    lin = Linear(48, 48, rng=np.random.default_rng(0))
    model.replace("transformer.h.0.attn.c_proj", QuantLinear.from_linear(lin, "fp32"))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj holds fp32 weights in a bf16 model"):
        save_quantized(model, tmp_path / "q")


def test_packed_products_check_their_output_and_read_any_layout():
    from npgpt.fast.quant import packed_matmul
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 40), dtype=np.float32)
    w = rng.standard_normal((40, 30), dtype=np.float32).T               # (out, in) rows, not C-ordered
    _close(packed_matmul(x, w, None, None), x @ w.T)
    with pytest.raises(ValueError, match="out must be"):
        packed_matmul(x, np.ascontiguousarray(w), None, None, out=np.empty((2, 31), np.float32))
    int8 = quantize(_model(), "int8").h[0].attn.c_attn
    assert int8.runs_on_kernel_threads(16) and not int8.runs_on_kernel_threads(17)   # PACKED_MAX_ROWS
