"""The `npgpt` command's gradcheck, info, convert, download and bench error paths, run as a user would."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIX = Path(__file__).parent / "fixtures"


def npgpt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "npgpt", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_gradcheck_command_prints_table_all_pass():
    r = npgpt("gradcheck", "--kernels", "both")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("layer") and "max rel error" in line for line in lines)
    rows = [line for line in lines if line.rstrip().endswith(("PASS", "FAIL")) and not line.startswith(("layer", "-"))]
    assert len(rows) > 100 and all(line.rstrip().endswith("PASS") for line in rows)
    for name in ("LayerNorm", "CausalSelfAttention", "cross_entropy", "transformer.h.1.attn.c_attn", "TiedLMHead",
                 "instruction loss (padded, masked", "LoRALinear", "Classifier + LoRA"):
        assert name in r.stdout
    assert r.stdout.count("PASS\n") >= 2 * 60 and "kernels=numpy" in r.stdout and "kernels=numba" in r.stdout


def test_info_convert_roundtrip(tmp_path):
    r = npgpt("info", FIX / "tiny_tf")
    assert r.returncode == 0, r.stderr
    assert "OpenAI TensorFlow" in r.stdout and "n_layer:    2" in r.stdout and "float32" in r.stdout
    n_params = int(r.stdout.split("parameters:")[1].split()[0].replace(",", ""))
    ref = np.load(FIX / "reference_f32.npz")
    assert n_params == sum(ref[k].size for k in ref.files if k.startswith("param/"))

    out = tmp_path / "native"
    r = npgpt("convert", FIX / "tiny_tf", out, "--verify")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    r = npgpt("info", out)
    assert r.returncode == 0 and "Hugging Face safetensors" in r.stdout
    from npgpt.io import load_checkpoint
    _, state = load_checkpoint(out)
    for k in ref.files:
        if k.startswith("param/"):
            assert np.array_equal(state[k[len("param/"):]], ref[k]), k


def test_bad_paths_are_one_line_errors(tmp_path):
    for args in (("info", tmp_path / "missing"), ("convert", tmp_path / "missing", tmp_path / "x"),
                 ("convert", "", tmp_path / "x"), ("info", tmp_path)):
        r = npgpt(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def assert_one_line_error(r, command, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"npgpt {command}: error: "), r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def test_bad_kernel_backend_is_one_line_error():
    env = dict(os.environ, NPGPT_KERNELS="bogus")
    for args in (("info", FIX / "tiny_hf"), ("gradcheck", "--kernels", "numpy")):
        r = npgpt(*args, env=env)
        assert_one_line_error(r, args[0], "NPGPT_KERNELS", "bogus")


@pytest.mark.parametrize("args, message", [
    (["--model", "foo"], "--model"),
    (["--n-embd", "768", "--n-head", "5"], "--n-head"),
    (["--n-head", "0"], "--n-head"),
    (["--steps", "0"], "--steps"),
    (["--reps", "0"], "--reps"),
    (["--threads", "0"], "--threads"),
])
def test_bench_bad_options_fail_before_any_worker(args, message):
    r = npgpt("bench", "--workloads", "prefill", *args)
    assert_one_line_error(r, "bench", message)
    assert r.stdout == ""                                  # not even the BLAS header


def test_info_takes_a_downloaded_model_name(tmp_path):
    env = dict(os.environ, NPGPT_HOME=str(tmp_path), NPGPT_BASE_URL="http://127.0.0.1:9")
    r = npgpt("info", "gpt2", env=env)                       # not downloaded: no network, a clear hint
    assert_one_line_error(r, "info", "npgpt download gpt2")
    assert "nor is it a model name" not in r.stderr
    shutil.copytree(FIX / "tiny_hf", tmp_path / "gpt2")      # as `npgpt download gpt2` leaves it
    r = npgpt("info", "124M", env=env)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "gpt2") in r.stdout and "n_vocab:    101" in r.stdout


def test_multi_line_errors_are_printed_on_one_line(tmp_path):
    tf_dir = tmp_path / "openai" / "124M"                    # a broken "download": no network is used
    tf_dir.mkdir(parents=True)
    for name in ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        (tf_dir / name).write_text("{}")
    r = npgpt("download", "gpt2", env=dict(os.environ, NPGPT_HOME=str(tmp_path)))
    assert_one_line_error(r, "download", "not OpenAI's file", "deleted it")


def test_a_broken_command_import_is_raised_not_hidden(monkeypatch):
    """A command module that fails to import must surface as ImportError, not as `invalid choice`."""
    import sys as _sys

    from npgpt.cli import build_parser
    monkeypatch.setitem(_sys.modules, "npgpt.cli.generate", None)   # importing it now raises ImportError
    with pytest.raises(ImportError):
        build_parser()


@pytest.mark.parametrize("command, expected", [("generate", "20"), ("serve", "20"), ("train", "4"), ("eval", "4")])
def test_blas_threads_spin_longer_for_the_inference_commands(command, expected):
    """OpenBLAS's idle threads spin 2^20 cycles for decoding's back-to-back matrix-vector products and 2^4
    in training (where the kernels between GEMMs need the cores); a value the user set wins."""
    root = str(Path(__file__).resolve().parent.parent)
    probe = (f"import sys; sys.argv = ['npgpt', '{command}']; import npgpt.cli, os; "
             "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == [expected], out.stderr
    env["OPENBLAS_THREAD_TIMEOUT"] = "7"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["7"], out.stderr
