"""The API contract of GPTConfig, GPT, the optimiser helpers and dropout; plus the causal mask."""
from __future__ import annotations

import math

import numpy as np
import pytest

import npgpt
from npgpt import GPT, AdamW, GPTConfig, clip_grad_norm, lr_schedule
from npgpt.layers import Dropout

TINY = dict(n_vocab=29, n_ctx=10, n_embd=12, n_head=3, n_layer=2)


def tiny(dtype=np.float64, seed=0, dropout=0.0, randomize=None, **overrides):
    cfg = GPTConfig(**{**TINY, **overrides}, dropout=dropout)
    model = GPT(cfg, dtype=dtype, seed=seed)
    if randomize is not None:
        randomize(model, np.random.default_rng(seed + 1000), weight_std=0.2, bias_std=0.1, gain_std=0.1)
    return model


def batch(seed=0, B=2, T=None, V=TINY["n_vocab"]):
    T = TINY["n_ctx"] if T is None else T
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, size=(B, T))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 1] = -100
    return idx, targets


def forward_backward(model, idx, targets):
    logits = model.forward(idx)
    loss, dlogits = npgpt.cross_entropy(logits, targets)
    model.backward(dlogits)
    return logits, loss


def snapshot(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def assert_params_equal(model, snap):
    for n, p in model.named_parameters():
        assert np.array_equal(p.data, snap[n]), n


# ----------------------------------------------------------------------------- GPTConfig

def analytic_param_count(cfg: GPTConfig) -> int:
    """wte + wpe + L blocks (2 layernorms, qkv, attn proj, fc, mlp proj) + ln_f; lm head tied to wte."""
    V, P, C, L = cfg.n_vocab, cfg.n_ctx, cfg.n_embd, cfg.n_layer
    block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + P * C + L * block + 2 * C


@pytest.mark.parametrize("name, alias, count", [
    ("gpt2", "124M", 124_439_808),
    ("gpt2-medium", "355M", 354_823_168),
    ("gpt2-large", "774M", 774_030_080),
    ("gpt2-xl", "1558M", 1_557_611_200),
])
def test_presets(name, alias, count):
    cfg = GPTConfig.from_preset(name)
    assert GPTConfig.from_preset(alias) == cfg
    assert cfg.n_vocab == 50257 and cfg.n_ctx == 1024 and cfg.dropout == 0.0
    assert cfg.n_embd % cfg.n_head == 0 and cfg.head_size == 64
    assert analytic_param_count(cfg) == count
    assert GPTConfig.from_preset(name, dropout=0.1).dropout == 0.1
    assert GPTConfig.from_hparams(cfg.to_hparams()) == cfg
    assert set(cfg.to_hparams()) == {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}


@pytest.mark.parametrize("cfg", [dict(TINY), dict(n_vocab=7, n_ctx=3, n_embd=4, n_head=1, n_layer=1),
                                 dict(n_vocab=50, n_ctx=17, n_embd=24, n_head=4, n_layer=3)])
def test_param_count_formula_matches_model(cfg):
    model = GPT(GPTConfig(**cfg), seed=0)
    assert model.num_parameters() == analytic_param_count(GPTConfig(**cfg))
    assert sum(p.data.size for _, p in model.named_parameters()) == model.num_parameters()


@pytest.mark.parametrize("bad", [
    dict(n_embd=10, n_head=3),                   # not divisible
    dict(n_vocab=0), dict(n_ctx=-1), dict(n_layer=0), dict(n_head=0),
    dict(n_embd=12.0), dict(n_layer=True), dict(n_vocab="29"),
    dict(dropout=1.0), dict(dropout=-0.1),
])
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError):
        GPTConfig(**{**TINY, **bad})


def test_unknown_preset_and_bad_hparams_raise():
    with pytest.raises(ValueError, match="unknown model name"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="missing"):
        GPTConfig.from_hparams({"n_vocab": 10, "n_ctx": 4})
    with pytest.raises(ValueError):
        GPT(GPTConfig(**TINY), dtype=np.float16)
    with pytest.raises(ValueError):
        Dropout(1.0)


