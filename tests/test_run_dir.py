"""The run directory of `npgpt train` keeps what the user owns and the last good state: it rotates only
its own checkpoints, is held by one run at a time, never saves non-finite weights, survives a damaged
metrics or state file with one line, and lets a resume change the run's length (and nothing that would
make it another run). Each test runs the command in process, on the bundled text, with a tiny model."""
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.train.run import LOCK_FILE, checkpoint_dir, read_metrics

VERDICT = Path(npgpt.__file__).parent / "train" / "assets" / "the-verdict.txt"
TINY = ["--data", VERDICT, "--tokenizer", "char", "--config", "tiny", "--context", "16", "--batch", "2",
        "--eval-batches", "1", "--sample-every", "0", "--no-progress"]


def train(capsys, out, *args):
    """`npgpt train` in this process: (exit status, stdout, stderr)."""
    code = main(["train", *map(str, TINY), "--out", str(out), *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def weights(path):
    return {k: v.copy() for k, v in npgpt.load_model(path, dtype=np.float64).state_dict().items()}


# ----------------------------------------------------------------------------- 1. what the user owns
def test_a_directory_that_is_not_a_run_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "d"
    (out / "ckpt-important").mkdir(parents=True)
    (out / "ckpt-important" / "thesis.tex").write_text("x")
    before = sorted(p.name for p in out.rglob("*"))
    code, _, err = train(capsys, out, "--steps", "2")
    one_line_error(code, err, str(out), "not an npgpt run", "--overwrite")
    assert sorted(p.name for p in out.rglob("*")) == before


def test_rotation_removes_only_the_checkpoints_npgpt_wrote(tmp_path, capsys):
    """With --overwrite npgpt writes beside the user's files; rotating its checkpoints away never touches
    a name that only starts like one, a ckpt-DIGITS folder that holds no trainer.json, or a link."""
    out = tmp_path / "d"
    mine = {"ckpt-important/thesis.tex", "ckpt-000001x/a.txt", "ckpt-000099/notes.txt", "ckpt-7/b.txt"}
    for name in mine:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "trainer.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere", out / "ckpt-000050")
    code, _, err = train(capsys, out, "--steps", "4", "--save-every", "1", "--eval-every", "0", "--overwrite")
    assert code == 0, err
    for name in mine:
        assert (out / name).read_text() == "x", name
    assert (out / "ckpt-000050").is_symlink() and (tmp_path / "elsewhere" / "trainer.json").exists()
    ours = sorted(p.name for p in out.iterdir() if re.fullmatch(r"\.?ckpt-[0-9]+.*", p.name) and not p.is_symlink()
                  and p.name not in ("ckpt-000001x", "ckpt-7"))
    assert ours == ["ckpt-000004", "ckpt-000099"]                 # the last checkpoint, and the user's folder
    assert checkpoint_dir(out).endswith("ckpt-000004")


def test_a_checkpoint_name_the_user_already_has_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "d"
    (out / "ckpt-000002").mkdir(parents=True)
    (out / "ckpt-000002" / "notes.txt").write_text("x")
    code, _, err = train(capsys, out, "--steps", "2", "--eval-every", "0", "--overwrite")
    one_line_error(code, err, "ckpt-000002", "not npgpt's")
    assert (out / "ckpt-000002" / "notes.txt").read_text() == "x"


def test_a_second_train_on_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2")[0] == 0
    one_line_error(*train(capsys, out, "--steps", "2")[::2], "already holds a run", "--resume", "--overwrite")
    code, _, err = train(capsys, out, "--steps", "3", "--overwrite", "--eval-every", "0")
    assert code == 0, err
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]   # the old run's rows are gone
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-000003"]


# ----------------------------------------------------------------------------- 2. one run at a time
def test_a_run_directory_held_by_another_process_is_refused_naming_its_pid(tmp_path, capsys):
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)     # another run holds the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        line = one_line_error(*train(capsys, out, "--steps", "2")[::2], "in use", "pid 4242")
        assert str(out) in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        os.close(fd)
    assert train(capsys, out, "--steps", "2")[0] == 0             # released: the directory is usable again


# ----------------------------------------------------------------------------- 3. non-finite training
def test_an_update_that_goes_non_finite_is_never_saved(tmp_path, capsys):
    """--lr 1e38 --save-every 1: the first update overflows the weights. No checkpoint of non-finite
    tensors is written, the last good one stays, and the run ends with one line naming the step."""
    out = tmp_path / "run"
    code, _, err = train(capsys, out, "--steps", "6", "--save-every", "1", "--eval-every", "0", "--lr", "1e38")
    line = one_line_error(code, err, "step", "finite", "lower the learning rate")
    for ckpt in out.glob("ckpt-*"):
        model = npgpt.load_model(ckpt, dtype=np.float64)
        assert all(np.isfinite(p.data).all() for p in model.parameters()), ckpt.name
    good = checkpoint_dir(out)
    assert good is None or good in line


