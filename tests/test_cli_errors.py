"""Bad input that must end in one line on stderr (exit 2), or quietly (exit 0) for a reader that went
away, never in a traceback: issue 20, items 12 and 14. Every test runs the command in process
(npgpt.cli.main) on tiny models."""
from __future__ import annotations

import io
import json
import os
import sys
import tracemalloc

import numpy as np
import pytest

import npgpt
from npgpt import distributed
from npgpt.cli import main
from npgpt.config import GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_hf")          # 101 tokens


def one_error_line(capsys, command: str) -> str:
    """The single line a failed command printed to stderr."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"npgpt {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny GPT with GPT-2's vocabulary (50257 tokens), which chat and the fine-tuning commands accept."""
    path = tmp_path_factory.mktemp("bpe")
    npgpt.save_model(npgpt.GPT(GPTConfig(n_vocab=50257, n_ctx=32, n_embd=8, n_head=2, n_layer=1), seed=0), path)
    return str(path)


def nan_copy(path, out) -> str:
    """The checkpoint at path saved again with one NaN weight (what a diverged run once saved)."""
    model = npgpt.load_model(path)
    dict(model.named_parameters())["transformer.h.0.mlp.c_fc.weight"].data[0, 0] = np.nan
    npgpt.save_model(model, out)
    return str(out)


# ----------------------------------------------------------------------------- a closed stdin
def test_chat_with_stdin_closed(bpe_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)                    # how Python starts under `npgpt chat <&-`
    assert main(["chat", "--model", bpe_model]) == 2
    assert "stdin is closed" in one_error_line(capsys, "chat")


def test_generate_without_prompt_with_stdin_closed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)
    assert main(["generate", "--model", TINY, "-n", "2"]) == 2
    assert "stdin is closed" in one_error_line(capsys, "generate")


# ----------------------------------------------------------------------------- a tokenizer smaller than the model
@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """`npgpt train --init tiny_hf --tokenizer char` on a text of 5 characters: a model of 101 token ids
    whose tokenizer decodes 5 of them (the run's training sample draws from it too)."""
    d = tmp_path_factory.mktemp("char")
    text = d / "abc.txt"
    text.write_text("abc cab bca\n" * 150)
    out = d / "run"
    assert main(["train", "--init", TINY, "--tokenizer", "char", "--data", str(text), "--context", "16",
                 "--steps", "1", "--eval-every", "1", "--eval-batches", "1", "--sample-tokens", "30",
                 "--out", str(out), "--no-progress"]) == 0
    return str(out)


def test_generate_draws_only_ids_the_tokenizer_holds(char_run, capsys):
    capsys.readouterr()
    for seed in range(3):
        assert main(["generate", "--model", char_run, "-n", "30", "--temperature", "1", "--top-k", "0",
                     "--top-p", "1", "--seed", str(seed), "--no-echo", "ab"]) == 0
        out = capsys.readouterr().out
        assert len(out) == 31 and set(out) <= set("abc \n"), out


def test_generate_n_vocab_limits_the_ids():
    model = npgpt.load_model(TINY)
    prompt = np.array([[1, 2, 3]])
    out = npgpt.generate(model, prompt, 40, temperature=1.0, seed=0, repetition_penalty=1.3, n_vocab=7)
    assert out.shape == (1, 43) and out[0, 3:].max() < 7
    assert npgpt.generate(model, prompt, 40, temperature=1.0, seed=0)[0, 3:].max() >= 7   # the model's own


# ----------------------------------------------------------------------------- NaN weights
@pytest.mark.parametrize("temperature", ["0", "1"])
def test_generate_from_nan_weights(tmp_path, capsys, temperature):
    model = nan_copy(TINY, tmp_path / "nan")
    assert main(["generate", "--model", model, "-n", "8", "--temperature", temperature, "--no-echo", "1+1"]) == 2
    assert "not finite" in one_error_line(capsys, "generate")
    assert capsys.readouterr().out == ""                       # no "!!!!" from NaN logits


def test_chat_from_nan_weights(bpe_model, tmp_path, monkeypatch, capsys):
    model = nan_copy(bpe_model, tmp_path / "nan")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 2?\n"))
    assert main(["chat", "--model", model, "-n", "4"]) == 2
    assert "not finite" in one_error_line(capsys, "chat")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_library_names_the_nan_parameter(temperature):
    model = npgpt.load_model(TINY)
    dict(model.named_parameters())["transformer.h.0.mlp.c_fc.weight"].data[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match=r"h\.0\.mlp\.c_fc\.weight"):
        npgpt.generate(model, np.array([1, 2, 3]), 4, temperature=temperature, seed=0)


