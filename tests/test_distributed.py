"""Data-parallel training over MPI: `mpiexec -n 2 npgpt train` against one process, a rank that dies,
a rank that raises, and npgpt.distributed with no MPI at all.

The MPI tests start `mpiexec -n 2` (MPICH's hydra from the mpich wheel, fork launcher, localhost) as
subprocesses and skip when mpiexec or mpi4py is missing; `pip install -e ".[test]"` installs both."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

import npgpt
from npgpt.distributed import MPI_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mpiexec():
    local = os.path.join(sysconfig.get_path("scripts"), "mpiexec")      # the mpich wheel's
    return local if os.access(local, os.X_OK) else shutil.which("mpiexec")


def _have_mpi4py():
    try:
        import importlib.util
        return importlib.util.find_spec("mpi4py") is not None
    except (ImportError, ValueError):
        return False


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None or not _have_mpi4py(), reason="mpiexec or mpi4py not installed")


def _env(kernels="numpy"):
    """The subprocesses' environment. NumPy kernels by default: what MPI does is independent of the
    backend, and they spare each process Numba's compilation (the float32 test runs Numba)."""
    env = {k: v for k, v in os.environ.items() if k not in MPI_ENV}
    env["NPGPT_KERNELS"] = kernels
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HYDRA_LAUNCHER"] = "fork"                     # no ssh: every rank on this machine
    env.setdefault("OMP_NUM_THREADS", "1")             # 2 ranks on a small CI machine
    return env


def _mpi_cmd(n, *args):
    return [MPIEXEC, "-n", str(n), "-launcher", "fork", "-hosts", "127.0.0.1", sys.executable, *map(str, args)]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.txt"
    rng = random.Random(0)
    path.write_text("".join(rng.choice("abcdefgh ij\n") for _ in range(12000)))
    return path


def _train_args(text, out, dtype, steps=4, extra=()):
    return ["-m", "npgpt", "train", "--config", "tiny", "--tokenizer", "char", "--data", text, "--context", 16,
            "--batch", 4, "--steps", steps, "--eval-every", 0, "--eval-batches", 1, "--sample-tokens", 4,
            "--dtype", dtype, "--no-progress", "--out", out, *extra]


REF64 = dict(dtype="float64", steps=12, extra=["--save-every", 3])      # the 1-process float64 reference run


@pytest.fixture(scope="module")
def ref64(tmp_path_factory, text):
    out = tmp_path_factory.mktemp("ref") / "ref64"
    _run([sys.executable, *map(str, _train_args(text, out, **REF64))])
    return out


def _run(cmd, timeout=60, kernels="numpy"):
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(kernels), timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _weights(run_dir, dtype):
    return dict(npgpt.load_model(str(run_dir), dtype=np.dtype(dtype)).state_dict())


# ----------------------------------------------------------------------------- no MPI
def test_single_process_imports_no_mpi():
    code = ("import sys, npgpt.distributed as d; x = d.init(); "
            "print(x.rank, x.world_size, x.is_main, d.rank(), d.world_size(), d.is_main(), 'mpi4py' in sys.modules)")
    r = _run([sys.executable, "-c", code])
    assert r.stdout.split() == ["0", "1", "True", "0", "1", "True", "False"]


def test_launch_detection():
    from npgpt.distributed import launched_by_mpi
    assert not launched_by_mpi({"PATH": "/bin"})
    for k in ("PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        assert launched_by_mpi({k: "0"})


# ----------------------------------------------------------------------------- MPI
def _compare(one, two, dtype, tol):
    """The final weights agree to tol; every logged loss and gradient norm to 64 eps of dtype, relative.
    The runs differ only in the order of the batch's sums (each rank's rows, then across ranks): each
    sum of the n = 4 * 16 positive token losses is within (n - 1) eps / 2 of the exact one, so the two
    within 63 eps; and the weights each step starts from differ in their last bits (the loss does not
    depend on the key biases, where Adam amplifies rounding). 1 eps at most is seen."""
    a, b = _weights(one, dtype), _weights(two, dtype)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= tol, worst
    rows_one = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_one) == len(rows_two)
    rtol = 64 * np.finfo(dtype).eps
    for x, y in zip(rows_one, rows_two):
        for k in ("loss", "grad_norm", "val_loss"):
            if k in x:
                assert abs(x[k] - y[k]) <= rtol * abs(x[k]), (k, x[k], y[k])


