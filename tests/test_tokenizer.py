import hashlib
import random
import shutil

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from npgpt.tokens.bpe import StreamDecoder, get_tokenizer
from npgpt.tokens import bpe as tokmod

# Where tiktoken's own "gpt2" encoding downloads its files from (tiktoken_ext/openai_public.py).
GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}

FIXED_STRINGS = [
    "",
    "Hello world",
    "hello world",
    " leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "     \n\n   \t\t  whitespace runs      ",
    "I'm sure you've seen it, they'll say we'd've done it. IT'S DONE",
    "naïve café, crème brûlée, Ångström, Øresund, Łódź, ñandú",
    "e\u0301 a\u0308 o\u0302\u0323 combining marks Z\u0351\u0352\u0353a\u035b\u035cl\u035dg\u035eo",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "rare CJK: 𠜎𠜱𠝹𠱓 龘 𪚥",
    "emoji 🤗😀🧬 👩‍👩‍👧 👍🏽 🏳️‍🌈 🇯🇵",
    "Ελληνικά, Русский, עברית, العربية, हिन्दी, ไทย",
    "math ∀x∈ℝ: x² ≥ 0 ∑∫√∞ ≠ ≈",
    "numbers 1234567890 3.14159 1e-10 0x1F",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "zero\u200bwidth\u200djoiner\ufeffbom\u00a0nbsp\u2028ls\u3000ideographic",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|><|endoftext|>",
    "<|endoftext",
    "\x00\x01\x7f control chars",
]

# (lo, hi) code point ranges used by the fuzzer; surrogates are excluded (not encodable as UTF-8).
RANGES = [
    (0x20, 0x7E),  # ASCII printable
    (0x09, 0x0D),  # ASCII whitespace
    (0x00, 0x1F),  # control characters
    (0x80, 0xFF),  # Latin-1 supplement
    (0x100, 0x24F),  # Latin extended
    (0x300, 0x36F),  # combining diacritics
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x6FF),  # Hebrew, Arabic
    (0x900, 0x97F),  # Devanagari
    (0xE00, 0xE7F),  # Thai
    (0x2000, 0x206F),  # general punctuation incl. zero-width and odd spaces
    (0x2190, 0x22FF),  # arrows, math operators
    (0x3000, 0x30FF),  # CJK punctuation, kana
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xE000, 0xF8FF),  # private use
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFF0, 0xFFFF),  # specials, noncharacters
    (0x1F300, 0x1FAFF),  # emoji
    (0x1F1E6, 0x1F1FF),  # regional indicators
    (0x20000, 0x2A6DF),  # CJK extension B
    (0x10000, 0x10FFFF),  # anything astral
]


def random_strings(n, seed=1234):
    rng = random.Random(seed)
    pieces = [" ", "  ", "\n", "\n\n", "'s", "'ll", "<|endoftext|>", "hello", " world", "123"]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.15:
                chars.append(rng.choice(pieces))
            else:
                lo, hi = rng.choice(RANGES)
                chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


FUZZ_STRINGS = random_strings(400)


