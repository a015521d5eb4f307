"""The `npgpt` command's gradcheck, info, convert and download subcommands, run as a user would."""
import subprocess
import sys
from pathlib import Path

import numpy as np

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
    for name in ("LayerNorm", "CausalSelfAttention", "cross_entropy", "transformer.h.1.attn.c_attn", "TiedLMHead"):
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


def test_bad_paths_are_one_line_errors(tmp_path):
    for args in (("info", tmp_path / "missing"), ("convert", tmp_path / "missing", tmp_path / "x"),
                 ("convert", "", tmp_path / "x"), ("info", tmp_path)):
        r = npgpt(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