def test_a_loss_that_goes_non_finite_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """--lr 1e6 (a FloatingPointError traceback before): one line naming the step and what went
    non-finite; every checkpoint left behind loads, finite."""
    out = tmp_path / "hot"
    code, _, err = train(capsys, out, "--steps", "40", "--lr", "1e6", "--save-every", "1", "--eval-every", "0")
    line = one_line_error(code, err, "step", "finite", "lower the learning rate")
    good = checkpoint_dir(out)
    assert good is None or good in line
    if good is not None:
        assert all(np.isfinite(v).all() for v in weights(out).values())


# ----------------------------------------------------------------------------- 4. damaged files on resume
@pytest.mark.parametrize("damage", ["shortened", "nul-extended", "missing", "garbage"])
def test_resume_rebuilds_a_damaged_metrics_file(tmp_path, capsys, damage):
    """A run of 3 updates whose metrics file is then damaged, resumed to 6: the file holds no damage,
    no step twice, every row it keeps is the 6-update run's row, and it stays resumable."""
    flat = ["--lr", "1e-3", "--min-lr", "1e-3", "--eval-every", "3"]
    full = tmp_path / "full"
    assert train(capsys, full, "--steps", "6", *flat)[0] == 0
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "3", *flat)[0] == 0
    path = out / "metrics.jsonl"
    text = path.read_bytes()
    if damage == "shortened":
        path.write_bytes(text[:len(text) // 2 + 3])              # cut inside a row
    elif damage == "nul-extended":
        path.write_bytes(text + b"\0" * 4096)                     # a power cut's hole
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(text + b'{"step": "x"}\n[1, 2]\nnot json\n{"step": 99, "loss": 1.0}\n')
    code, _, err = train(capsys, out, "--resume", "--steps", "6")
    assert code == 0, err
    rows = read_metrics(path)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-3:] == [4, 5, 6] and max(steps) == 6
    assert all(r["step"] <= 6 for r in rows)
    def key(r):
        return r["step"], "loss" in r, r.get("loss", r.get("val_loss"))
    assert {key(r) for r in rows} <= {key(r) for r in read_metrics(full / "metrics.jsonl")}
    assert b"\0" not in path.read_bytes()
    assert train(capsys, out, "--resume", "--steps", "6")[0] == 0      # and it stays resumable


TRAINER_DAMAGE = {
    "not json": lambda s: "{oops",
    "a list": lambda s: "[]",
    "no step": lambda s: json.dumps({k: v for k, v in s.items() if k != "step"}),
    "negative step": lambda s: json.dumps({**s, "step": -100}),
    "step as text": lambda s: json.dumps({**s, "step": "4"}),
    "rngs not a list": lambda s: json.dumps({**s, "rngs": 3}),
    "rng state garbage": lambda s: json.dumps({**s, "rngs": [{"bit_generator": "nope"}] * len(s["rngs"])}),
    "data garbage": lambda s: json.dumps({**s, "data": {"epoch": "x"}}),
    "huge metrics_bytes": lambda s: json.dumps({**s, "metrics_bytes": 1e10}),
}


@pytest.mark.parametrize("damage", list(TRAINER_DAMAGE))
def test_a_damaged_trainer_state_gets_one_line(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2", "--dropout", "0.1")[0] == 0
    path = out / "checkpoint" / "trainer.json"
    path.write_text(TRAINER_DAMAGE[damage](json.loads(path.read_text())))
    code, _, err = train(capsys, out, "--resume", "--steps", "3")
    if damage == "huge metrics_bytes":                         # no longer read: the resume just works
        assert code == 0, err
        assert (out / "metrics.jsonl").stat().st_size < 100_000
    else:
        one_line_error(code, err, "trainer.json" if damage != "data garbage" else "data position")


@pytest.mark.parametrize("damage", ["not json", "steps as text", "unknown choice", "a list"])
def test_a_damaged_run_file_gets_one_line(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2")[0] == 0
    path = out / "run.json"
    s = json.loads(path.read_text())
    path.write_text({"not json": "{", "steps as text": json.dumps({**s, "steps": "2"}),
                     "unknown choice": json.dumps({**s, "tokenizer": "morse"}), "a list": "[]"}[damage])
    one_line_error(*train(capsys, out, "--resume")[::2], "run.json")


@pytest.mark.parametrize("damage", ["truncated", "wrong tensors"])
def test_a_damaged_optimizer_state_gets_one_line(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2")[0] == 0
    path = out / "checkpoint" / "optimizer.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        from npgpt.io.safetensors import save_safetensors
        save_safetensors(path, {"t": np.array(2), "m/x": np.zeros(3)})
    one_line_error(*train(capsys, out, "--resume", "--steps", "3")[::2], "optimizer.safetensors")


def test_a_full_disk_during_a_checkpoint_gets_one_line_and_the_last_one_loads(tmp_path, capsys, monkeypatch):
    from npgpt.train import run as run_mod
    out = tmp_path / "run"
    real = run_mod.save_safetensors

    def fill_up(path, *a, **k):                                  # the second checkpoint hits a full disk
        if "ckpt-000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(run_mod, "save_safetensors", fill_up)
    code, _, err = train(capsys, out, "--steps", "4", "--save-every", "2", "--eval-every", "0")
    line = one_line_error(code, err, "No space left on device", "ckpt-000002")
    assert "--out" in line
    assert checkpoint_dir(out).endswith("ckpt-000002") and not list(out.glob(".ckpt-*"))
    npgpt.load_model(out)


# ----------------------------------------------------------------------------- 5. what a resume may change
def test_extending_a_run_on_resume_ends_where_the_longer_run_ends(tmp_path, capsys):
    """A flat learning rate (--min-lr = --lr), 20 updates then --resume --steps 40: bit for bit the
    40-update run (weights and metrics rows), and the run says that the schedule was recomputed."""
    flat = ["--lr", "1e-3", "--min-lr", "1e-3", "--eval-every", "10", "--dropout", "0.1", "--dtype", "float64"]
    assert train(capsys, tmp_path / "long", "--steps", "40", *flat)[0] == 0
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "20", *flat)[0] == 0
    code, stdout, err = train(capsys, out, "--resume", "--steps", "40")
    assert code == 0, err
    assert "resuming at step 20 of 40 updates (the run had 20)" in stdout and "recomputed" in stdout
    a, b = weights(tmp_path / "long"), weights(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    def rows(d):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(d / "metrics.jsonl")]
    assert rows(out) == rows(tmp_path / "long")
    assert json.loads((out / "run.json").read_text())["steps"] == 40    # a later resume keeps the new length


@pytest.mark.parametrize("flag,value", [("--batch", "4"), ("--context", "8"), ("--seed", "3"),
                                        ("--tokenizer", "gpt2"), ("--n-layer", "3"), ("--data", "other.txt"),
                                        ("--lr", "1e-3")])
def test_resume_refuses_what_cannot_change_naming_the_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2")[0] == 0
    code = main(["train", "--out", str(out), "--resume", "--no-progress", flag, value])
    one_line_error(code, capsys.readouterr().err, f"{flag} cannot change")


def test_resume_to_fewer_steps_than_done_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "4", "--eval-every", "0")[0] == 0
    one_line_error(*train(capsys, out, "--resume", "--steps", "2")[::2], "--steps", "already at step 4")
    code, _, err = train(capsys, out, "--resume", "--eval-every", "1", "--save-every", "1", "--steps", "5")
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r][-1] == 5


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_finetune_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, task):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    data = tmp_path / ("rows.tsv" if task == "classify" else "entries.json")
    data.write_text("ham\thello\n" if task == "classify" else "[]")
    code = main(["finetune", task, "--data", str(data), "--init", "gpt2", "--out", str(out), "--no-progress"])
    one_line_error(code, capsys.readouterr().err, "not an npgpt run", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_the_run_directory_itself_opens_as_a_hugging_face_model_directory(tmp_path, capsys):
    """DIR/config.json and DIR/model.safetensors are links into DIR/checkpoint/ (Hugging Face's
    from_pretrained(DIR) reads them with the tokenizer files beside them); they follow the newest checkpoint."""
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "4", "--save-every", "2", "--eval-every", "0")[0] == 0
    for name in ("config.json", "model.safetensors"):
        assert (out / name).is_symlink() and os.readlink(out / name) == os.path.join("checkpoint", name)
        assert (out / name).read_bytes() == (out / "ckpt-000004" / name).read_bytes()
    assert {"tokenizer.json", "tokenizer_config.json", "npgpt_tokenizer.json"} <= {p.name for p in out.iterdir()}