@needs_mpi
def test_two_ranks_train_what_one_process_trains_float64(tmp_path, text, ref64):
    two = tmp_path / "two"
    r = _run(_mpi_cmd(2, *_train_args(text, two, **REF64)))
    assert r.stdout.count("npgpt train: done") == 1             # only rank 0 prints
    _compare(ref64, two, "float64", 1e-10)


@needs_mpi
@pytest.mark.parametrize("extra", [[], ["--shard-optimizer"]], ids=["whole", "sharded"])
def test_two_ranks_train_what_one_process_trains_float32(tmp_path, text, extra):
    """float32 on the Numba kernels (AdamW's, the norm's), AdamW whole on every rank or sharded over them."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, *map(str, _train_args(text, one, "float32"))], kernels="numba")
    _run(_mpi_cmd(2, *_train_args(text, two, "float32", extra=extra)), kernels="numba")
    _compare(one, two, "float32", 1e-5)


@needs_mpi
def test_dropout_ranks_draw_their_own_masks_and_resume_across_rank_counts(tmp_path, text):
    out = tmp_path / "drop"
    _run(_mpi_cmd(2, *_train_args(text, out, "float32", steps=2, extra=["--dropout", "0.1"])))
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    r0, r1 = state["rank_rngs"]
    assert r0 == state["rngs"] and r0 != r1                      # rank 1 has its own streams, saved too
    # a finished run resumed with another rank count: loads on every rank, nothing left to do
    r = _run([sys.executable, "-m", "npgpt", "train", "--out", str(out), "--resume", "--no-progress"])
    assert r.stdout.count("done, 2 updates") == 1


@needs_mpi
def test_batch_must_split_over_ranks_and_grad_accum(tmp_path, text):
    r = subprocess.run(_mpi_cmd(2, *_train_args(text, tmp_path / "x", "float32", extra=["--grad-accum", "4"])),
                       capture_output=True, text=True, env=_env(), timeout=60, cwd=ROOT)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("npgpt train: error")]
    assert len(lines) == 1 and "2 processes x --grad-accum 4" in lines[0], r.stderr
    assert not (tmp_path / "x").exists()


@needs_mpi
def test_an_exception_on_one_rank_ends_the_job(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(
        "import argparse\n"
        "import npgpt.distributed as d\n"
        "from npgpt.cli import _main_mpi\n"
        "def f(args):\n"
        "    if d.rank() == 1:\n"
        "        raise RuntimeError('boom')\n"
        "    d.init().barrier()                      # rank 0 would wait here forever\n"
        "_main_mpi(argparse.Namespace(command='test', func=f))\n")
    t0 = time.monotonic()
    r = subprocess.run(_mpi_cmd(2, script), capture_output=True, text=True, env=_env(), timeout=30, cwd=ROOT)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 20
    assert "npgpt test: error on rank 1 of 2: RuntimeError: boom" in r.stderr, r.stderr


def _pid_of_rank(tag, rank):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if env.get(b"NPGPT_TEST_TAG") == tag.encode() and env.get(b"PMI_RANK") == str(rank).encode():
            return int(pid)
    return None


@needs_mpi
def test_killing_a_rank_ends_the_job_and_the_checkpoint_loads(tmp_path, text):
    out = tmp_path / "killed"
    tag = f"kill-{os.getpid()}-{time.time_ns()}"
    env = {**_env(), "NPGPT_TEST_TAG": tag}
    cmd = _mpi_cmd(2, *_train_args(text, out, "float32", steps=100000, extra=["--save-every", 5]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "checkpoint").exists(), "no checkpoint was written"
        pid = _pid_of_rank(tag, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        outs, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 15
        assert proc.returncode != 0
        assert "BAD TERMINATION" in outs + err and "signal 9" in outs + err, outs[-2000:] + err[-2000:]   # hydra's report
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    model = npgpt.load_model(str(out))
    assert model.num_parameters() > 0


@needs_mpi
@pytest.mark.parametrize("shard", [False, True])
def test_a_one_process_run_interrupted_resumes_exactly_on_two_ranks(tmp_path, text, ref64, shard):
    """Ctrl-C a 1-process float64 run after its first checkpoint, resume it with mpiexec -n 2, AdamW whole
    or sharded (--shard-optimizer: each rank loads its half of the moments): the final weights and
    optimizer state are the uninterrupted 1-process run's (any rank count that divides the batch resumes)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *map(str, _train_args(text, run, **REF64))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (run / "checkpoint").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    stopped = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert 0 < stopped < REF64["steps"]                                   # the resume has updates to make
    r = _run(_mpi_cmd(2, "-m", "npgpt", "train", "--out", run, "--resume", "--no-progress",
                      *(["--shard-optimizer"] if shard else [])))
    assert r.stdout.count(f"done, {REF64['steps']} updates") == 1
    a, b = _weights(ref64, "float64"), _weights(run, "float64")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-10, stopped
    a, b = _optimizer_state(ref64), _optimizer_state(run)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-10, stopped