# ----------------------------------------------------------------------------- --init of packed weights
@pytest.fixture(scope="module", params=["int8", "bf16"])
def packed(request, bpe_model, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    npgpt.save_model(npgpt.load_model(bpe_model, weights=request.param), path)
    return str(path)


def test_train_init_packed(packed, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--init", packed, "--context", "16", "--steps", "1", "--out", str(out),
                 "--no-progress"]) == 2
    assert "inference-only" in one_error_line(capsys, "train")
    assert not out.exists()


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_finetune_init_packed(task, packed, tmp_path, capsys):
    if task == "classify":
        data = tmp_path / "sms.tsv"
        data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{'win cash' if i % 2 else 'see you'} {i}\n"
                                for i in range(40)))
    else:
        data = tmp_path / "instructions.json"
        data.write_text(json.dumps([{"instruction": f"Add 1 to {i}.", "input": "", "output": str(i + 1)}
                                    for i in range(40)]))
    out = tmp_path / "run"
    assert main(["finetune", task, "--init", packed, "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    assert "inference-only" in one_error_line(capsys, "finetune")
    assert not out.exists()


# ----------------------------------------------------------------------------- models and batches beyond memory
@pytest.mark.parametrize("flag, value", [("--n-embd", "1048576"), ("--batch", "1000000000")])
def test_train_beyond_memory_names_the_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--context", "16", "--steps", "1", flag, value, "--out", str(out),
                 "--no-progress"]) == 2
    assert one_error_line(capsys, "train").startswith(f"npgpt train: error: {flag} {value}")
    assert not out.exists()


def test_training_bytes_is_a_lower_bound(backend):
    """What the memory check counts never exceeds what a training step allocates (traced), on the leanest
    path: the fused attention kernel (T >= its threshold) keeps no attention probabilities."""
    from npgpt.train.recipe import _gpt_parameters, _training_bytes
    from npgpt.optim import AdamW
    from npgpt.train.lm import lm_loss
    config = GPTConfig(n_vocab=50257, n_ctx=256, n_embd=128, n_head=2, n_layer=2)
    rows, T = 2, 256
    x = np.random.default_rng(0).integers(0, config.n_vocab, (rows, T))
    # compile the step's kernels first: tracing the compiler's allocations makes it ten times slower
    warm = npgpt.GPT(GPTConfig(n_vocab=64, n_ctx=T, n_embd=config.n_embd, n_head=config.n_head, n_layer=1), seed=0)
    warm_opt = AdamW(warm, lr=1e-3)
    lm_loss(warm, (x % 64, x % 64), rows * T)
    warm_opt.step()
    tracemalloc.start()
    try:
        model = npgpt.GPT(config, seed=0)
        opt = AdamW(model, lr=1e-3)
        lm_loss(model, (x, x), rows * T)
        opt.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert model.num_parameters() == _gpt_parameters(config)
    weights, activations = _training_bytes(config, _gpt_parameters(config), 4, rows, rows, T)
    assert weights + activations <= peak


@pytest.mark.parametrize("K", [2, 3, 16])
def test_training_bytes_counts_a_sharded_optimizer_as_allocated(K):
    """With --shard-optimizer over K ranks the weights' bound is what a ShardedAdamW holds on the rank
    with the smallest shard (the parameters and gradients whole, both moments and the summed gradient of
    its shard), never more, and less than AdamW whole holds."""
    from types import SimpleNamespace
    from npgpt.optim import ShardedAdamW
    from npgpt.train.recipe import _gpt_parameters, _training_bytes
    config = GPTConfig(n_vocab=101, n_ctx=16, n_embd=32, n_head=2, n_layer=2)
    n = _gpt_parameters(config)
    held = []
    for r in range(K):
        opt = ShardedAdamW(npgpt.GPT(config, seed=0), SimpleNamespace(rank=r, world_size=K))
        held.append(sum(a.nbytes for a in (opt.packed.P, opt.packed.G, opt.m, opt.v, opt.grad)))
    weights, _ = _training_bytes(config, n, 4, 1, 1, 16, shards=K)
    whole, _ = _training_bytes(config, n, 4, 1, 1, 16)
    assert whole == 16 * n and weights <= min(held) and weights < whole
    assert min(held) - weights <= 3 * 4 * 32                   # shards equal to within 16 elements


# ----------------------------------------------------------------------------- a reader that goes away
class ClosedPipe(io.StringIO):
    """stdout whose reader is gone (`npgpt info DIR | head -1`)."""

    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("argv", [["info", TINY], ["generate", "--model", TINY, "-n", "2", "1+1"]])
