"""The two tokenizers ``npgpt train`` can use, behind one small interface.

Both have ``name``, ``n_vocab``, ``eot_token``, ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``identity`` (a string that changes whenever the mapping
from text to ids would change; it keys the token cache), ``save(path)``, which writes
npgpt's JSON record of it that ``load_tokenizer(path)`` reads back, and ``hf_files()``,
the files Hugging Face's tokenizers read.  A run directory and each of its checkpoints
keep both (``save_tokenizer``): npgpt's record as ``npgpt_tokenizer.json``, which
generation reloads (``find_tokenizer``), and the Hugging Face files, so that
``transformers.AutoTokenizer``, its pipelines and llama.cpp's converter open the model
with the tokenizer it was trained with.

- ``GPT2Tokenizer``: OpenAI's byte-level BPE (``npgpt.get_tokenizer()``), 50257 ids.
  A literal ``"<|endoftext|>"`` in training text is encoded as ordinary text.
- ``CharTokenizer``: one id per character, the vocabulary being the sorted unique
  characters of the whole text (as nanoGPT's ``shakespeare_char`` does).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Iterable

from ..io.atomic import write_bytes

__all__ = ["CharTokenizer", "GPT2Tokenizer", "make_tokenizer", "load_tokenizer", "find_tokenizer",
           "save_tokenizer", "tokenizer_files", "TOKENIZERS", "RECORD"]

TOKENIZERS = ("gpt2", "char")
RECORD = "npgpt_tokenizer.json"      # npgpt's own record of the tokenizer, in a run directory and its checkpoints
LEGACY_RECORD = "tokenizer.json"     # where older runs kept it: the name Hugging Face's fast tokenizers own


class GPT2Tokenizer:
    """GPT-2's BPE tokenizer with the interface shared with ``CharTokenizer``."""

    name = "gpt2"
    identity = "gpt2"

    def __init__(self):
        from .bpe import get_tokenizer   # built once per process (lru_cache)
        self._tok = get_tokenizer()
        self.n_vocab = self._tok.n_vocab        # 50257
        self.eot_token = self._tok.eot_token    # 50256

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def encoding(self):
        """The tiktoken encoding (what npgpt.tokens.bpe.StreamDecoder reads bytes from)."""
        return self._tok.encoding

    def to_json(self) -> dict:
        return {"type": "gpt2"}

    def hf_files(self) -> dict:
        """What Hugging Face's GPT-2 tokenizer reads: vocab.json and merges.txt (OpenAI's files) and a
        tokenizer_config.json naming the class and <|endoftext|> as its special token."""
        from .bpe import ENDOFTEXT, hf_vocab_files
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                  "unk_token": ENDOFTEXT, "add_prefix_space": False, "clean_up_tokenization_spaces": False}
        return {**hf_vocab_files(), "tokenizer_config.json": _json_bytes(config)}

    def save(self, path) -> None:
        write_bytes(path, _json_bytes(self.to_json()))

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(n_vocab={self.n_vocab})"


class CharTokenizer:
    """Character-level tokenizer: id ``i`` is the ``i``-th character of ``chars``."""

    name = "char"
    eot_token = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("a character vocabulary must be a non-empty string of distinct characters")
        self.chars = chars
        self.n_vocab = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}
        # the vocabulary itself is part of the identity: another text -> another vocab -> other ids
        self.identity = "char:" + hashlib.sha256(chars.encode("utf-8", "surrogatepass")).hexdigest()

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The sorted unique characters of ``text`` (the whole text, train and val alike)."""
        if not text:
            raise ValueError("cannot build a character vocabulary from an empty text")
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} (U+{ord(e.args[0]):04X}) is not in the "
                             f"character vocabulary ({self.n_vocab} characters)") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the character vocabulary (0..{self.n_vocab - 1})")
        return "".join(self.chars[i] for i in ids)

    # the two byte-level methods npgpt.tokens.bpe.StreamDecoder needs, so generation streams char models too
    @property
    def encoding(self):
        return self

    def decode_single_token_bytes(self, i: int) -> bytes:
        return self.decode([i]).encode("utf-8", "surrogatepass")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}

    def hf_files(self) -> dict:
        """A tokenizers-library tokenizer.json doing what this one does (the text split into single
        characters, each looked up in the vocabulary {chars[i]: i}, ids decoded by concatenation), and
        the tokenizer_config.json that makes transformers load it as a fast tokenizer."""
        spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                                  "invert": False},
                "post_processor": None, "decoder": {"type": "Fuse"},
                "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(self.chars)},
                          "unk_token": "<unk>"}}      # not in the vocabulary: an unknown character is an error
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        return {"tokenizer.json": _json_bytes(spec), "tokenizer_config.json": _json_bytes(config)}

    def save(self, path) -> None:
        write_bytes(path, _json_bytes(self.to_json()))

    def __repr__(self) -> str:
        return f"CharTokenizer(n_vocab={self.n_vocab})"


def make_tokenizer(kind, text: str | None = None):
    """``"gpt2"`` -> ``GPT2Tokenizer()``; ``"char"`` -> ``CharTokenizer.from_text(text)``.

    A tokenizer object (e.g. one from ``load_tokenizer``, to resume a run with its saved
    vocabulary) is returned unchanged."""
    if not isinstance(kind, str):
        return kind
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if text is None:
            raise ValueError("the char tokenizer is built from the text; pass text=...")
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")


def load_tokenizer(path):
    """Read a tokenizer written by ``save(path)``."""
    d = _read_json(path)
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char" and isinstance(d.get("chars"), str):
        return CharTokenizer(d["chars"])
    raise ValueError(f"tokenizer file {path}: unknown tokenizer description (type {kind!r})")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from None


def _is_legacy_record(path) -> bool:
    """Whether ``path`` is npgpt's record under the old name (``{"type": ...}``), not a Hugging Face tokenizer.json."""
    try:
        d = _read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "type" in d and "model" not in d


def find_tokenizer(directory):
    """The tokenizer npgpt saved in ``directory`` (its ``RECORD``, or an older run's record under
    ``tokenizer.json``), else None."""
    for name in (RECORD, LEGACY_RECORD):
        path = os.path.join(os.fspath(directory), name)
        if os.path.isfile(path) and (name == RECORD or _is_legacy_record(path)):
            return load_tokenizer(path)
    return None


def tokenizer_files(tok) -> dict:
    """{file name: bytes}: what a run directory and each of its checkpoints keep, so that generation reads
    text with the tokenizer the model was trained with (npgpt's record) and so do Hugging Face's tools."""
    return {RECORD: _json_bytes(tok.to_json()), **tok.hf_files()}


def save_tokenizer(tok, directory) -> None:
    """Write ``tokenizer_files(tok)`` into ``directory``, each file atomically, and remove an older npgpt
    record named tokenizer.json that they do not replace (Hugging Face's tools would read it first)."""
    directory = os.fspath(directory)
    files = tokenizer_files(tok)
    legacy = os.path.join(directory, LEGACY_RECORD)
    if LEGACY_RECORD not in files and _is_legacy_record(legacy):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(legacy)
    for name, data in files.items():
        write_bytes(os.path.join(directory, name), data)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode("utf-8")