@pytest.fixture(scope="module", autouse=True)
def private_tiktoken_cache(tmp_path_factory):
    # tiktoken keeps a copy of the files it reads in its cache dir; keep the tests' copies private.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        yield


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    local_read = tiktoken.load.read_file

    def read_local_only(blobpath):
        if "://" in blobpath:
            refuse(blobpath)
        return local_read(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", read_local_only)
    try:
        import requests
    except ImportError:
        pass
    else:
        monkeypatch.setattr(requests.Session, "request", refuse)
        monkeypatch.setattr(requests, "get", refuse)


@pytest.fixture
def reference_gpt2(tmp_path, monkeypatch, no_network):
    """tiktoken's own get_encoding("gpt2"), served from a pre-filled offline cache."""
    data = tokmod._bundled_data_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, url in GPT2_URLS.items():
        shutil.copyfile(data / name, cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    # get_encoding memoises built encodings in the module-level ENCODINGS dict.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    return tiktoken.get_encoding("gpt2")


# --- basics ---------------------------------------------------------------------------------


def test_constants_and_caching(tok):
    assert tok.eot_token == tok.eos_id == 50256
    assert tok.n_vocab == 50257
    assert get_tokenizer() is tok


def test_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert tok.decode([50256]) == "<|endoftext|>"


def test_endoftext_is_plain_text_by_default(tok):
    ids = tok.encode("<|endoftext|>")
    assert 50256 not in ids and len(ids) > 1
    assert tok.decode(ids) == "<|endoftext|>"

    text = "a<|endoftext|>b"
    plain = tok.encode(text)
    special = tok.encode(text, allowed_special="all")
    assert 50256 not in plain
    assert special == tok.encode("a") + [50256] + tok.encode("b")
    assert tok.decode(plain) == tok.decode(special) == text


@pytest.mark.parametrize("text", FIXED_STRINGS)
def test_round_trip_fixed(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < 50256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_round_trip_fuzz(tok):
    for text in FUZZ_STRINGS:
        assert tok.decode(tok.encode(text)) == text, repr(text)
        assert tok.decode(tok.encode(text, allowed_special="all")) == text, repr(text)


def test_lone_surrogate_becomes_replacement_char(tok):
    # Not representable in UTF-8; tiktoken substitutes U+FFFD rather than failing.
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


# --- parity with tiktoken's own gpt2 encoding -------------------------------------------------


def test_matches_tiktoken_gpt2(tok, reference_gpt2):
    ref = reference_gpt2
    assert ref.n_vocab == tok.n_vocab and ref.eot_token == tok.eot_token
    for text in FIXED_STRINGS + FUZZ_STRINGS:
        assert tok.encode(text) == ref.encode(text, disallowed_special=()), repr(text)
        assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")


def test_all_token_bytes_match_tiktoken_gpt2(tok, reference_gpt2):
    ref = reference_gpt2
    ours = tok.encoding
    for i in range(tok.n_vocab):
        assert ours.decode_single_token_bytes(i) == ref.decode_single_token_bytes(i), i
    everything = list(range(tok.n_vocab))
    assert tok.decode_bytes(everything) == ref.decode_bytes(everything)
    assert tok.decode(everything) == ref.decode(everything)


# --- streaming -----------------------------------------------------------------------------


def stream(tok, ids):
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids], dec.flush()


@pytest.mark.parametrize("text", FIXED_STRINGS)
def test_stream_decoder_fixed(tok, text):
    ids = tok.encode(text)
    pieces, tail = stream(tok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert tail == ""
    assert "".join(pieces) == tok.decode(ids) == text


def test_stream_decoder_fuzz(tok):
    for text in FUZZ_STRINGS:
        ids = tok.encode(text)
        pieces, tail = stream(tok, ids)
        assert "".join(pieces) + tail == text, repr(text)
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), repr(text)


@pytest.mark.parametrize("char", ["🤗", "𠜎", "龘"])
def test_stream_decoder_holds_back_split_character(tok, char):
    text = f"x{char}y"
    ids = tok.encode(text)
    token_bytes = [tok.encoding.decode_single_token_bytes(i) for i in ids]
    # The character really is spread over several tokens, none of them valid UTF-8 alone.
    split = [b for b in token_bytes if b not in (b"x", b"y")]
    assert len(split) >= 2
    assert b"".join(split) == char.encode()

    pieces, tail = stream(tok, ids)
    assert pieces[0] == "x"
    assert pieces[1 : len(split)] == [""] * (len(split) - 1)
    assert pieces[len(split)] == char
    assert pieces[-1] == "y" and tail == ""
    assert "".join(pieces) == tok.decode(ids) == text


def test_stream_decoder_flush_emits_incomplete_bytes_and_resets(tok):
    ids = tok.encode("🤗")
    dec = tok.stream_decoder()
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"
    # after flush, the decoder starts afresh
    assert "".join(dec.push(i) for i in tok.encode("ok 🤗")) == "ok 🤗"
    assert dec.flush() == ""


def test_stream_decoder_invalid_sequence(tok):
    # A lone continuation byte token is invalid UTF-8 and is emitted as U+FFFD straight away.
    lone = tok.encoding.encode_single_token(b"\x98")
    dec = StreamDecoder(tok)
    assert dec.push(tok.encode("a")[0]) == "a"
    assert dec.push(lone) == "\ufffd"
    assert dec.push(tok.encode("b")[0]) == "b"
    assert dec.flush() == ""


def test_stream_decoder_push_many_and_numpy_ids(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode("héllo 🤗 wörld")
    dec = StreamDecoder(tok)
    out = dec.push_many(ids[:3]) + "".join(dec.push(i) for i in np.asarray(ids[3:])) + dec.flush()
    assert out == "héllo 🤗 wörld"


# --- file handling -------------------------------------------------------------------------


def copy_data(tmp_path):
    data = tokmod._bundled_data_dir()
    enc, bpe = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    shutil.copyfile(data / "encoder.json", enc)
    shutil.copyfile(data / "vocab.bpe", bpe)
    return enc, bpe


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_explicit_paths(tmp_path, tok, no_network):
    enc, bpe = copy_data(tmp_path)
    other = get_tokenizer(encoder_json=enc, vocab_bpe=str(bpe))
    assert other.encode("Hello world") == [15496, 995]
    assert other.encode(FIXED_STRINGS[11]) == tok.encode(FIXED_STRINGS[11])


@pytest.mark.parametrize("name", ["encoder.json", "vocab.bpe"])
def test_bad_hash_names_the_file(tmp_path, name):
    enc, bpe = copy_data(tmp_path)
    bad = tmp_path / name
    corrupt(bad)
    with pytest.raises(ValueError, match="sha256") as info:
        get_tokenizer(encoder_json=enc, vocab_bpe=bpe)
    assert str(bad) in str(info.value)
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["encoder.json", "vocab.bpe"])
def test_missing_file_names_the_file(tmp_path, name):
    enc, bpe = copy_data(tmp_path)
    missing = tmp_path / name
    missing.unlink()
    with pytest.raises(FileNotFoundError) as info:
        get_tokenizer(encoder_json=enc, vocab_bpe=bpe)
    assert str(missing) in str(info.value)