def test_broken_pipe_is_quiet(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- a launcher of another MPI
def test_check_launch():
    env = {"PMI_SIZE": "16", "PMI_RANK": "3", "MPI_LOCALNRANKS": "16"}
    with pytest.raises(distributed.LaunchMismatch) as e:
        distributed.check_launch(1, "Open MPI v4.1.2", env)
    msg, rank = str(e.value), e.value.rank
    assert rank == 3 and "PMI_SIZE=16" in msg and "MPICH" in msg and "Open MPI v4.1.2" in msg
    assert "MPI4PY_LIBMPI" in msg
    distributed.check_launch(16, "Open MPI v4.1.2", env)                       # the world the launcher made
    distributed.check_launch(1, "MPICH Version: 4.2.0", {"OMPI_COMM_WORLD_SIZE": "1"})   # one process
    with pytest.raises(distributed.LaunchMismatch, match="Open MPI's mpirun"):
        distributed.check_launch(1, "MPICH Version: 4.2.0", {"OMPI_COMM_WORLD_SIZE": "4"})


@pytest.mark.parametrize("rank", ["0", "1"])
def test_train_under_a_launcher_of_another_mpi(rank, tmp_path, monkeypatch, capsys):
    """mpiexec says 4 processes, MPI (mpi4py, in this process: a world of 1) says 1: one line, from the
    launcher's rank 0 only, and nothing written."""
    pytest.importorskip("mpi4py")
    from mpi4py import MPI
    assert MPI.COMM_WORLD.Get_size() == 1
    for k in (*distributed.MPI_ENV, *distributed.LAUNCHER_SIZE_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", rank)
    monkeypatch.setattr(distributed, "_DIST", None)
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--context", "16", "--steps", "1", "--out", str(out),
                 "--no-progress"]) == 2
    if rank == "0":
        line = one_error_line(capsys, "train")
        assert "PMI_SIZE=4" in line and distributed.mpi_library(MPI) in line and "MPI4PY_LIBMPI" in line
    else:
        assert capsys.readouterr().err == ""
    assert not out.exists() and distributed._DIST is None


class Terminal(io.StringIO):
    """stderr that is a person's terminal."""

    def isatty(self):
        return True


@pytest.mark.parametrize("cold", [True, False])
def test_generate_says_when_it_compiles_first(cold, monkeypatch):
    """In an empty kernel cache the first token waits for the decoding kernels to compile (~15 s): a person at
    a terminal is told, once, before the wait; nobody is told when the cache is warm or stderr is a pipe."""
    from npgpt.fast import _jit
    if not npgpt.fast.use_numba():
        pytest.skip("the NumPy kernels compile nothing")
    monkeypatch.setattr(_jit, "cache_is_cold", lambda kernel: cold)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["generate", "--model", TINY, "-n", "2", "1+1"]) == 0
    said = [line for line in terminal.getvalue().splitlines() if "compiling" in line]
    assert said == (["npgpt generate: compiling the decoding kernels for this CPU, once (~15 s on 2 cores, "
                     "more on slower ones; cached for later runs)"] if cold else [])
    monkeypatch.setattr(sys, "stderr", io.StringIO())          # a pipe: never told
    assert main(["generate", "--model", TINY, "-n", "2", "1+1"]) == 0
    assert "compiling" not in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    assert main(["generate", "--model", TINY, "-n", "1", "1+1"]) == 0   # no decoded step: no compiled block
    assert "compiling" not in terminal.getvalue()


def test_the_compiled_blocks_are_on_disk_after_a_generate():
    """What says 'cold' is the kernel a decoded token runs, keyed for this CPU: warm once generate decoded."""
    from npgpt.fast import _jit, decode
    if not npgpt.fast.use_numba():
        pytest.skip("the NumPy kernels compile nothing")
    assert main(["generate", "--model", TINY, "-n", "2", "1+1"]) == 0
    assert not _jit.cache_is_cold(decode.block_kernel(1, npgpt.fast.quant.side_by_side(), int8=False))


def test_ctrl_c_escaping_a_rank_ends_the_mpi_job(monkeypatch, capsys):
    """Under mpiexec a KeyboardInterrupt that escapes a command on one rank (a second Ctrl-C, or one before
    training took Ctrl-C over) ends the whole job (MPI Abort, status 130): the other ranks may be waiting for
    this one in a collective. One line names the rank."""
    import argparse
    from npgpt import cli

    class Rank1:
        rank, world_size, is_main = 1, 2, False
        aborted = []

        def abort(self, code):
            self.aborted.append(code)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "init", lambda *a, **k: Rank1())
    monkeypatch.setattr("time.sleep", lambda s: None)
    assert cli._main_mpi(argparse.Namespace(command="train", func=interrupted)) == 130
    assert Rank1.aborted == [130]
    assert capsys.readouterr().err.strip() == "npgpt train: interrupted on rank 1 of 2"
