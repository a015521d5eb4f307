"""npgpt.train data: text sources, tokenizers, token cache, windows and batches."""
from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from npgpt.train import data as D
from npgpt.train import sources
from npgpt.train.data import BatchStream, Windows, eval_batches, prepare_data, split_text, tokenize_cached
from npgpt.train.sources import load_text
from npgpt.tokens.tokenizers import CharTokenizer, GPT2Tokenizer, load_tokenizer, make_tokenizer

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty $NPGPT_HOME, so nothing touches the real cache."""
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def textfile(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def windows_of(n, context, stride=None):
    return Windows(np.arange(n, dtype=np.uint16), context, stride)


# ---- windows: the book's layout -------------------------------------------------------------

def test_windows_layout_by_hand():
    w = windows_of(10, 3)                                 # starts 0, 3, 6 (6 < 10 - 3)
    x, y = w.get([0, 1, 2])
    assert x.dtype == y.dtype == np.int64 and x.shape == (3, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert windows_of(10, 3, stride=2).starts.tolist() == [0, 2, 4, 6]
    assert windows_of(10, 3, stride=1).starts.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert windows_of(10, 4, stride=5).starts.tolist() == [0, 5]


def test_windows_boundary_start_less_than_n_minus_context():
    assert windows_of(9, 3).starts.tolist() == [0, 3]     # start 6 would need ids[9]
    assert windows_of(4, 3).starts.tolist() == [0]        # exactly context + 1 tokens: one window
    assert len(windows_of(3, 3)) == 0 and len(windows_of(0, 3)) == 0


def test_windows_reject_bad_context_and_stride():
    with pytest.raises(ValueError, match="context"):
        windows_of(10, 0)
    with pytest.raises(ValueError, match="stride"):
        windows_of(10, 2, stride=0)


def test_split_is_by_characters():
    text = "abcdefghij" * 3 + "x"                           # 31 characters
    train, val = split_text(text, 0.9)
    assert len(train) == int(0.9 * 31) == 27 and train + val == text
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="train_ratio"):
            split_text(text, bad)


# ---- training batches --------------------------------------------------------------------------

def test_drop_last_and_epochs():
    s = BatchStream(windows_of(31, 3), batch_size=3, shuffle=False)   # 10 windows -> 3 batches/epoch
    assert len(s.windows) == 10 and s.batches_per_epoch == 3
    firsts = [s.next()[0][:, 0].tolist() for _ in range(4)]
    assert firsts == [[0, 3, 6], [9, 12, 15], [18, 21, 24], [0, 3, 6]]   # window 9 (start 27) dropped
    assert s.epoch == 1 and s.steps == 4


def test_shuffle_is_seeded_and_reshuffled_each_epoch():
    w = windows_of(61, 3)                                  # 20 windows
    def epoch_orders(seed, epochs=3, b=4):
        s = BatchStream(w, b, shuffle=True, seed=seed)
        out = []
        for _ in range(epochs):
            starts = [s.next()[0][:, 0] for _ in range(s.batches_per_epoch)]
            out.append((np.concatenate(starts) // 3).tolist())
        return out
    a, b, c = epoch_orders(0), epoch_orders(0), epoch_orders(1)
    assert a == b and a != c
    assert a[0] != a[1] != a[2]
    for e in range(3):
        assert sorted(a[e]) == list(range(20))             # each epoch: every window once
        assert a[e] == np.random.default_rng([0, e]).permutation(20).tolist()


def test_state_dict_resume_continues_the_same_stream():
    w = windows_of(61, 3)
    full = BatchStream(w, 3, shuffle=True, seed=7)          # 6 batches / epoch
    reference = [full.next() for _ in range(20)]
    part = BatchStream(w, 3, shuffle=True, seed=7)
    for _ in range(8):                                      # stop inside epoch 1
        part.next()
    state = json.loads(json.dumps(part.state_dict()))
    resumed = BatchStream(w, 3, shuffle=True, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    for x_ref, y_ref in reference[8:]:
        x, y = resumed.next()
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    # at an epoch boundary as well
    at_end = BatchStream(w, 3, shuffle=True, seed=7)
    at_end.load_state_dict({**state, "epoch": 0, "position": 6})
    np.testing.assert_array_equal(at_end.next()[0], reference[6][0])


def test_state_dict_of_another_stream_is_refused():
    s = BatchStream(windows_of(61, 3), 3, seed=7)
    for key, value in (("batch_size", 4), ("seed", 8), ("n_windows", 21), ("shuffle", False)):
        with pytest.raises(ValueError, match=key):
            s.load_state_dict({**s.state_dict(), key: value})
    with pytest.raises(ValueError, match="batch 7"):
        s.load_state_dict({**s.state_dict(), "position": 7})


def test_too_few_windows_for_one_batch():
    with pytest.raises(ValueError, match="2 windows, fewer than one batch of batch_size=3"):
        BatchStream(windows_of(7, 3), 3)


# ---- evaluation batches -----------------------------------------------------------------------

def test_eval_batches_cover_every_window_once_with_partial_last():
    w = windows_of(31, 3)                                   # 10 windows
    batches = list(eval_batches(w, 4))
    assert [x.shape for x, _ in batches] == [(4, 3), (4, 3), (2, 3)]
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(xs, w.get(np.arange(10))[0])
    np.testing.assert_array_equal(ys, w.get(np.arange(10))[1])
    assert [x.shape[0] for x, _ in eval_batches(w, 4, n_batches=2)] == [4, 4]
    assert [x.shape[0] for x, _ in eval_batches(w, 4, n_batches=9)] == [4, 4, 2]
    with pytest.raises(ValueError, match="no windows"):
        next(eval_batches(windows_of(3, 3), 4))


# ---- tokenizers ---------------------------------------------------------------------------------

def test_char_tokenizer_round_trip_save_load(tmp_path):
    tok = make_tokenizer("char", "hello, world")
    assert tok.name == "char" and tok.eot_token is None
    assert tok.chars == " ,dehlorw" and tok.n_vocab == 9
    ids = tok.encode("hello world")
    assert ids == [4, 3, 5, 5, 6, 0, 8, 6, 7, 5, 2] and tok.decode(ids) == "hello world"
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars and back.identity == tok.identity
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("hello, wozld")
    with pytest.raises(ValueError, match="token id 9"):
        tok.decode([9])


def test_gpt2_tokenizer_common_interface(tmp_path):
    tok = make_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer) and tok.name == "gpt2" and tok.n_vocab == 50257
    assert tok.encode("Hello world") == [15496, 995] and tok.decode(np.array([15496, 995])) == "Hello world"
    tok.save(tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), GPT2Tokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        make_tokenizer("bpe")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "t.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(ValueError, match="wordpiece"):
        load_tokenizer(tmp_path / "t.json")


# ---- token cache --------------------------------------------------------------------------------

def test_token_cache_hit_skips_encode_and_text_change_invalidates(textfile, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = prepare_data(textfile, tokenizer="char", context=16, cache_dir=cache)
    assert isinstance(first.train_ids, np.memmap) and first.train_ids.dtype == np.uint16
    assert len(os.listdir(cache / "tokens")) == 2           # train and val
    calls = []
    real_encode = CharTokenizer.encode
    def counting_encode(self, text):
        calls.append(len(text))
        return real_encode(self, text)
    monkeypatch.setattr(CharTokenizer, "encode", counting_encode)
    second = prepare_data(textfile, tokenizer="char", context=16, cache_dir=cache)
    assert calls == []
    np.testing.assert_array_equal(second.train_ids, first.train_ids)
    np.testing.assert_array_equal(second.val_ids, first.val_ids)
    textfile.write_text(TEXT + "one more line.\n", encoding="utf-8")
    third = prepare_data(textfile, tokenizer="char", context=16, cache_dir=cache)
    assert len(calls) == 2 and len(third.train_ids) > len(first.train_ids)
    assert not [n for n in os.listdir(cache / "tokens") if not n.endswith(".npy")]   # no temp files left


def test_token_cache_is_keyed_by_tokenizer(tmp_path):
    a = tokenize_cached("abc", CharTokenizer("abc"), tmp_path)
    b = tokenize_cached("abc", CharTokenizer("cba"), tmp_path)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [2, 1, 0]


def test_token_cache_uses_uint32_for_a_large_vocabulary(tmp_path):
    chars = "".join(chr(c) for c in range(0x100, 0x100 + 70000 + 2048) if not 0xD800 <= c < 0xE000)
    tok = CharTokenizer(chars[:70000])
    ids = tokenize_cached(tok.chars[-3:], tok, tmp_path)
    assert ids.dtype == np.uint32 and ids.tolist() == [69997, 69998, 69999]


# ---- sources ------------------------------------------------------------------------------------

def test_the_verdict_is_bundled_and_needs_no_network(home, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network used")
    monkeypatch.setattr(sources, "download_file", no_network)
    text, name = load_text()
    assert name == "the-verdict" and len(text) == 20479 and text.startswith("I HAD always thought Jack Gisburn")
    d = prepare_data(tokenizer="gpt2", context=256)          # the book's setting
    assert d.name == "the-verdict" and d.n_vocab == 50257
    assert (len(d.train), len(d.val)) == (18, 2)
    assert len(d.train_ids) + len(d.val_ids) in range(5140, 5150)
    assert os.path.isdir(home / "tokens")


def test_directory_of_txt_files_sorted_and_joined(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub.txt").mkdir()
    text, name = load_text(tmp_path)
    assert text == "first\n\nsecond" and name == str(tmp_path)


class _Server:
    """A threaded HTTP server on 127.0.0.1 (random port) serving a directory, counting GETs; with `delay`,
    each 64 KB of a file's body waits that many seconds (a slow link)."""

    def __init__(self, directory, delay: float = 0.0):
        self.requests = []
        owner = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                super().do_GET()

            def copyfile(self, source, outputfile):
                while chunk := source.read(1 << 16):
                    time.sleep(delay)
                    outputfile.write(chunk)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(tmp_path, monkeypatch):
    """serve({name: text}) -> a running _Server with those files."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(files, delay=0.0):
        root = tmp_path / f"www{len(servers)}"
        root.mkdir()
        for name, src in files.items():
            shutil.copyfile(src, root / name) if os.path.isfile(src) else (root / name).write_text(src, encoding="utf-8")
        servers.append(_Server(root, delay))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_url_is_downloaded_once_into_the_cache(serve, tmp_path):
    server = serve({"story.txt": TEXT})
    url = server.url + "/story.txt"
    cache = tmp_path / "cache"
    d = prepare_data(url, tokenizer="char", context=16, cache_dir=cache, progress=False)
    assert d.name == url and server.requests == ["/story.txt"]
    cached = os.listdir(cache / "data")
    assert len(cached) == 1 and cached[0].endswith("-story.txt")
    assert (cache / "data" / cached[0]).read_text(encoding="utf-8") == TEXT
    again = prepare_data(url, tokenizer="char", context=16, cache_dir=cache, progress=False)
    assert server.requests == ["/story.txt"]                # served from the cache
    np.testing.assert_array_equal(again.train_ids, d.train_ids)


def test_two_processes_fetching_one_url_take_turns(serve, tmp_path, capsys):
    """Two fetches of the same URL at once (threads here; processes take the same lock, a flock of the
    folder): the second says it waits for the first's download instead of writing the same .part beside
    it, then finds the file made. One GET, the file whole, nothing else left in the folder."""
    from npgpt.train.sources import fetch_url
    body = "".join(f"line {i}\n" for i in range(60000))               # ~650 KB: 10 chunks of a slow link
    server = serve({"big.txt": body}, delay=0.05)
    url, got = server.url + "/big.txt", []
    first = threading.Thread(target=lambda: got.append(fetch_url(url, str(tmp_path), progress=False)))
    first.start()

    def part_there():
        return (tmp_path / "data").exists() and any(f.endswith(".part") for f in os.listdir(tmp_path / "data"))
    deadline = time.monotonic() + 10
    while not part_there() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.is_alive()                                               # the first is mid-download
    got.append(fetch_url(url, str(tmp_path)))
    first.join()
    assert "another process is downloading into" in capsys.readouterr().err
    assert got[0] == got[1] and open(got[0], encoding="utf-8").read() == body
    assert server.requests == ["/big.txt"] and os.listdir(tmp_path / "data") == [os.path.basename(got[0])]


def test_url_not_found_names_the_url(serve, tmp_path):
    from npgpt.io.download import DownloadError
    server = serve({"story.txt": TEXT})
    with pytest.raises(DownloadError, match="missing.txt.*404"):
        load_text(server.url + "/missing.txt", cache_dir=tmp_path, progress=False)
    assert not os.path.exists(tmp_path / "data") or not os.listdir(tmp_path / "data")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "tinyshakespeare.txt")),
                    reason="../shared/data/tinyshakespeare.txt not available")
def test_tinyshakespeare_by_name(serve, home, monkeypatch):
    server = serve({"input.txt": os.path.join(SHARED_DATA, "tinyshakespeare.txt")})
    monkeypatch.setitem(sources.NAMED_URLS, "tinyshakespeare", server.url + "/input.txt")
    d = prepare_data("tinyshakespeare", tokenizer="char", context=256, progress=False)
    assert d.n_vocab == 65 and len(d.train_ids) + len(d.val_ids) == 1115394
    assert os.path.isfile(home / "data" / "tinyshakespeare.txt")
    prepare_data("tinyshakespeare", tokenizer="char", context=256, progress=False)
    assert server.requests == ["/input.txt"]


# ---- errors -------------------------------------------------------------------------------------

def test_error_messages(tmp_path, textfile):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "docs").mkdir()
    with pytest.raises(FileNotFoundError, match="docs: the directory has no .txt files"):
        load_text(tmp_path / "docs")
    with pytest.raises(ValueError, match="unknown dataset name.*the-verdict, tinyshakespeare"):
        load_text("shakespeare")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        load_text(tmp_path / "latin1.txt")
    kw = dict(tokenizer="char", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="train_ratio"):
        prepare_data(textfile, context=16, train_ratio=1.0, **kw)
    with pytest.raises(ValueError, match="context must be >= 1"):
        prepare_data(textfile, context=0, **kw)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        prepare_data(textfile, context=16, stride=0, **kw)
    n = len(TEXT)                                           # char tokenizer: tokens = characters
    n_train = int(0.9 * n)
    with pytest.raises(ValueError, match=f"training split has {n_train} tokens .* needs context \\+ 1 = {n + 1}"):
        prepare_data(textfile, context=n, **kw)
    with pytest.raises(ValueError, match=f"validation split has {n - n_train} tokens .* context \\+ 1 = 301"):
        prepare_data(textfile, context=300, **kw)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        prepare_data(textfile, context=16, **kw).eval_batches("test", 4)


def test_data_api_end_to_end(textfile, tmp_path):
    d = prepare_data(textfile, tokenizer="char", context=8, stride=4, cache_dir=tmp_path)
    assert d.context == 8 and d.stride == 4 and d.tokenizer.n_vocab == d.n_vocab
    assert d.train.starts.tolist() == list(range(0, len(d.train_ids) - 8, 4))
    s = d.batches(5, seed=3)
    x, y = s.next()
    assert x.shape == y.shape == (5, 8) and (x[:, 1:] == y[:, :-1]).all()
    assert d.tokenizer.decode(x[0]) in TEXT
    assert sum(len(x) for x, _ in d.eval_batches("val", 7)) == len(d.val)
    assert isinstance(d, D.Data)