# ----------------------------------------------------------------------------- names and state dicts

def test_named_parameters_match_hf(ref_f32):
    data, order = ref_f32
    V, n_ctx, C, NH, L = (int(v) for v in data["config"])
    model = GPT(GPTConfig(n_vocab=V, n_ctx=n_ctx, n_embd=C, n_head=NH, n_layer=L), seed=0)
    hf = [(k[len("param/"):], data[k].shape) for k in order if k.startswith("param/")]
    ours = [(n, p.data.shape) for n, p in model.named_parameters()]
    assert ours == hf                             # names, order and layouts
    assert "lm_head.weight" not in dict(ours)    # tied: listed once, as wte
    assert model.lm_head.weight is model.wte.weight
    assert list(model.state_dict()) == [n for n, _ in hf]


def test_state_dict_round_trip(backend):
    a, b = tiny(seed=1), tiny(seed=2)
    idx, _ = batch()
    assert not np.array_equal(a.forward(idx), b.forward(idx))
    state = {k: v.copy() for k, v in a.state_dict().items()}
    assert b.load_state_dict(state) is b
    assert_params_equal(b, state)
    assert np.array_equal(a.forward(idx), b.forward(idx))
    # loading copies: changing the source afterwards does not touch the model
    state["transformer.wte.weight"][...] = 0
    assert not np.all(b.wte.weight.data == 0)
    # an HF-style dict with lm_head.weight (tied to wte) is accepted too
    c = tiny(seed=3)
    c.load_state_dict({**a.state_dict(), "lm_head.weight": a.wte.weight.data})
    assert_params_equal(c, state | {"transformer.wte.weight": a.wte.weight.data})


def test_load_state_dict_casts_dtype(backend):
    a32 = tiny(dtype=np.float32, seed=1)
    b64 = tiny(dtype=np.float64, seed=2)
    b64.load_state_dict(a32.state_dict())
    for n, p in b64.named_parameters():
        assert p.data.dtype == np.float64
        assert np.array_equal(p.data, a32.state_dict()[n].astype(np.float64))


@pytest.mark.parametrize("how", ["wrong_shape", "missing", "unexpected", "wrong_shape_late"])
def test_load_state_dict_rejects_and_leaves_model_unchanged(backend, how):
    model, other = tiny(seed=1), tiny(seed=2)
    before = snapshot(model)
    state = {k: v.copy() for k, v in other.state_dict().items()}
    names = list(state)
    if how == "wrong_shape":
        bad = "transformer.h.0.attn.c_attn.weight"
        state[bad] = state[bad].T.copy()                  # (3C, C) instead of (C, 3C)
    elif how == "wrong_shape_late":                       # the last tensor: every other one is fine
        bad = names[-1]
        state[bad] = np.zeros(state[bad].size + 1)
    elif how == "missing":
        bad = "transformer.h.1.ln_2.bias"
        del state[bad]
    else:
        bad = "transformer.h.7.attn.c_attn.weight"
        state[bad] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        model.load_state_dict(state)
    assert_params_equal(model, before)


def test_load_state_dict_non_numeric_is_atomic(backend):
    model, other = tiny(seed=1), tiny(seed=2)
    before = snapshot(model)
    state = {k: v.copy() for k, v in other.state_dict().items()}
    state["transformer.ln_f.bias"] = np.array(["x"] * TINY["n_embd"])
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.bias"):
        model.load_state_dict(state)
    assert_params_equal(model, before)