# ----------------------------------------------------------------------------- found in review
def test_train_resume_refuses_a_finetune_run_and_leaves_it_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2")[0] == 0
    run_json = out / "run.json"
    s = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**s, "command": "finetune", "task": "instruct"}))
    before = run_json.read_bytes()
    one_line_error(*train(capsys, out, "--resume", "--steps", "4")[::2], "npgpt finetune instruct", "cannot continue")
    assert run_json.read_bytes() == before


def test_a_resume_that_fails_to_load_leaves_run_json_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2")[0] == 0
    (out / "checkpoint" / "optimizer.safetensors").write_bytes(b"garbage")
    before = (out / "run.json").read_bytes()
    one_line_error(*train(capsys, out, "--resume", "--steps", "40")[::2], "optimizer.safetensors")
    assert (out / "run.json").read_bytes() == before


def test_links_where_the_lock_or_the_metrics_go_are_not_followed(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    a = tmp_path / "a"
    a.mkdir()
    os.symlink(precious, a / LOCK_FILE)
    one_line_error(*train(capsys, a, "--steps", "2")[::2], LOCK_FILE, "link")
    b = tmp_path / "b"
    b.mkdir()
    os.symlink(precious, b / "metrics.jsonl")
    one_line_error(*train(capsys, b, "--steps", "2", "--overwrite")[::2], "metrics.jsonl")
    assert precious.read_text() == "mine"


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = train(capsys, out, "--steps", "3", "--save-every", "1", "--eval-every", "0", "--lr", "1e38")
    assert code == 2 and checkpoint_dir(out) is None, err
    code, _, err = train(capsys, out, "--steps", "2", "--eval-every", "0")
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]   # the new run's only