@needs_mpi
def test_sigterm_to_mpiexec_stops_every_rank_at_one_update_with_a_checkpoint(tmp_path, text, ref64):
    """A batch system's SIGTERM to `mpiexec -n 2 npgpt train` (which forwards it to the ranks): the ranks
    agree on the update to stop after, rank 0 writes the checkpoint, the job says so and exits 143; a resume
    in one process then ends where the uninterrupted 1-process run ends."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_mpi_cmd(2, *_train_args(text, run, **REF64)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (run / "checkpoint").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    stopped = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert 0 < stopped < REF64["steps"], out + err                        # the resume has updates to make
    assert proc.returncode == 143, out + err
    assert err.count(f"stopped by SIGTERM at step {stopped}; checkpoint written") == 1, err
    r = _run([sys.executable, "-m", "npgpt", "train", "--out", run, "--resume", "--no-progress"])
    assert r.stdout.count(f"done, {REF64['steps']} updates") == 1
    a, b = _weights(ref64, "float64"), _weights(run, "float64")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-10, stopped


@needs_mpi
def test_allreduce_grads_sums_and_agrees_on_parameters_without_gradients(tmp_path):
    """Bucketed flat Allreduce: sums; a gradient on one rank only is reduced with zeros from the other;
    a parameter with no gradient anywhere stays without one on every rank (AdamW skips it everywhere)."""
    script = tmp_path / "grads.py"
    script.write_text(
        "import json, numpy as np, npgpt.distributed as d\n"
        "from npgpt.layers.module import Module, Parameter\n"
        "class M(Module):\n"
        "    def __init__(self):\n"
        "        self.a = Parameter(np.zeros((3, 4))); self.b = Parameter(np.zeros(5, np.float32))\n"
        "        self.c = Parameter(np.zeros(2)); self.e = Parameter(np.zeros(7))\n"
        "d.BUCKET_BYTES = 16                           # several buckets even for this tiny model\n"
        "x = d.init(); m = M(); m.zero_grad(); r = x.rank\n"
        "m.a.grad[...] = r + 1; m.b.grad[...] = 10 * (r + 1)\n"
        "if r == 1: m.c.grad[...] = 7\n"
        "x.allreduce_grads(m)\n"
        "out = {k: (p.has_grad, p.grad.tolist() if p.has_grad else None) for k, p in m.named_parameters()}\n"
        "import sys; open(sys.argv[1] + f'.{r}', 'w').write(json.dumps([r, out, x.bytes_per_step]))\n")
    # each rank writes its own file: the launcher may merge two ranks' stdout lines into one
    _run(_mpi_cmd(2, script, tmp_path / "out"))
    rows = sorted(json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2))
    assert len(rows) == 2 and rows[0][1] == rows[1][1]
    got = rows[0][1]
    assert np.all(np.array(got["a"][1]) == 3) and np.all(np.array(got["b"][1]) == 30)
    assert got["c"] == [True, [7.0, 7.0]] and got["e"] == [False, None]
    assert rows[0][2] == (12 + 2 + 7) * 8 + 5 * 4            # float64 and float32 buffers, every parameter


@needs_mpi
def test_allreduce_grads_reduces_adamws_packed_gradients_where_they_are(tmp_path):
    """With AdamW built, the gradients tile its flat buffer G: that buffer is reduced in place, with no
    copy (no flat buffers of allreduce's own are made), and each .grad is still its view of G. A rank
    without one gradient sends that step down the copying path (sums with zeros from it), and the
    next step with every gradient takes the in-place path again. A frozen parameter takes no part."""
    script = tmp_path / "packed.py"
    script.write_text(
        "import json, sys, numpy as np, npgpt.distributed as d\n"
        "from npgpt.layers.module import Module, Parameter\n"
        "from npgpt.optim import AdamW\n"
        "class M(Module):\n"
        "    def __init__(self):\n"
        "        self.w = Parameter(np.zeros((3, 4), np.float32)); self.b = Parameter(np.zeros(5, np.float32))\n"
        "        self.u = Parameter(np.zeros((2, 2), np.float32))\n"
        "        self.f = Parameter(np.zeros(3, np.float32), requires_grad=False)\n"
        "d.BUCKET_BYTES = 16                           # several buckets even for this tiny model\n"
        "x = d.init(); m = M(); opt = AdamW(m); r = x.rank; G = opt.packed.G; log = []\n"
        "for step, skip in enumerate([False, True, False]):\n"
        "    m.zero_grad()\n"
        "    m.w.grad[...] = (r + 1) * np.arange(12).reshape(3, 4); m.b.grad[...] = 10 * (r + 1) + step\n"
        "    if not (skip and r == 1): m.u.grad[...] = 100 * (r + 1)\n"
        "    x.allreduce_grads(m)\n"
        "    views = all(p.grad.base is G for p in (m.w, m.b, m.u))\n"
        "    log.append([m.w.grad.tolist(), m.b.grad.tolist(), m.u.grad.tolist(), m.f.has_grad, views,\n"
        "                len(x._plans), x.bytes_per_step])\n"
        "open(sys.argv[1] + f'.{r}', 'w').write(json.dumps(log))\n")
    _run(_mpi_cmd(2, script, tmp_path / "out"))
    logs = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert logs[0] == logs[1]
    (w0, b0, u0, f0, views0, plans0, sent0), (w1, b1, u1, f1, views1, plans1, sent1), last = logs[0]
    assert np.array_equal(w0, 3 * np.arange(12).reshape(3, 4)) and np.all(np.array(b0) == 30)
    assert np.all(np.array(u0) == 300) and not f0 and views0
    assert plans0 == 0 and sent0 == (12 + 5 + 4) * 4        # in place: G alone went to MPI
    assert np.array_equal(w1, w0) and np.all(np.array(b1) == 32) and np.all(np.array(u1) == 100)   # rank 1: zeros
    assert plans1 == 1 and sent1 == (12 + 5 + 4 + 3) * 4 and views1    # copied (every parameter's slot), back into G
    assert last[1] == [34.0] * 5 and last[5] == 1 and last[6] == (12 + 5 + 4) * 4   # in place again


@needs_mpi
@pytest.mark.parametrize("extra", [[], ["--shard-optimizer"], ["--shard-optimizer", "--trainable-blocks", "1"]],
                         ids=["whole", "sharded", "sharded-last-block"])
def test_two_ranks_fine_tune_a_classifier_as_one_process_does(tmp_path, extra):
    """`mpiexec -n 2 npgpt finetune classify` ends on the weights of the one-process run (same global batch),
    with AdamW whole or sharded over the ranks (ZeRO-1; also with the lower blocks frozen, out of its shards)."""
    from npgpt.finetune.classifier import Classifier
    base = tmp_path / "base"
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=32, n_embd=32, n_head=2, n_layer=2), seed=0), base)
    rng = random.Random(0)
    words = {"spam": "win free cash prize call now claim".split(), "ham": "see you at lunch later ok thanks".split()}
    rows = [f"{c}\t{' '.join(rng.choice(words[c]) for _ in range(rng.randint(2, 9)))}"
            for c in ["spam", "ham"] * 30]
    data = tmp_path / "d.tsv"
    data.write_text("\n".join(rows) + "\n")

    def args(out):
        return ["-m", "npgpt", "finetune", "classify", "--data", data, "--init", base, "--out", out, "--epochs", 2,
                "--batch", 4, "--trainable-blocks", "all", "--lr", 1e-3, "--max-length", 16, "--no-progress"]
    blocks = extra[extra.index("--trainable-blocks"):] if "--trainable-blocks" in extra else []
    _run([sys.executable, *map(str, args(tmp_path / "one")), *blocks])
    _run(_mpi_cmd(2, *args(tmp_path / "two"), *extra))
    one = Classifier.load(tmp_path / "one").state_dict()
    two = Classifier.load(tmp_path / "two").state_dict()
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-5 * max(1.0, np.abs(one[k]).max()), err_msg=k)
    start = npgpt.load_model(base).state_dict()
    frozen = "--trainable-blocks" in extra
    assert np.array_equal(two["gpt.transformer.h.0.mlp.c_fc.weight"], start["transformer.h.0.mlp.c_fc.weight"]) == frozen
    assert not np.array_equal(two["gpt.transformer.h.1.mlp.c_fc.weight"], start["transformer.h.1.mlp.c_fc.weight"])
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["test_accuracy"]


OVERLAP_SCRIPT = '''
import json, sys, numpy as np, npgpt.distributed as d
from npgpt.config import GPTConfig
from npgpt.model import GPT
from npgpt.optim import AdamW
from npgpt.train.lm import count_targets, lm_loss
from npgpt.train.loop import train_step
x = d.init(); r = x.rank
cfg = GPTConfig(n_vocab=31, n_ctx=8, n_embd=16, n_head=2, n_layer=3)

progress_thread = d._Progress

def run(dist, accum, bucket_bytes=d.BUCKET_BYTES, freeze=False, rebind=False, overlap=True, thread=True):
    d.BUCKET_BYTES, d.OVERLAP = bucket_bytes, overlap
    d._Progress = progress_thread if thread else (lambda MPI: None)   # none: each report tests the buckets
    m = GPT(cfg, dtype=np.float64, seed=0)
    if freeze:
        m.h[1].ln_1.weight.requires_grad = False             # a frozen parameter: no overlap
    opt = AdamW(m, lr=1e-2); rng = np.random.default_rng(1); log = []
    if rebind and r == 1:
        m.wpe.weight.grad = np.zeros_like(m.wpe.weight.data)  # rank 1 alone leaves the packed buffer
    for step in range(4):
        xb = rng.integers(0, cfg.n_vocab, (4, cfg.n_ctx))
        train_step(m, opt, (xb, np.roll(xb, -1, 1)), 1e-2, loss_fn=lm_loss, count_fn=count_targets,
                   grad_accum=accum, dist=dist)
        log.append([getattr(dist, "overlapped_buckets", 0), getattr(dist, "overlapped_bytes", 0)])
    return m, log

out = {}
for name, kw in {"accum1": dict(accum=1), "accum2": dict(accum=2), "buckets64": dict(accum=1, bucket_bytes=64),
                 "no_thread": dict(accum=2, thread=False),
                 "frozen": dict(accum=1, freeze=True), "ranks_disagree": dict(accum=2, rebind=True),
                 "off": dict(accum=1, overlap=False)}.items():
    two, log = run(x, **kw)
    kw.pop("rebind", None)
    one, _ = run(d.LocalDist(), **kw)                         # one process, the whole batch
    diff = max(float(np.max(np.abs(p.data - q.data))) for p, q in zip(two.parameters(), one.parameters()))
    out[name] = [diff, log]
blocks = sum(p.data.nbytes for mod in (two.ln_f, *two.h) for p in mod.parameters())   # all but wte, wpe
open(sys.argv[1] + f".{r}", "w").write(json.dumps([out, blocks]))
'''


@needs_mpi
def test_gradients_summed_during_the_backward_train_what_one_process_trains(tmp_path):
    """mpiexec -n 2, float64: each block's gradients start their Allreduce (Iallreduce) as its backward
    ends; 4 updates end on the weights one process computes on the same global batch (1e-9), with
    grad_accum 1 and 2 (only the last micro-batch's backward starts buckets) and with buckets cut
    small, and with no progress thread (MPI without thread support). The overlapped path is taken
    (buckets started during the backward: ln_f's, then two a block, its matrices and its vectors,
    whose slices lie in AdamW's two parts), and not taken, with the same result, when a parameter is
    frozen, when rank 1 alone has a gradient outside the packed buffer, or with OVERLAP off."""
    script = tmp_path / "overlap.py"
    script.write_text(OVERLAP_SCRIPT)
    _run(_mpi_cmd(2, script, tmp_path / "out"))
    (out0, blocks), (out1, _) = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    for name in out0:
        assert out0[name][0] <= 1e-9 and out1[name][0] <= 1e-9, (name, out0[name][0], out1[name][0])
        assert out0[name][1] == out1[name][1], name                          # the ranks agree
    n_layer = 3
    for name in ("accum1", "accum2", "no_thread"):
        assert out0[name][1] == [[1 + 2 * n_layer, blocks]] * 4, (name, out0[name][1])
    assert all(n > 1 + 2 * n_layer and sent == blocks for n, sent in out0["buckets64"][1])
    for name in ("frozen", "ranks_disagree", "off"):
        assert out0[name][1] == [[0, 0]] * 4, (name, out0[name][1])


# ----------------------------------------------------------------------------- ZeRO-1: ShardedAdamW
def test_shard_bounds_tile_the_buffer_in_aligned_near_equal_parts():
    from npgpt.optim import shard_bounds
    for n in (0, 5, 16, 1000, 124_439_808):
        for w in (1, 2, 3, 7, 16):
            b = shard_bounds(n, w)
            assert len(b) == w and b[0][0] == 0 and b[-1][1] == n
            assert all(hi == lo2 for (_, hi), (lo2, _) in zip(b, b[1:]))               # no gap, no overlap
            assert all(lo % 16 == 0 and lo <= hi for lo, hi in b)
            sizes = [hi - lo for lo, hi in b[:-1]]
            assert not sizes or max(sizes) - min(sizes) <= 16


class _Rank:
    """The rank/world attributes of a dist, for ShardedAdamW built in one process (no MPI)."""
    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size


@pytest.mark.parametrize("kernels", ["numpy", "numba"])
def test_sharded_adamw_updates_each_shard_as_adamw_updates_the_whole(kernels, monkeypatch):
    """Three shards of one process's GPT (no MPI): each rank's update of P[lo:hi] from the summed gradient's
    slice is AdamW's update of those elements, bit for bit (elementwise, same kernel), over 3 steps with
    clipping's grad_scale; the moments load from AdamW's state_dict into the right slices, and one shard
    (world 1) gives AdamW's state_dict back."""
    from npgpt import fast
    from npgpt.config import GPTConfig
    from npgpt.distributed import LocalDist
    from npgpt.model import GPT
    from npgpt.optim import AdamW, ShardedAdamW
    monkeypatch.setattr(fast, "use_numba", lambda: kernels == "numba")
    cfg = GPTConfig(n_vocab=29, n_ctx=8, n_embd=16, n_head=2, n_layer=2)
    ref = GPT(cfg, dtype=np.float32, seed=0)
    opt = AdamW(ref, lr=1e-2, weight_decay=0.1)
    W = 3
    shards = [GPT(cfg, dtype=np.float32, seed=0) for _ in range(W)]
    opts = [ShardedAdamW(m, _Rank(r, W), lr=1e-2, weight_decay=0.1) for r, m in enumerate(shards)]
    assert opts[0].packed.n_decay not in {lo for lo, _ in opts[0].bounds}     # a shard holds both parts
    rng = np.random.default_rng(0)
    for step in range(3):
        for p in ref.parameters():
            p.grad = p.grad                                  # marks each as having a gradient (zeros)
        G = rng.standard_normal(opt.packed.G.size).astype(np.float32)
        opt.packed.G[...] = G
        opt.step(grad_scale=0.5)
        for o in opts:
            o.grad[...] = G[o.lo:o.hi]                       # what the reduce-scatter leaves in each shard
            o.grad_summed = True                             # (and says it did)
            o.step(grad_scale=0.5)
        with pytest.raises(RuntimeError, match="no reduce-scatter"):
            opts[0].step()                                   # not summed again since its last step
        joined = np.concatenate([o.packed.P[o.lo:o.hi] for o in opts])
        np.testing.assert_array_equal(joined, opt.packed.P)
    state = opt.state_dict()
    fresh = [ShardedAdamW(GPT(cfg, dtype=np.float32, seed=0), _Rank(r, W)) for r in range(W)]
    for o in fresh:
        o.load_state_dict(state)
        assert o.t == 3
    np.testing.assert_array_equal(np.concatenate([o.m for o in fresh]), np.concatenate([o.m for o in opts]))
    np.testing.assert_array_equal(np.concatenate([o.v for o in fresh]), np.concatenate([o.v for o in opts]))
    whole = ShardedAdamW(GPT(cfg, dtype=np.float32, seed=0), LocalDist())
    whole.load_state_dict(state)
    back = whole.state_dict()
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    with pytest.raises(ValueError, match="missing"):
        fresh[0].load_state_dict({"t": np.array(1)})


SHARD_SCRIPT = '''
import json, sys, numpy as np, npgpt.distributed as d
from npgpt.config import GPTConfig
from npgpt.model import GPT
from npgpt.optim import AdamW, ShardedAdamW
from npgpt.train.lm import count_targets, lm_loss
from npgpt.train.loop import train_step
x = d.init(); r, W = x.rank, x.world_size
cfg = GPTConfig(n_vocab=31, n_ctx=8, n_embd=16, n_head=2, n_layer=3)
straddling = []                                       # buckets whose sum goes to more than one rank
reduce_scatter = d._OverlappedReduce._reduce_scatter
def counted(self, a, b):
    straddling.append(sum(lo < b and a < hi for lo, hi in self.shard.bounds) > 1)
    return reduce_scatter(self, a, b)
d._OverlappedReduce._reduce_scatter = counted

def run(dist, accum, sharded, bucket_bytes=d.BUCKET_BYTES, overlap=True, loss_fn=lm_loss):
    d.BUCKET_BYTES, d.OVERLAP = bucket_bytes, overlap
    m = GPT(cfg, dtype=np.float64, seed=0)
    opt = ShardedAdamW(m, dist, lr=1e-2) if sharded else AdamW(m, lr=1e-2)
    rng = np.random.default_rng(1); log = []
    for step in range(4):
        xb = rng.integers(0, cfg.n_vocab, (2 * W, cfg.n_ctx))           # 2 rows a rank
        loss, norm = train_step(m, opt, (xb, np.roll(xb, -1, 1)), 1e-2, loss_fn=loss_fn, count_fn=count_targets,
                                grad_accum=accum, dist=dist, clip=0.5)
        log.append([loss, norm, getattr(dist, "overlapped_buckets", 0)])
    return m, opt, log

out = {}
for name, kw in {"accum1": dict(accum=1), "accum2": dict(accum=2), "buckets40": dict(accum=1, bucket_bytes=40),
                 "off": dict(accum=1, overlap=False)}.items():
    straddling.clear()
    two, opt, log = run(x, sharded=True, **kw)
    one, opt1, log1 = run(d.LocalDist(), sharded=False, **kw)          # one process, the whole batch
    diff = max(float(np.max(np.abs(p.data - q.data))) for p, q in zip(two.parameters(), one.parameters()))
    state, state1 = opt.state_dict(), opt1.state_dict()                  # collective: rank 0 gets it all
    sdiff = None if state is None else max(float(np.max(np.abs(state[k] - state1[k]))) for k in state1)
    out[name] = [diff, sdiff, log, log1, opt.hi - opt.lo, opt.packed.P.size, sum(straddling)]

def no_wpe_gradient(model, micro, n):
    loss = lm_loss(model, micro, n)
    model.wpe.weight.zero_grad()                                         # no rank has a gradient for it
    return loss
try:
    run(x, accum=1, sharded=True, loss_fn=no_wpe_gradient)
    out["missing"] = None
except RuntimeError as e:
    out["missing"] = str(e)

m = GPT(cfg, dtype=np.float64, seed=0); opt = ShardedAdamW(m, x, lr=1e-2)   # the optimizer to one call only
xb = np.arange(2 * cfg.n_ctx).reshape(2, cfg.n_ctx) % cfg.n_vocab
try:
    with x.reduce_during_backward(m, opt):
        lm_loss(m, (xb, xb), W * xb.size)
    x.allreduce_grads(m)
    out["mismatch"] = None
except RuntimeError as e:
    out["mismatch"] = str(e)
try:
    opt.step()
    out["unsummed"] = None
except RuntimeError as e:
    out["unsummed"] = str(e)
open(sys.argv[1] + f".{r}", "w").write(json.dumps(out))
'''


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_adamw_over_ranks_trains_what_one_process_trains(tmp_path, ranks):
    """mpiexec -n 2 and -n 4, float64, ZeRO-1: each rank reduce-scatters the gradients into its shard
    (during the backward: ln_f's bucket, then two a block; with buckets of 40 bytes, many, some across
    the shards' boundaries; or all after it with OVERLAP off), updates its shard and all-gathers the
    parameters: after 4 updates with clipping and grad_accum 1 and 2 the weights are one process's
    AdamW's (1e-9), the losses and norms too, and state_dict() gathers on rank 0 the moments one process
    holds (None on the others). A parameter no rank has a gradient for is an error on every rank; so are
    a ShardedAdamW given to reduce_during_backward but not to allreduce_grads, and its step without a
    reduce-scatter."""
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    _run(_mpi_cmd(ranks, script, tmp_path / "out"), timeout=120)
    outs = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(ranks)]
    out0 = outs[0]
    n_layer = 3
    for name in ("accum1", "accum2", "buckets40", "off"):
        for out in outs:
            diff, _, log, log1, size, total, _ = out[name]
            assert diff <= 1e-9, (name, diff)
            for (loss, norm, _), (loss1, norm1, _) in zip(log, log1):
                assert abs(loss - loss1) <= 1e-12 * loss1 and abs(norm - norm1) <= 1e-12 * norm1, name
            assert abs(size - total / ranks) <= 16                         # each rank keeps 1/ranks
            assert [b for _, _, b in log] == [b for _, _, b in out0[name][2]], name     # the ranks agree
        assert out0[name][1] <= 1e-9 and all(out[name][1] is None for out in outs[1:]), name
    assert {b for _, _, b in out0["accum1"][2]} == {b for _, _, b in out0["accum2"][2]} == {1 + 2 * n_layer}
    assert min(b for _, _, b in out0["buckets40"][2]) > 1 + 2 * n_layer
    assert out0["buckets40"][6] >= 4                                      # a bucket across a boundary a step
    assert {b for _, _, b in out0["off"][2]} == {0}
    for out in outs:
        assert out["missing"] and "got no gradient on any rank" in out["missing"]
        assert out["mismatch"] and "different optimizers" in out["mismatch"]
        assert out["unsummed"] and "no reduce-scatter" in out["unsummed"]


def _optimizer_state(run_dir):
    from npgpt.io.safetensors import read_safetensors
    state, _ = read_safetensors(str(run_dir / "checkpoint" / "optimizer.safetensors"), mmap=False)
    return state


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_shard_optimizer_trains_and_checkpoints_what_one_process_does(tmp_path, text, ref64, ranks):
    """`mpiexec -n 2|4 npgpt train --shard-optimizer`, float64: the weights, losses and norms of the
    one-process run, and its checkpoint's optimizer.safetensors holds the whole AdamW state the
    one-process run saved (gathered from every rank), so any rank count resumes from it."""
    two = tmp_path / "two"
    r = _run(_mpi_cmd(ranks, *_train_args(text, two, **{**REF64, "extra": REF64["extra"] + ["--shard-optimizer"]})),
             timeout=120)
    assert f"1/{ranks} of AdamW (ZeRO-1)" in r.stdout
    _compare(ref64, two, "float64", 1e-10)
    a, b = _optimizer_state(ref64), _optimizer_state(two)
    assert a.keys() == b.keys()
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-10
    assert json.loads((two / "run.json").read_text())["shard_optimizer"] is True


def test_the_progress_thread_stops_when_stop_comes_while_it_tests():
    """_Progress.stop() arriving while the thread is inside Testall of requests that then turn out finished:
    the thread must not clear the event stop() set, or it waits forever and stop() with it (a hang seen on
    2 ranks). A fake MPI whose Testall calls stop() from another thread and returns True after it."""
    import threading
    import npgpt.distributed as d

    progress = None
    stopper = []

    class Request:
        @staticmethod
        def Testall(requests):
            if not stopper:
                t = threading.Thread(target=progress.stop, daemon=True)
                t.start()
                stopper.append(t)
                deadline = time.monotonic() + 5
                while not progress._stopped and time.monotonic() < deadline:
                    time.sleep(0.001)                          # stop() has run up to its join()
            return True

    progress = d._Progress(type("FakeMPI", (), {"Request": Request}))
    progress.add(object())
    deadline = time.monotonic() + 10
    while not stopper and time.monotonic() < deadline:
        time.sleep(0.001)
    stopper[0].join(timeout=5)
    assert not stopper[0].is_alive(), "stop() hangs: the thread cleared the event stop() had set"