def test_load_state_dict_untied_lm_head_rejected(backend):
    model, other = tiny(seed=1), tiny(seed=2)
    before = snapshot(model)
    state = {k: v.copy() for k, v in other.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0     # untied: must not load silently
    with pytest.raises(ValueError, match="lm_head"):
        model.load_state_dict(state)
    assert_params_equal(model, before)
    state["lm_head.weight"] = state["transformer.wte.weight"].copy()    # tied copy: fine
    model.load_state_dict(state)
    assert np.array_equal(model.state_dict()["transformer.wte.weight"], state["transformer.wte.weight"])


def test_load_state_dict_non_strict(backend):
    model, other = tiny(seed=1), tiny(seed=2)
    before = snapshot(model)
    state = {k: v.copy() for k, v in other.state_dict().items()}
    del state["transformer.wpe.weight"]
    state["something.else"] = np.zeros(3)
    model.load_state_dict(state, strict=False)
    for n, p in model.named_parameters():
        expect = before[n] if n == "transformer.wpe.weight" else state[n]
        assert np.array_equal(p.data, expect), n


# ----------------------------------------------------------------------------- forward input checks

def test_forward_rejects_bad_ids(backend):
    model = tiny()
    V, n_ctx = TINY["n_vocab"], TINY["n_ctx"]
    with pytest.raises(ValueError, match="vocabulary"):
        model.forward(np.array([[0, 1, V]]))
    with pytest.raises(ValueError, match="vocabulary"):
        model.forward(np.array([[0, -1, 2]]))
    with pytest.raises(ValueError, match="n_ctx"):
        model.forward(np.zeros((1, n_ctx + 1), dtype=np.int64))
    with pytest.raises(ValueError, match="n_ctx"):
        model.forward(np.zeros((1, 3), dtype=np.int64), start_pos=n_ctx - 2)
    with pytest.raises(ValueError):
        model.forward(np.zeros((1, 0), dtype=np.int64))
    with pytest.raises(ValueError):
        model.forward(np.zeros((1, 3)))                   # float ids
    with pytest.raises(ValueError):
        model.forward(np.zeros((1, 2, 3), dtype=np.int64))
    # the limits themselves are fine; a 1-D sequence is a batch of one
    assert model.forward(np.full((2, n_ctx), V - 1)).shape == (2, n_ctx, V)
    np.testing.assert_array_equal(model.forward(np.arange(5)), model.forward(np.arange(5)[None]))


# ----------------------------------------------------------------------------- gradients

def test_zero_grad_zeroes(backend):
    model = tiny()
    forward_backward(model, *batch())
    assert all(np.any(g != 0) for _, g in model.named_grads())
    model.zero_grad()
    assert all(g is None for _, g in model.named_grads())       # no gradient since zero_grad
    for n, p in model.named_parameters():
        assert not p.has_grad
        assert p.grad.shape == p.data.shape and np.all(p.grad == 0), n   # read: zeros, and now a gradient
        assert p.has_grad


def test_gradients_accumulate(backend, randomize):
    model = tiny(randomize=randomize)
    idx, targets = batch()
    model.zero_grad()
    forward_backward(model, idx, targets)
    once = {n: g.copy() for n, g in model.named_grads()}
    forward_backward(model, idx, targets)                 # no zero_grad in between
    for n, g in model.named_grads():
        np.testing.assert_allclose(g, 2.0 * once[n], rtol=1e-12, atol=1e-15, err_msg=n)
    # backward without an explicit zero_grad on a fresh model allocates zeroed gradients
    fresh = tiny(randomize=randomize)
    forward_backward(fresh, idx, targets)
    for n, g in fresh.named_grads():
        np.testing.assert_allclose(g, once[n], rtol=1e-12, atol=1e-15, err_msg=n)


def test_tied_embedding_collects_both_gradients(backend, randomize):
    """wte.grad = (input lookup's scatter-add) + (lm head's dlogits^T x)."""
    model = tiny(randomize=randomize)
    idx, targets = batch()
    model.zero_grad()
    logits = model.forward(idx)
    _, dlogits = npgpt.cross_entropy(logits, targets)
    model.backward(dlogits)
    total = model.wte.weight.grad.copy()
    # the head's share alone
    x = model.lm_head.x
    head_part = dlogits.reshape(-1, TINY["n_vocab"]).T @ x
    emb_part = total - head_part
    assert np.abs(head_part).max() > 0 and np.abs(emb_part).max() > 1e-6
    unused = np.setdiff1d(np.arange(TINY["n_vocab"]), idx)
    assert len(unused) > 0
    np.testing.assert_allclose(emb_part[unused], 0.0, atol=1e-15)   # the lookup only touches used ids


# ----------------------------------------------------------------------------- optimiser helpers

def test_adamw_decays_only_matrices(backend):
    model = tiny(dtype=np.float32, seed=3)
    for n, p in model.named_parameters():                 # non-zero 1-D params, so decay would show
        if p.data.ndim == 1:
            p.data[...] = 0.5
    before = snapshot(model)
    lr, wd = 0.1, 0.5
    opt = AdamW(model, lr=lr, weight_decay=wd)
    model.zero_grad()
    for p in model.parameters():
        p.grad[...] = 0.0                                 # all-zero gradients: only the decay acts
    opt.step()
    for n, p in model.named_parameters():
        if p.data.ndim >= 2:
            np.testing.assert_allclose(p.data, before[n] * (1 - lr * wd), rtol=1e-6, err_msg=n)
            assert not np.array_equal(p.data, before[n]), n
        else:
            assert np.array_equal(p.data, before[n]), n   # biases and layernorm untouched
    kinds = {n: p.data.ndim >= 2 for n, p in model.named_parameters()}
    assert kinds["transformer.wte.weight"] and kinds["transformer.wpe.weight"]
    assert not kinds["transformer.h.0.ln_1.weight"] and not kinds["transformer.h.0.attn.c_attn.bias"]


def test_adamw_packs_parameters_gradients_and_moments():
    """Each of the four lives in one flat buffer, the decayed (>= 2-D) parameters first; packing keeps
    the values, and the gradients a backward writes land in the gradient buffer."""
    from npgpt.optim import tiled_buffer
    model = tiny(seed=7)
    before = snapshot(model)
    opt = AdamW(model, lr=1e-2)
    assert_params_equal(model, before)
    params = model.parameters()
    assert tiled_buffer([p.data for p in params]) is opt.packed.P
    forward_backward(model, *batch())
    assert tiled_buffer([p.grad for p in params]) is opt.packed.G
    assert tiled_buffer(list(opt.m.values())) is opt.packed.M and tiled_buffer(list(opt.v.values())) is opt.packed.V
    n_decay = sum(p.data.size for p in params if p.data.ndim >= 2)
    assert opt.packed.n_decay == n_decay
    for p in params:                                          # decayed ones in [0, n_decay), the rest after
        offset = (p.data.ctypes.data - opt.packed.P.ctypes.data) // p.data.itemsize
        assert (offset < n_decay) == (p.data.ndim >= 2)
    assert opt.packed.intact()


def test_tiled_buffer_remembers_only_the_same_arrays():
    """tiled_buffer keeps its last answer for the same array objects; other arrays (a gap, a rebound
    view, arrays that died and whose ids were reused) are examined afresh."""
    from npgpt.optim import tiled_buffer
    buf = np.arange(10.0)
    views = [buf[:4], buf[4:]]
    assert tiled_buffer(views) is buf and tiled_buffer(views) is buf           # found, then remembered
    assert tiled_buffer([views[0], buf[5:]]) is None                            # a gap
    assert tiled_buffer([views[0], views[1], buf[4:6]]) is None                 # an overlap
    assert tiled_buffer(views) is buf
    assert tiled_buffer([views[0], views[1].copy()]) is None                    # one array rebound off the buffer
    for _ in range(3):                                                           # fresh arrays each time
        other = np.zeros(6)
        assert tiled_buffer([other[:3], other[3:]]) is other
    assert tiled_buffer([buf[:4], buf[4:9]]) is None                            # new views, not the whole buffer


@pytest.mark.parametrize("dtype, clip", [(np.float32, 1e9), (np.float64, 0.05)])
def test_adamw_packed_step_equals_per_parameter_step(backend, dtype, clip, monkeypatch):
    """The same training run with the packed update (two launches, the norm summed over one buffer)
    and with the per-parameter one (the packing undone by rebinding one parameter's array and one
    gradient's): without clipping bit for bit; with clipping the norm's summation order differs."""
    from npgpt.optim import grad_norm, tiled_buffer
    from npgpt.train.lm import count_targets, lm_loss
    from npgpt.train.loop import train_step
    a, b = tiny(dtype=dtype, seed=8), tiny(dtype=dtype, seed=8)
    opt_a, opt_b = AdamW(a, lr=1e-2, weight_decay=0.1), AdamW(b, lr=1e-2, weight_decay=0.1)
    b.wpe.weight.data = b.wpe.weight.data.copy()             # off its slice: b takes the per-parameter path
    b.h[0].ln_1.weight.grad = np.zeros_like(b.h[0].ln_1.weight.data)   # and its gradients tile no buffer
    calls = []
    real = AdamW._update
    monkeypatch.setattr(AdamW, "_update", lambda self, *args: (calls.append(self), real(self, *args)))
    packed = backend != "numpy"                               # NumPy's reference update runs per parameter
    norms = []
    for step in range(3):
        idx, targets = batch(seed=step)
        targets[targets < 0] = 0
        for model, opt in ((a, opt_a), (b, opt_b)):
            _, norm = train_step(model, opt, (idx, targets), 1e-2, loss_fn=lm_loss, count_fn=count_targets, clip=clip)
            norms.append(norm)
        n_params = len(opt_b.named)
        assert calls.count(opt_a) == (step + 1) * (2 if packed else n_params)    # two launches a step
        assert calls.count(opt_b) == (step + 1) * n_params
        assert opt_a.packed.intact() and not opt_b.packed.intact()
        assert tiled_buffer([p.grad for p in a.parameters()]) is opt_a.packed.G
        assert tiled_buffer([p.grad for p in b.parameters()]) is None
        assert grad_norm(a) == pytest.approx(grad_norm(b), rel=1e-12 if dtype == np.float64 else 1e-6)
    if clip < 1e9:
        assert min(norms) > clip                              # clipping was active in every step
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if clip >= 1e9:
            np.testing.assert_array_equal(pa.data, pb.data, err_msg=n)
            np.testing.assert_array_equal(opt_a.m[n], opt_b.m[n], err_msg=n)
            np.testing.assert_array_equal(opt_a.v[n], opt_b.v[n], err_msg=n)
        else:
            np.testing.assert_allclose(pa.data, pb.data, rtol=1e-12, atol=1e-14, err_msg=n)


def test_adamw_copied_with_its_model_takes_the_per_parameter_path():
    """A deep copy of (model, optimizer) holds copies, not views of the copied buffers: the copy's step
    must update its own parameters, not the orphaned buffers."""
    import copy
    model = tiny(seed=11)
    opt = AdamW(model, lr=1e-2)
    model2, opt2 = copy.deepcopy((model, opt))
    before = snapshot(model2)
    model2.zero_grad()
    forward_backward(model2, *batch())
    assert not opt2.packed.intact()
    opt2.step()
    for n, p in model2.named_parameters():
        assert not np.array_equal(p.data, before[n]), n


def test_tiled_buffer():
    from npgpt.optim import tiled_buffer
    buf = np.arange(10.0)
    parts = [buf[6:].reshape(2, 2), buf[:2], buf[2:6]]
    assert tiled_buffer(parts) is buf
    assert tiled_buffer(parts[:2]) is None                    # a gap
    assert tiled_buffer([buf[:6], buf[5:9]]) is None          # an overlap and a gap (sizes add up to 10)
    assert tiled_buffer([buf[::2], buf[1::2]]) is None        # strided views
    assert tiled_buffer([buf[:5], np.arange(5.0)]) is None    # another array
    assert tiled_buffer([buf.view(np.float32)]) is None       # another dtype
    assert tiled_buffer([np.frombuffer(b"\0" * 16, np.float64)]) is None   # a base that is no array
    assert tiled_buffer([]) is None


def test_adamw_packed_skips_a_parameter_without_gradient():
    """One parameter without a gradient this step: the step goes per parameter and leaves it alone
    (no decay, no move on old momentum), as the unpacked optimizer does."""
    model = tiny(seed=9)
    opt = AdamW(model, lr=1e-2, weight_decay=0.5)
    model.zero_grad()
    forward_backward(model, *batch())
    opt.step()
    model.zero_grad()
    forward_backward(model, *batch(seed=1))
    model.wte.weight.zero_grad()                              # no gradient for wte this step
    assert not opt.packed.intact()
    before = snapshot(model)
    opt.step()
    assert np.array_equal(model.wte.weight.data, before["transformer.wte.weight"])
    assert not np.array_equal(model.wpe.weight.data, before["transformer.wpe.weight"])


def test_adamw_after_load_with_assign_updates_the_new_arrays():
    """load_state_dict(assign=True) makes the state's arrays the parameters: the optimizer's next step
    updates them (per parameter), not the packed copy they left."""
    model = tiny(seed=10)
    opt = AdamW(model, lr=1e-2)
    state = {n: p.data.copy() for n, p in model.named_parameters()}
    model.load_state_dict(state, assign=True)
    before = {n: a.copy() for n, a in state.items()}
    model.zero_grad()
    forward_backward(model, *batch())
    opt.step()
    assert not opt.packed.intact()
    for n, p in model.named_parameters():
        assert p.data is state[n], n
        assert not np.array_equal(state[n], before[n]), n      # every parameter has a gradient and moved


def test_adamw_first_step_is_sign_like(backend):
    """With bias correction, the first step moves every parameter by ~lr * sign(g) (no decay)."""
    model = tiny(seed=4)
    opt = AdamW(model, lr=1e-3, weight_decay=0.0, eps=1e-12)
    before = snapshot(model)
    model.zero_grad()
    forward_backward(model, *batch())
    grads = {n: g.copy() for n, g in model.named_grads()}
    opt.step()
    for n, p in model.named_parameters():
        g = grads[n]
        big = np.abs(g) > 1e-6                            # step = lr * g / (|g| + eps)
        assert big.any(), n
        np.testing.assert_allclose((before[n] - p.data)[big], 1e-3 * np.sign(g[big]), rtol=1e-5, err_msg=n)


def test_adamw_lr_argument(backend):
    model = tiny(seed=5)
    opt = AdamW(model, lr=123.0, weight_decay=0.0)
    model.zero_grad()
    forward_backward(model, *batch())
    before = snapshot(model)
    opt.step(lr=0.0)                                      # the explicit lr wins over the default
    assert_params_equal(model, before)
    assert opt.t == 1


def test_clip_grad_norm(backend, randomize):
    model = tiny(randomize=randomize)
    model.zero_grad()
    forward_backward(model, *batch())
    grads = {n: g.copy() for n, g in model.named_grads()}
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    # above the norm: nothing changes, the norm is still returned
    got = clip_grad_norm(model, 10 * norm)
    assert got == pytest.approx(norm, rel=1e-12)
    for n, g in model.named_grads():
        assert np.array_equal(g, grads[n]), n
    # below the norm: every gradient scaled by the same factor, to max_norm
    max_norm = norm / 7
    got = clip_grad_norm(model, max_norm)
    assert got == pytest.approx(norm, rel=1e-12)          # the pre-clip norm
    after = math.sqrt(sum(float(np.vdot(g, g)) for _, g in model.named_grads()))
    assert after == pytest.approx(max_norm, rel=1e-6)
    for n, g in model.named_grads():
        np.testing.assert_allclose(g, grads[n] * (max_norm / (norm + 1e-6)), rtol=1e-12, atol=1e-18, err_msg=n)


@pytest.mark.parametrize("max_norm_factor", [0.2, 5.0])
def test_step_with_grad_scale_is_clip_then_step(backend, max_norm_factor):
    """The training loop's fused clipping (grad_norm, then step(grad_scale=clip_coef)) gives bit for bit
    the parameters of clip_grad_norm followed by step, and leaves the gradients as they were."""
    from npgpt.optim import clip_coef, grad_norm
    a, b = tiny(seed=3), tiny(seed=3)
    opt_a, opt_b = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    for step in range(3):
        for model in (a, b):
            model.zero_grad()
            forward_backward(model, *batch(seed=step))
        norm_a = clip_grad_norm(a, max_norm_factor)
        opt_a.step()
        grads = {n: g.copy() for n, g in b.named_grads()}
        norm_b = grad_norm(b)
        assert norm_b == norm_a
        assert (clip_coef(norm_b, max_norm_factor) < 1) == (max_norm_factor < 1)   # both cases are exercised
        opt_b.step(grad_scale=clip_coef(norm_b, max_norm_factor))
        for n, g in b.named_grads():
            assert np.array_equal(g, grads[n]), n
        assert_params_equal(b, snapshot(a))


def test_lr_schedule():
    max_lr, min_lr, warmup, max_steps = 6e-4, 6e-5, 10, 110
    lrs = [lr_schedule(s, max_lr, warmup, max_steps, min_lr) for s in range(130)]
    # linear warmup: (step + 1) / warmup of max_lr, reaching max_lr at the last warmup step
    assert lrs[0] == pytest.approx(max_lr / warmup, rel=1e-15)
    for s in range(warmup):
        assert lrs[s] == pytest.approx(max_lr * (s + 1) / warmup, rel=1e-15)
    assert lrs[warmup - 1] == pytest.approx(max_lr, rel=1e-15)
    # cosine: max_lr at the start, the midpoint halfway, min_lr at max_steps and after
    assert lrs[warmup] == pytest.approx(max_lr, rel=1e-15)
    assert lrs[(warmup + max_steps) // 2] == pytest.approx((max_lr + min_lr) / 2, rel=1e-12)
    assert lrs[max_steps] == pytest.approx(min_lr, rel=1e-15)
    assert all(lr == min_lr for lr in lrs[max_steps:])
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert all(min_lr <= lr <= max_lr for lr in lrs[warmup:])
    assert all(0 < lr <= max_lr for lr in lrs[:warmup])
    # no warmup, default min_lr 0
    assert lr_schedule(0, 1.0, 0, 10) == 1.0
    assert lr_schedule(10, 1.0, 0, 10) == 0.0
    assert lr_schedule(5, 1.0, 0, 10) == pytest.approx(0.5, rel=1e-12)


# ----------------------------------------------------------------------------- dropout

def test_dropout_seeded_reproducibility(backend):
    idx, _ = batch()
    a = tiny(seed=7, dropout=0.2).train()
    b = tiny(seed=7, dropout=0.2).train()
    out_a1, out_a2 = a.forward(idx), a.forward(idx)
    out_b1, out_b2 = b.forward(idx), b.forward(idx)
    assert np.array_equal(out_a1, out_b1) and np.array_equal(out_a2, out_b2)   # same seed, same stream
    assert not np.array_equal(out_a1, out_a2)                                 # fresh masks each call
    # a different seed with the very same weights gives different masks
    c = tiny(seed=8, dropout=0.2).train()
    c.load_state_dict(a.state_dict())
    assert not np.array_equal(c.forward(idx), out_a1)


def test_dropout_eval_is_deterministic_and_equals_p0(backend):
    idx, _ = batch()
    drop = tiny(seed=7, dropout=0.3)
    ref = tiny(seed=7, dropout=0.0)
    ref.load_state_dict(drop.state_dict())
    assert not np.array_equal(drop.forward(idx), ref.forward(idx))           # training mode by default
    drop.eval()
    assert all(not m.training for m in drop.modules())
    e1, e2 = drop.forward(idx), drop.forward(idx)
    assert np.array_equal(e1, e2)
    assert np.array_equal(e1, ref.forward(idx))
    assert np.array_equal(e1, ref.eval().forward(idx))
    drop.train()
    assert all(m.training for m in drop.modules())
    assert not np.array_equal(drop.forward(idx), e1)


def test_dropout_model_backward_uses_forward_masks(backend, randomize):
    """backward after a training forward uses that forward's masks: two identically seeded models agree."""
    idx, targets = batch()
    grads = []
    for _ in range(2):
        m = tiny(seed=9, dropout=0.25, randomize=randomize).train()
        m.zero_grad()
        forward_backward(m, idx, targets)
        grads.append({n: g.copy() for n, g in m.named_grads()})
    for n in grads[0]:
        assert np.array_equal(grads[0][n], grads[1][n]), n


# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_causal_mask(backend, randomize, dtype):
    """Changing token t leaves every logit at positions < t bit-identical and changes position t."""
    model = tiny(dtype=dtype, seed=11, randomize=randomize).eval()
    V, T = TINY["n_vocab"], TINY["n_ctx"]
    idx, _ = batch(seed=12, B=3, T=T)
    base = model.forward(idx)
    assert base.dtype == dtype
    for t in (0, 1, T // 2, T - 1):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 1 + np.arange(3)) % V
        out = model.forward(changed)
        assert np.array_equal(out[:, :t], base[:, :t]), t
        for b in range(3):
            assert not np.array_equal(out[b, t], base[b, t]), (t, b)
    # also a shorter sequence: a prefix gives the same logits as the full run's positions (causality)
    np.testing.assert_allclose(model.forward(idx[:, :4]), base[:, :4],
                               rtol=0, atol=(1e-5 if dtype == np.float32 else 1e-12))


def test_layer_backward_without_zero_grad():
    """A layer used on its own allocates its gradients on first backward."""
    from npgpt.layers import Linear
    rng = np.random.default_rng(0)
    layer = Linear(4, 3, dtype=np.float64, rng=rng)
    x, dy = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    layer.forward(x)
    layer.backward(dy)
    assert np.allclose(layer.weight.grad, x.reshape(-1, 4).T @ dy.reshape(-1, 3))
    assert np.allclose(layer.bias.grad, dy.reshape(-1, 3).sum(0))


def test_adamw_state_dict_roundtrip_and_validation():
    model = tiny(seed=1)
    opt = npgpt.AdamW(model, lr=1e-3)
    model.zero_grad()
    loss, dl = npgpt.cross_entropy(model.forward(np.array([[1, 2, 3]])), np.array([[2, 3, 4]]))
    model.backward(dl)
    opt.step()
    snap = opt.state_dict()
    opt.step()                                                   # the snapshot must not move with it
    assert int(snap["t"]) == 1 and not all(np.array_equal(snap[f"m/{n}"], opt.m[n]) for n in opt.m)
    other = npgpt.AdamW(model, lr=1e-3)
    bad = dict(snap)
    del bad["v/transformer.wpe.weight"]
    with pytest.raises(ValueError, match="v/transformer.wpe.weight"):
        other.load_state_dict(bad)
    bad = dict(snap, **{"m/transformer.wte.weight": np.zeros(TINY["n_embd"])})
    with pytest.raises(ValueError, match="m/transformer.wte.weight"):
        other.load_state_dict(bad)
    assert other.t == 0 and not any(m.any() for m in other.m.values())   # nothing changed
    other.load_state_dict(snap)
    assert other.t == 1 and all(np.array_equal(other.m[n], snap[f"m/{n}"]) for n in other.m)


def test_every_layer_stays_float32(backend):
    """float32 in, float32 out, forward and backward, layer by layer (an upcast inside a backward
    would otherwise hide behind the float32 gradient arrays it is added into)."""
    from npgpt.layers import GELU, MLP, Block, CausalSelfAttention, Dropout, LayerNorm, Linear
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((2, 5, 8)).astype(f32)
    layers = [Linear(8, 8, dtype=f32, rng=rng), LayerNorm(8, dtype=f32), GELU(), Dropout(0.2, seed=0),
              CausalSelfAttention(8, 2, dtype=f32, rng=rng, dropout=0.1, seed=0),
              MLP(8, dtype=f32, rng=rng, dropout=0.1, seed=0), Block(8, 2, dtype=f32, rng=rng, dropout=0.1, seed=0)]
    for layer in layers:
        layer.train()
        y = layer.forward(x)
        dx = layer.backward(np.ones_like(y))
        assert y.dtype == f32 and dx.dtype == f32, type(layer).__name__
        assert all(p.grad.dtype == f32 for p in layer.parameters()), type(layer).__name__