def test_set_threads_asks_for_quiet_kernel_threads_first(monkeypatch):
    from npgpt.fast import settings
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    settings.set_threads(1)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_init_from_a_lora_run_trains_every_weight_of_what_that_run_computes(tmp_path):
    from npgpt.layers.lora import apply_lora, lora_layers
    from npgpt.train.recipe import load_init
    model = npgpt.GPT(npgpt.GPTConfig(n_vocab=61, n_ctx=16, n_embd=16, n_head=2, n_layer=1), seed=0)
    apply_lora(model, 2, 4.0, seed=1, base="base")
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = 0.1                    # an adapter that changes the function
    npgpt.save_model(model, tmp_path / "lora")
    idx = np.arange(8)[None]
    expected = model.forward(idx)
    loaded = load_init(str(tmp_path / "lora"), npgpt.load_model)
    assert not lora_layers(loaded) and all(p.requires_grad for p in loaded.parameters())
    np.testing.assert_allclose(loaded.forward(idx), expected, rtol=1e-5, atol=1e-6)


def test_an_interrupted_classify_run_exits_130_and_reports_no_accuracy(tmp_path, capsys, monkeypatch):
    """Ctrl-C (here: a stop asked for from the first update on) ends `finetune classify` with 130 and
    no metrics.json, instead of the last evaluation's accuracy as if the run had finished."""
    from npgpt.train import loop
    base = tmp_path / "base"
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1), seed=0), base)
    rows = tmp_path / "rows.tsv"
    rows.write_text("".join(f"{'spam' if i % 2 else 'ham'}\tmessage number {i}\n" for i in range(40)))

    def asked_to_stop(self):
        self.requested = "SIGINT"
        return self
    monkeypatch.setattr(loop._StopOnSignal, "__enter__", asked_to_stop)
    code = main(["finetune", "classify", "--data", str(rows), "--init", str(base), "--out", str(tmp_path / "run"),
                 "--epochs", "3", "--batch", "4", "--no-progress"])
    out = capsys.readouterr()
    assert code == 130 and "interrupted" in out.out, out
    assert not (tmp_path / "run" / "metrics.json").exists() and checkpoint_dir(tmp_path / "run") is not None


def test_a_checkpoint_rewritten_in_place_is_old_or_new_never_half(tmp_path, capsys):
    """rewrite_checkpoint (what finetune --merge uses): a write that fails part way leaves the checkpoint
    exactly as it was and no temporary directory; one that succeeds replaces it whole."""
    from npgpt.train.run import rewrite_checkpoint
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "2", "--eval-every", "0")[0] == 0
    ckpt = Path(checkpoint_dir(out))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def half_then_fail(copy):
        (Path(copy) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        rewrite_checkpoint(ckpt, half_then_fail)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".ckpt")]
    rewrite_checkpoint(ckpt, lambda copy: (Path(copy) / "note.txt").write_text("new"))
    assert (ckpt / "note.txt").read_text() == "new" and (ckpt / "trainer.json").read_bytes() == before["trainer.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".ckpt")]
