"""The training loop (npgpt.train.fit): PyTorch's trajectory, exact resume, gradient accumulation,
atomic checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.train.data import BatchStream
from npgpt.train.data import Windows as DataWindows
from npgpt.train.lm import count_targets, lm_loss
from npgpt.train.loop import LoopConfig, fit, train_step
from npgpt.train.run import RunDirError, checkpoint_dir, read_metrics

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def stream(ids, T, B, shuffle=False, seed=0):
    """The batch stream `npgpt train` uses: the book's windows (stride T), batches of B, optionally shuffled."""
    return BatchStream(DataWindows(np.asarray(ids), T), B, shuffle=shuffle, seed=seed)


def tiny_model(dtype=np.float64, dropout=0.0, seed=0, V=61):
    cfg = npgpt.GPTConfig(n_vocab=V, n_ctx=16, n_embd=32, n_head=4, n_layer=2, dropout=dropout)
    return npgpt.GPT(cfg, dtype=dtype, seed=seed)


def adamw(model, **kw):
    return npgpt.AdamW(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)


def lm_fit(model, batches, cfg, **kw):
    return fit(model, adamw(model), batches, cfg, loss_fn=lm_loss, count_fn=count_targets, progress=False,
               log=lambda msg: None, **kw)


def params(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- PyTorch's trajectory
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_same_trajectory_as_pytorch(dtype):
    """Same init, same batches (no shuffle, dropout 0), AdamW with decay groups, clipping, warmup + cosine:
    npgpt's per-step losses, grad norms and final parameters match PyTorch's."""
    path = FIX / f"train_{dtype}.npz"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    f = np.load(path)
    dt = np.float32 if dtype == "f32" else np.float64
    V, n_ctx, C, NH, L = (int(v) for v in f["config"])
    cfg = npgpt.GPTConfig(n_vocab=V, n_ctx=n_ctx, n_embd=C, n_head=NH, n_layer=L)
    model = npgpt.GPT(cfg, dtype=dt, init=False)
    model.load_state_dict({k[5:]: f[k] for k in f.files if k.startswith("init/")})
    opt = npgpt.AdamW(model, lr=float(f["max_lr"]), betas=tuple(float(b) for b in f["betas"]),
                      eps=float(f["eps"]), weight_decay=float(f["weight_decay"]))
    N = int(f["N"])
    loop = LoopConfig(steps=N, lr=float(f["max_lr"]), min_lr=float(f["min_lr"]), warmup=int(f["warmup"]),
                      clip=float(f["clip"]))
    batches = stream(f["ids"], int(f["T"]), int(f["B"]))
    losses, norms = [], []
    for k in range(N):
        batch = batches.next()
        assert np.array_equal(batch[0], f["x"][k]) and np.array_equal(batch[1], f["y"][k])   # the same batches
        loss, norm = train_step(model, opt, batch, loop.lr_at(k), loss_fn=lm_loss, count_fn=count_targets,
                                clip=loop.clip)
        losses.append(loss), norms.append(norm)
    np.testing.assert_allclose(np.array([loop.lr_at(k) for k in range(N)]), f["lrs"], rtol=1e-12)
    tol = dict(f32=(2e-6, 2e-5), f64=(1e-12, 1e-10))[dtype]
    np.testing.assert_allclose(losses, f["losses"], rtol=tol[0])
    np.testing.assert_allclose(norms, f["grad_norms"], rtol=tol[0] * 10)
    for name, p in model.state_dict().items():
        ref = f["final/" + name]
        if name.endswith("attn.c_attn.bias"):
            # the key bias [C:2C] has an exactly-zero true gradient: Adam turns its rounding noise into
            # steps of up to lr, in any float32 implementation (PyTorch f32 vs f64 differ by 1e-3 there)
            key = slice(C, 2 * C)
            assert np.abs(p[key] - ref[key]).max() <= (tol[1] if dtype == "f64" else 2 * f["lrs"].sum()), name
            p, ref = np.delete(p, np.s_[C:2 * C]), np.delete(ref, np.s_[C:2 * C])
        assert np.abs(p - ref).max() <= tol[1] * max(1.0, np.abs(ref).max()), name


# ----------------------------------------------------------------------------- accumulation
def test_batch_8_equals_batch_4_with_grad_accum_2():
    ids = np.random.default_rng(1).integers(0, 61, 2000)
    runs = []
    for B_micro, accum in ((8, 1), (8, 2), (8, 4)):
        model = tiny_model()
        lm_fit(model, stream(ids, 16, B_micro), LoopConfig(steps=6, lr=1e-2, warmup=2, grad_accum=accum))
        runs.append(params(model))
    for other in runs[1:]:
        for k in runs[0]:
            np.testing.assert_allclose(other[k], runs[0][k], rtol=0, atol=1e-12, err_msg=k)


def test_accumulation_weighs_every_target_equally():
    """Micro-batches with different numbers of non-ignored targets: the accumulated gradient is the
    gradient of the mean over the whole batch, not a mean of micro-batch means."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 61, (4, 16))
    y = rng.integers(0, 61, (4, 16))
    y[:2, 3:] = -100                                       # the first micro-batch holds far fewer targets
    grads = []
    for accum in (1, 2):
        model = tiny_model()
        opt = adamw(model)
        loss, _ = train_step(model, opt, (x, y), 0.0, loss_fn=lm_loss, count_fn=count_targets, grad_accum=accum,
                             clip=0)
        grads.append((loss, {k: g.copy() for k, g in model.named_grads()}))
    assert abs(grads[0][0] - grads[1][0]) < 1e-12
    for k in grads[0][1]:
        np.testing.assert_allclose(grads[1][1][k], grads[0][1][k], rtol=0, atol=1e-13, err_msg=k)


# ----------------------------------------------------------------------------- resume
def _interrupt_at(step_to_stop, *signals):
    """A loss_fn that sends this process SIGINT (a Ctrl-C), or the given signals one after another, during
    update `step_to_stop` (1-based)."""
    calls = {"n": 0}

    def loss_fn(model, batch, n):
        calls["n"] += 1
        if calls["n"] == step_to_stop:
            for sig in signals or (signal.SIGINT,):
                os.kill(os.getpid(), sig)
        return lm_loss(model, batch, n)
    return loss_fn


def test_sigterm_stops_after_the_update_with_a_checkpoint_and_a_second_signal_at_once(tmp_path, monkeypatch):
    """SIGTERM (a batch system's time limit, `kill`, `timeout`) is a Ctrl-C: the update in progress ends, a
    checkpoint is written, the result names the signal (exit status 143 for a command). The same signal
    delivered twice at once (a scheduler's and mpiexec's forward) is one request; a second one later
    interrupts at once. The handlers are put back afterwards."""
    from npgpt.train import loop
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    model, batches, evaluate, run = _resume_setup(tmp_path, "term")
    r = fit(model, adamw(model), batches, LoopConfig(steps=12, lr=3e-3, save_every=5),
            loss_fn=_interrupt_at(7, signal.SIGTERM, signal.SIGTERM), count_fn=count_targets, run_dir=run,
            progress=False, log=lambda m: None)
    assert r.interrupted and r.step == 7 and r.signal == "SIGTERM" and r.exit_status == 143
    assert checkpoint_dir(run).endswith("ckpt-000007")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    model, batches, evaluate, run = _resume_setup(tmp_path, "both")    # Ctrl-C and a scheduler's SIGTERM at once
    r = fit(model, adamw(model), batches, LoopConfig(steps=12, lr=3e-3), loss_fn=_interrupt_at(4, signal.SIGINT,
            signal.SIGTERM), count_fn=count_targets, run_dir=run, progress=False, log=lambda m: None)
    assert r.step == 4 and r.signal == "SIGTERM" and checkpoint_dir(run).endswith("ckpt-000004")

    monkeypatch.setattr(loop._StopOnSignal, "REPEAT_S", 0.0)      # the second one comes "later"
    model, batches, evaluate, run = _resume_setup(tmp_path, "twice")
    with pytest.raises(KeyboardInterrupt):
        fit(model, adamw(model), batches, LoopConfig(steps=12, lr=3e-3), loss_fn=_interrupt_at(3, signal.SIGTERM,
            signal.SIGTERM), count_fn=count_targets, run_dir=run, progress=False, log=lambda m: None)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_ranks_agree_on_one_stop():
    """Each rank's request (None, SIGINT, SIGTERM) summed in one all-reduce: no stop unless one asked, SIGTERM
    over SIGINT, however many ranks asked for which."""
    from npgpt.train.loop import _agree_on_stop

    class Ranks:
        def __init__(self, requests):
            self.requests, self.world_size = requests, len(requests)

        def allreduce_sum(self, x):
            codes = {None: 0.0, "SIGINT": 1.0, "SIGTERM": self.world_size + 1.0}
            assert x == codes[self.requests[0]]                      # this rank's own vote
            return sum(codes[r] for r in self.requests)
    for requests, want in [([None] * 4, None), (["SIGINT"] * 4, "SIGINT"), ([None, None, "SIGINT"], "SIGINT"),
                           (["SIGINT", "SIGTERM"], "SIGTERM"), (["SIGTERM"] * 16, "SIGTERM"),
                           ([None, "SIGTERM", None], "SIGTERM"), (["SIGINT"] * 15 + ["SIGTERM"], "SIGTERM")]:
        for r in range(len(requests)):                               # as each rank sees it
            mine = requests[r:] + requests[:r]
            assert _agree_on_stop(mine[0], Ranks(mine)) == want, (requests, r)


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir / "metrics.jsonl")]


def _resume_setup(tmp_path, name):
    ids = np.random.default_rng(3).integers(0, 61, 3000)
    model = tiny_model(dropout=0.1, seed=5)
    batches = stream(ids, 16, 4, shuffle=True, seed=7)
    evaluate = lambda m: {"train_loss": npgpt.train.lm.mean_loss(m, [stream(ids, 16, 4).next()]),
                          "val_loss": npgpt.train.lm.mean_loss(m, [stream(ids[::-1].copy(), 16, 4).next()])}
    return model, batches, evaluate, tmp_path / name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resumed_run_equals_uninterrupted_run(tmp_path, dtype):
    """Ctrl-C at update 9 writes a checkpoint; --resume then ends bit for bit where the uninterrupted run
    ends: parameters, AdamW moments and metrics rows (with dropout and per-epoch shuffling on, so every
    RNG state and the data position must come back). A row a killed run wrote after its checkpoint is
    dropped."""
    cfg = LoopConfig(steps=23, lr=3e-3, warmup=3, eval_every=5, save_every=4)   # > 1 epoch (16 batches)

    model, batches, evaluate, full = _resume_setup(tmp_path, "full")
    model = model.__class__(model.config, dtype=dtype, seed=5)
    opt_full = adamw(model)
    fit(model, opt_full, batches, cfg, loss_fn=lm_loss, count_fn=count_targets, evaluate=evaluate, run_dir=full,
        progress=False, log=lambda m: None)
    expected = params(model)

    model, batches, evaluate, run = _resume_setup(tmp_path, "resumed")
    model = model.__class__(model.config, dtype=dtype, seed=5)
    r = fit(model, adamw(model), batches, cfg, loss_fn=_interrupt_at(9), count_fn=count_targets, evaluate=evaluate,
            run_dir=run, progress=False, log=lambda m: None)
    assert r.interrupted and r.step == 9 and checkpoint_dir(run).endswith("ckpt-000009")
    with open(run / "metrics.jsonl", "a") as f:                 # as if a killed run got one row further
        f.write(json.dumps({"step": 10, "loss": 1.0, "lr": 0.0, "grad_norm": 0.0, "tokens_per_s": 1.0}) + "\n")

    model, batches, evaluate, _ = _resume_setup(tmp_path, "resumed")
    model = model.__class__(model.config, dtype=dtype, seed=123)  # different init: all of it must come from disk
    opt = adamw(model)
    r = fit(model, opt, batches, cfg, loss_fn=lm_loss, count_fn=count_targets, evaluate=evaluate, run_dir=run,
            resume=True, progress=False, log=lambda m: None)
    assert r.step == 23 and not r.interrupted
    for k, v in expected.items():
        assert np.array_equal(model.state_dict()[k], v), k
    for k, v in opt_full.state_dict().items():
        assert np.array_equal(opt.state_dict()[k], v), k
    assert _rows(run) == _rows(full)
    assert [r["step"] for r in _rows(full) if "val_loss" in r] == [0, 5, 10, 15, 20, 23]
    assert [r["step"] for r in _rows(full) if "loss" in r] == list(range(1, 24))
    assert (run / "loss.png").stat().st_size > 1000


def test_resume_needs_a_checkpoint(tmp_path):
    model = tiny_model()
    with pytest.raises(RunDirError, match="no checkpoint"):
        lm_fit(model, stream(np.arange(200) % 61, 16, 2), LoopConfig(steps=2), run_dir=tmp_path / "none",
               resume=True)
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- checkpoints
def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    from npgpt.train import run as run_mod
    ids = np.random.default_rng(4).integers(0, 61, 1000)
    model = tiny_model()
    lm_fit(model, stream(ids, 16, 2), LoopConfig(steps=2), run_dir=tmp_path)
    good = checkpoint_dir(tmp_path)
    saved = params(model)

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(run_mod, "save_safetensors", broken)     # the optimizer file fails mid-checkpoint
    with pytest.raises(OSError, match="disk full"):
        run_mod.save_checkpoint(tmp_path, model, adamw(model), {"step": 3, "tokens": 0})
    assert checkpoint_dir(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".ckpt", "ckpt"))) == ["ckpt-000002"]
    loaded = npgpt.load_model(tmp_path, dtype=np.float64)
    for k, v in saved.items():
        assert np.array_equal(loaded.state_dict()[k], v)


KILL_CHILD = r"""
import sys, numpy as np, npgpt
from npgpt.train.run import save_checkpoint
cfg = npgpt.GPTConfig(n_vocab=61, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
model = npgpt.GPT(cfg, dtype=np.float64, seed=0)
opt = npgpt.AdamW(model)
step = 0
print("ready", flush=True)
while True:
    step += 1
    for p in model.parameters():
        p.data[...] = step                      # every tensor of checkpoint k holds k
    save_checkpoint(sys.argv[1], model, opt, {"step": step, "tokens": step})
"""


def test_a_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    """A process writing checkpoints back to back is SIGKILLed at several moments; each time the
    `checkpoint` link names a complete checkpoint whose every tensor holds its own step."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for delay in (0.6, 0.9, 1.3):
        run = tmp_path / f"run{delay}"
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(run)], stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        path = checkpoint_dir(run)
        assert path is not None
        step = json.load(open(os.path.join(path, "trainer.json")))["step"]
        model = npgpt.load_model(run, dtype=np.float64)
        assert all(np.all(p.data == step) for p in model.parameters())
