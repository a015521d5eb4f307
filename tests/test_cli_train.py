"""`npgpt train` run as a user would: a short run end to end, generation from its directory, and
one-line errors that write nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny_hf"
VERDICT = ROOT / "npgpt" / "train" / "assets" / "the-verdict.txt"


def npgpt_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NPGPT_HOME=str(Path(cwd or ROOT) / ".npgpt-home"))
    return subprocess.run([sys.executable, "-m", "npgpt", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", cwd=cwd, env=env, timeout=600)


TRAIN = ["train", "--data", str(VERDICT), "--tokenizer", "char", "--config", "tiny", "--context", "32",
         "--batch", "4", "--steps", "6", "--eval-every", "3", "--eval-batches", "2", "--sample-tokens", "8",
         "--no-progress"]


def test_train_then_generate_from_the_run_directory(tmp_path):
    out = tmp_path / "run"
    r = npgpt_cli(*TRAIN, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in updates] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(row) for row in updates)
    assert [row["step"] for row in evals] == [0, 3, 6] and all("loss" not in row for row in evals)
    assert updates[-1]["loss"] < updates[0]["loss"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "run.json").exists()
    assert "step      3: train loss" in r.stdout and "val loss" in r.stdout
    assert "I HAD always" in r.stdout                  # the samples: the prompt, then the continuation

    model = npgpt.load_model(out)             # a run directory loads as a model
    assert model.config.n_layer == 2 and model.config.n_embd == 64 and model.config.n_ctx == 32
    g = npgpt_cli("generate", "--model", out, "-n", "10", "--temperature", "0", "I HAD", cwd=tmp_path)
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("I HAD") and g.stdout.endswith("\n") and len(g.stdout) == len("I HAD") + 10 + 1

    again = npgpt_cli(*TRAIN, "--out", out, cwd=tmp_path)      # never overwrites a run silently
    assert again.returncode == 2 and "--resume" in again.stderr


def test_grad_accum_and_resume_of_a_finished_run(tmp_path):
    a = npgpt_cli(*TRAIN, "--batch", "4", "--dtype", "float64", "--out", tmp_path / "a", cwd=tmp_path)
    b = npgpt_cli(*TRAIN, "--batch", "4", "--grad-accum", "2", "--dtype", "float64", "--out", tmp_path / "b",
                  cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ma = npgpt.load_model(tmp_path / "a", dtype=np.float64).state_dict()
    mb = npgpt.load_model(tmp_path / "b", dtype=np.float64).state_dict()
    for k in ma:
        np.testing.assert_allclose(mb[k], ma[k], rtol=0, atol=1e-12, err_msg=k)
    r = npgpt_cli("train", "--out", tmp_path / "a", "--resume", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr                 # already at its last step: nothing more to do


CASES = {   # case: (arguments after `train --no-progress --out RUN`, what the one line must name)
    "missing": (["--data", "nope.txt"], "nope.txt"),
    "empty": (["--data", "empty.txt"], "empty"),
    "short": (["--data", "short.txt"], "context"),
    "context": (["--data", VERDICT, "--tokenizer", "char", "--init", TINY, "--context", "4096"], "--context 4096"),
    "lr": (["--data", VERDICT, "--lr", "-1"], "--lr"),
    "resume": (["--resume"], "--resume"),
    "steps+epochs": (["--steps", "3", "--epochs", "1"], "--steps"),
    "ratio": (["--train-ratio", "1.5"], "--train-ratio"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_error_and_nothing_written(tmp_path, case):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a few words only")
    args, needle = CASES[case]
    r = npgpt_cli("train", "--no-progress", "--out", tmp_path / "run", *args, cwd=tmp_path)
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], (case, r.stderr)
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def _signal_a_training_run(tmp_path, args, run, sig, rows):
    """`npgpt ARGS --out RUN` in its own process, sent `sig` once metrics.jsonl has `rows` rows -> (exit
    status, stderr, the step its checkpoint holds)."""
    import time
    env = dict(os.environ, PYTHONPATH=str(ROOT), NPGPT_HOME=str(tmp_path / ".npgpt-home"))
    p = subprocess.Popen([sys.executable, "-m", "npgpt", *map(str, args), "--out", str(run)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < rows):
        time.sleep(0.01)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err, json.loads(open(run / "checkpoint" / "trainer.json").read())["step"]


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    """`kill` / a batch system's SIGTERM to a one-process `npgpt train`: the update in progress ends, a
    checkpoint is written, one line says so and how to continue, exit status 143."""
    import signal
    run = tmp_path / "run"
    code, err, stopped = _signal_a_training_run(
        tmp_path, ["train", "--data", VERDICT, "--tokenizer", "char", "--config", "tiny", "--context", "32", "--batch",
                   "4", "--steps", "100000", "--eval-every", "0", "--sample-every", "0", "--save-every", "0",
                   "--no-progress"], run, signal.SIGTERM, rows=3)
    assert code == 143, err
    assert err.strip().splitlines()[-1] == (f"npgpt train: stopped by SIGTERM at step {stopped}; checkpoint written. "
                                           f"Continue with: npgpt train --out {run} --resume")


def test_ctrl_c_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Ctrl-C (SIGINT) during `npgpt train` writes a checkpoint and exits 130; `--resume` in a new
    process then ends bit for bit where an uninterrupted run ends (parameters and metrics rows)."""
    import signal
    args = ["train", "--data", VERDICT, "--tokenizer", "char", "--config", "tiny", "--context", "32", "--batch", "4",
            "--steps", "150", "--eval-every", "50", "--eval-batches", "2", "--sample-every", "0", "--save-every", "0",
            "--dropout", "0.1", "--warmup", "20", "--no-progress"]
    full = npgpt_cli(*args, "--out", tmp_path / "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    run = tmp_path / "run"
    code, err, stopped = _signal_a_training_run(tmp_path, args, run, signal.SIGINT, rows=5)
    assert code == 130, err
    assert "--resume" in err
    assert 0 < stopped < 150

    r = npgpt_cli("train", "--out", run, "--resume", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = npgpt.load_model(tmp_path / "full").state_dict()
    b = npgpt.load_model(run).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(run) == rows(tmp_path / "full") and len(rows(run)) == 150 + 4
