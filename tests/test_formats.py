"""What npgpt writes, other tools read, and what it reads back: a destination's links are never followed,
run directories carry tokenizers Hugging Face's tools load, a config cannot make a loader grow without
bound, downloads by name are OpenAI's files, and every command that reads a model reads every format
npgpt writes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.io import DownloadError, download_file, ensure_downloaded, load_checkpoint
from npgpt.io import download as dl
from npgpt.cli import main

ROOT = Path(__file__).parent.parent
FIX = ROOT / "tests" / "fixtures"
TINY_HF, TINY_TF = FIX / "tiny_hf", FIX / "tiny_tf"
TF_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")


def one_line_error(capsys, command):
    """The error line a command printed (besides any progress bars), which must be its only one."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "%|" not in line and line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"npgpt {command}: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- a destination's links (item 8)
def tree(d: Path) -> dict:
    """{relative path: 'link -> target' | file bytes | 'dir'} of d, never following a link."""
    out = {}
    for top, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(top) / name
            out[str(p.relative_to(d))] = (f"link -> {os.readlink(p)}" if p.is_symlink() else
                                          "dir" if p.is_dir() else p.read_bytes())
    return out


def test_convert_into_a_directory_never_follows_or_copies_its_links(tmp_path, capsys):
    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_rsa").write_text("PRIVATE KEY")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "sshlink").symlink_to(secret)
    (dst / "keylink").symlink_to(secret / "id_rsa")
    (dst / "notes.txt").write_text("mine")
    (dst / "config.json").symlink_to(secret / "id_rsa")       # even a link under npgpt's own name
    inode = (dst / "notes.txt").stat().st_ino
    for _ in range(2):                                         # into the directory, then over its own files
        assert main(["convert", str(TINY_HF), str(dst)]) == 0
    after = tree(dst)
    assert after.pop("sshlink") == f"link -> {secret}" and after.pop("keylink") == f"link -> {secret / 'id_rsa'}"
    assert after.pop("notes.txt") == b"mine" and (dst / "notes.txt").stat().st_ino == inode
    assert sorted(after) == ["config.json", "model.safetensors"]        # replaced the link, wrote nothing else
    assert tree(secret.parent) == {".ssh": "dir", ".ssh/id_rsa": b"PRIVATE KEY"}
    assert npgpt.load_model(dst).config.n_layer == 2
    capsys.readouterr()


@pytest.mark.parametrize("theirs", [("model.safetensors.index.json", "model-00001-of-00002.safetensors"),
                                    ("adapter_config.json", "adapter_model.safetensors")])
def test_convert_refuses_a_directory_whose_model_files_it_would_leave_stale(tmp_path, capsys, theirs):
    """A sharded model or a LoRA adapter in DST would be read with the new weights; npgpt removes nothing it
    may not have written, so it says so in one line and leaves the directory as it was."""
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in theirs:
        (dst / name).write_text("theirs")
    assert main(["convert", str(TINY_HF), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(name in err[0] for name in theirs), err
    assert tree(dst) == {name: b"theirs" for name in theirs}


# ----------------------------------------------------------------------------- tokenizers others read (item 9)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A GPT-2 BPE run and a character-level run, one update each."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("gpt2", "char"):
        out[kind] = root / kind
        assert main(["train", "--config", "tiny", "--context", "16", "--batch", "2", "--steps", "1", "--eval-every",
                     "1", "--eval-batches", "1", "--sample-tokens", "2", "--tokenizer", kind, "--no-progress",
                     "--out", str(out[kind])]) == 0
    return out


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (the alphabet of vocab.json and merges.txt)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def hf_bpe_encode(text: str, vocab: dict, merges: list) -> list:
    """Byte-level BPE as Hugging Face's GPT-2 tokenizer runs it from vocab.json and merges.txt."""
    import regex
    from npgpt.tokens.bpe import GPT2_PATTERN
    rank = {tuple(m.split()): i for i, m in enumerate(merges)}
    table = bytes_to_unicode()
    ids = []
    for piece in regex.findall(GPT2_PATTERN, text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(word, word[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        ids += [vocab[w] for w in word]
    return ids


def test_bpe_run_keeps_gpt2_vocab_files_that_encode_as_npgpt_does(runs):
    from npgpt.tokens.tokenizers import GPT2Tokenizer, find_tokenizer
    for d in (runs["gpt2"], runs["gpt2"] / "checkpoint"):
        files = set(os.listdir(d))
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "npgpt_tokenizer.json"} <= files
        assert "tokenizer.json" not in files          # the name Hugging Face's fast tokenizers own
        assert isinstance(find_tokenizer(d), GPT2Tokenizer)
    ckpt = runs["gpt2"] / "checkpoint"
    vocab = json.loads((ckpt / "vocab.json").read_text(encoding="utf-8"))
    lines = (ckpt / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version") and len(vocab) == 50257
    merges = [m for m in lines[1:] if m]
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["eos_token"] == "<|endoftext|>"
    assert vocab["<|endoftext|>"] == 50256 == json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    text = "Hello world! It's 2024 -- naïve café,\t tabs\n\nand   spaces. 😀 ÿ\x00\x7f"
    tok = npgpt.get_tokenizer()
    assert hf_bpe_encode(text, vocab, merges) == tok.encode(text)
    inverse, table = {i: w for w, i in vocab.items()}, {c: b for b, c in bytes_to_unicode().items()}
    assert bytes(table[c] for i in tok.encode(text) for c in inverse[i]).decode("utf-8") == text


def test_char_run_keeps_a_tokenizers_json_that_splits_characters(runs):
    from npgpt.tokens.tokenizers import CharTokenizer, find_tokenizer
    ckpt = runs["char"] / "checkpoint"
    tok = find_tokenizer(ckpt)
    assert isinstance(tok, CharTokenizer) and find_tokenizer(runs["char"]).chars == tok.chars
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "WordLevel" and spec["added_tokens"] == []
    assert spec["model"]["vocab"] == {c: i for i, c in enumerate(tok.chars)}
    assert spec["model"]["unk_token"] not in spec["model"]["vocab"]
    assert spec["decoder"] == {"type": "Fuse"} and spec["normalizer"] is None
    split = spec["pre_tokenizer"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and not split["invert"]
    text = "I HAD\n always\r\n thought  "
    assert re.findall(split["pattern"]["Regex"], text) == list(text)
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["vocab_size"] == len(tok.chars) and config["eos_token_id"] is None   # no <|endoftext|> to stop at


def test_an_older_runs_record_under_tokenizer_json_still_reads_and_is_replaced(tmp_path):
    from npgpt.tokens.tokenizers import CharTokenizer, GPT2Tokenizer, find_tokenizer, save_tokenizer
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "char", "chars": "ab"}))
    assert find_tokenizer(tmp_path).chars == "ab"
    save_tokenizer(GPT2Tokenizer(), tmp_path)                 # the old record would shadow vocab.json for HF
    assert not (tmp_path / "tokenizer.json").exists() and isinstance(find_tokenizer(tmp_path), GPT2Tokenizer)
    (tmp_path / "npgpt_tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    assert find_tokenizer(tmp_path) is None                   # someone else's tokenizer.json is not npgpt's
    save_tokenizer(CharTokenizer("xy"), tmp_path)
    assert find_tokenizer(tmp_path).chars == "xy"


# ----------------------------------------------------------------------------- a config cannot grow a loader (item 10)
def tiny_int8(d: Path) -> Path:
    npgpt.save_model(npgpt.inference.quant.quantize(npgpt.load_model(TINY_HF), "int8"), d)
    return d


@pytest.mark.parametrize("fmt", ["hf", "tf", "int8"])
def test_a_config_with_a_billion_layers_fails_at_once(tmp_path, fmt):
    """Run in a process whose address space is capped: before the check, building the expected-shapes table
    (or the model) for 10**9 layers grew until it died."""
    if fmt == "int8":
        d, cfg = tiny_int8(tmp_path / "q"), "config.json"
    else:
        d = Path(shutil.copytree(TINY_HF if fmt == "hf" else TINY_TF, tmp_path / fmt))
        cfg = "config.json" if fmt == "hf" else "hparams.json"
    c = json.loads((d / cfg).read_text())
    c["n_layer"] = 10 ** 9
    (d / cfg).write_text(json.dumps(c))
    cap = 4 << 30

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "npgpt", "info", str(d)], capture_output=True, text=True,
                       preexec_fn=limit, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "n_layer=1000000000 but the file holds blocks [0, 1]" in lines[0] and cfg in lines[0]
    assert time.monotonic() - t0 < 60


class Endless(BaseHTTPRequestHandler):
    """Streams bytes with no Content-Length (HTTP/1.0, ended by closing), at most 4 MB."""
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(64):
                self.wfile.write(b"spam " * 13107)
        except OSError:
            pass


class Files(BaseHTTPRequestHandler):
    """Serves self.server.files {url path: bytes} with a Content-Length; 404 for anything else."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = self.server.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def serve(monkeypatch):
    """serve(handler, files=None) -> base URL of a server on 127.0.0.1; stopped after the test."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dl, "BACKOFF", 0.0)
    servers = []

    def start(handler, files=None):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads, httpd.files = True, files or {}
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_a_download_with_no_length_stops_at_the_limit(serve, tmp_path, capsys, monkeypatch):
    url = serve(Endless) + "/forever.txt"
    with pytest.raises(DownloadError, match=r"forever\.txt: the transfer went on past 100,000 bytes"):
        download_file(url, tmp_path / "f.txt", progress=False, max_bytes=100_000)
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "home"))
    assert main(["train", "--config", "tiny", "--context", "16", "--steps", "1", "--no-progress", "--data", url,
                 "--max-bytes", "100000", "--out", str(tmp_path / "run")]) == 2
    assert "more than the limit of 100,000 bytes" in one_line_error(capsys, "train")
    assert os.listdir(tmp_path / "home" / "data") == []


def test_a_url_whose_last_part_is_300_characters_downloads(serve, tmp_path):
    from npgpt.train.sources import load_text
    name = "/" + "a" * 296 + ".txt"
    url = serve(Files, {name: b"some text to train on"})
    assert load_text(url + name, cache_dir=tmp_path, progress=False) == ("some text to train on", url + name)
    (cached,) = os.listdir(tmp_path / "data")
    assert len(cached.encode()) < 255 and cached.endswith("aaa.txt")


# ----------------------------------------------------------------------------- downloads by name are pinned (item 11)
def tiny_release(base: str) -> dict:
    return {f"/{base}/{f}": (TINY_TF / f).read_bytes() for f in TF_FILES}


def test_pins_are_well_formed():
    for size, files in dl.RELEASE.items():
        assert set(files) == set(TF_FILES), size
        for n, sha in files.values():
            assert n > 0 and (sha is None or len(bytes.fromhex(sha)) == 32)
    assert dl.RELEASE["124M"]["model.ckpt.data-00000-of-00001"][0] == 4 * 124439808   # float32 x gpt2's parameters
    assert dl.RELEASE["355M"]["model.ckpt.data-00000-of-00001"][0] == 4 * 354823168


@pytest.mark.parametrize("name,size,why", [
    ("gpt2", "124M", r"hparams\.json: \d+ bytes, but OpenAI's 124M/hparams\.json has 90"),       # size and sha pinned
    ("gpt2-medium", "355M", r"hparams\.json: \d+ bytes, but OpenAI's 355M/hparams\.json has 91"),  # size pinned
    ("gpt2-large", "774M", r"774M \(from .*\): hparams\.json says .*'n_layer': 2.* but gpt2-large is"),  # preset
])
def test_a_download_by_name_that_is_not_openais_is_refused_and_nothing_cached(serve, tmp_path, monkeypatch, capsys,
                                                                              name, size, why):
    monkeypatch.setenv("NPGPT_BASE_URL", serve(Files, tiny_release(size)))
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path))
    assert main(["download", name]) == 2
    assert re.search(why, one_line_error(capsys, "download"))
    assert not (tmp_path / name).exists()
    assert [f for f in os.listdir(tmp_path / "openai" / size)] == []


def test_the_data_file_is_checked_against_its_pinned_hash(serve, tmp_path, monkeypatch):
    """The small files right, the weights not: the SHA-256 of the data file catches it (the index's
    CRC-32Cs could be recomputed by whoever made the file)."""
    files = tiny_release("124M")
    data = files["/124M/model.ckpt.data-00000-of-00001"]
    pins = {f: (len(files[f"/124M/{f}"]), hashlib.sha256(files[f"/124M/{f}"]).hexdigest()) for f in TF_FILES}
    pins["model.ckpt.data-00000-of-00001"] = (len(data), hashlib.sha256(b"other").hexdigest())
    monkeypatch.setitem(dl.RELEASE, "124M", pins)
    monkeypatch.setenv("NPGPT_BASE_URL", serve(Files, files))
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path))
    with pytest.raises(DownloadError, match=r"data-00000-of-00001: sha256 [0-9a-f]{64}, but OpenAI's 124M/"):
        ensure_downloaded("gpt2", progress=False)
    assert not (tmp_path / "gpt2").exists()
    assert sorted(os.listdir(tmp_path / "openai" / "124M")) == ["hparams.json", "model.ckpt.index"]


def test_a_cached_model_of_the_wrong_shape_is_not_trusted(tmp_path, monkeypatch, serve):
    """A native copy an older npgpt cached from a wrong server is not returned as gpt2."""
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path))
    monkeypatch.setenv("NPGPT_BASE_URL", serve(Files, {}))
    shutil.copytree(TINY_HF, tmp_path / "gpt2")
    with pytest.raises(DownloadError, match="HTTP 404"):
        load_checkpoint("gpt2")


def test_convert_checks_the_bundles_crc32c_unless_told_not_to(tmp_path, capsys):
    d = Path(shutil.copytree(TINY_TF, tmp_path / "tf"))
    data = bytearray((d / TF_FILES[2]).read_bytes())
    data[100] ^= 1
    (d / TF_FILES[2]).write_bytes(bytes(data))
    assert main(["convert", str(d), str(tmp_path / "out")]) == 2
    assert "fails its CRC-32C check" in one_line_error(capsys, "convert")
    assert not (tmp_path / "out").exists()
    assert main(["convert", "--no-verify", str(d), str(tmp_path / "out")]) == 0


# ----------------------------------------------------------------------------- every format npgpt writes (item 13)
def saved(kind: str, d: Path, runs) -> Path:
    """A model directory in one of the formats npgpt writes."""
    if kind == "run":
        return runs["char"]
    if kind == "tf":
        return TINY_TF
    model = npgpt.load_model(TINY_HF, dtype=np.float64 if kind == "float64" else np.float32)
    if kind in ("bf16", "int8"):
        npgpt.inference.quant.quantize(model, kind)
    if kind == "lora":
        from npgpt.layers.lora import apply_lora, lora_layers
        apply_lora(model, 2, 4.0, seed=0)
        for _, layer in lora_layers(model):
            layer.lora_B.data[...] = 0.1
    npgpt.save_model(model, d)
    return d


@pytest.mark.parametrize("kind", ["float32", "float64", "bf16", "int8", "lora", "tf", "run"])
def test_info_and_convert_read_every_format_npgpt_writes(tmp_path, capsys, runs, kind):
    d = saved(kind, tmp_path / "m", runs)
    assert main(["info", str(d)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    model = npgpt.load_model(d)
    assert f"n_layer:    {model.config.n_layer}" in out
    n = sum(int(np.prod(s)) for s in npgpt.io.hf_param_shapes(model.config).values())
    assert f"parameters: {n:,}" in out
    assert ("int8" in out) == (kind == "int8") and ("LoRA" in out) == (kind == "lora")
    assert main(["convert", str(d), str(tmp_path / "c")]) == 0, capsys.readouterr().err
    assert f"{n:,} parameters" in capsys.readouterr().out
    if kind == "run":                                          # the run's tokenizer goes along
        from npgpt.tokens.tokenizers import find_tokenizer
        assert find_tokenizer(tmp_path / "c").chars == find_tokenizer(d).chars
        assert (tmp_path / "c" / "tokenizer.json").is_file()
    converted = npgpt.load_model(tmp_path / "c")
    # more rows than int8's few-row products take (those quantize the activations): float32 activations
    idx = np.arange(min(model.config.n_ctx, npgpt.inference.quant.PACKED_MAX_ROWS + 1))[None] % model.config.n_vocab
    want, got = model.forward(idx), converted.forward(idx)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()     # the same function, in float32 sums


def test_a_headed_table_with_numbered_columns_skips_its_header(tmp_path):
    from npgpt.finetune.classify import read_table
    rows = ["label,text", "ham,see you soon", "spam,WIN a prize", "ham,ok", "spam,free entry", "ham,lunch?"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    texts, labels = read_table(str(tmp_path / "t.csv"), text_col="1", label_col="0")
    assert labels == ["ham", "spam", "ham", "spam", "ham"] and texts[0] == "see you soon"
    (tmp_path / "t.tsv").write_text("\n".join(r.replace(",", "\t") for r in rows[1:]) + "\n")
    assert read_table(str(tmp_path / "t.tsv"))[1] == ["ham", "spam", "ham", "spam", "ham"]   # no header: all rows
