"""The two tokenizers ``npgpt train`` can use, behind one small interface.

Both have ``name``, ``n_vocab``, ``eot_token``, ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``identity`` (a string that changes whenever the mapping
from text to ids would change; it keys the token cache) and ``save(path)``, which writes
a JSON file that ``load_tokenizer(path)`` reads back, so a run directory can keep its
tokenizer (``DIR/tokenizer.json``) and generation can reload it.

- ``GPT2Tokenizer``: OpenAI's byte-level BPE (``npgpt.get_tokenizer()``), 50257 ids.
  A literal ``"<|endoftext|>"`` in training text is encoded as ordinary text.
- ``CharTokenizer``: one id per character, the vocabulary being the sorted unique
  characters of the whole text (as nanoGPT's ``shakespeare_char`` does).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

__all__ = ["CharTokenizer", "GPT2Tokenizer", "make_tokenizer", "load_tokenizer", "TOKENIZERS"]

TOKENIZERS = ("gpt2", "char")


class GPT2Tokenizer:
    """GPT-2's BPE tokenizer with the interface shared with ``CharTokenizer``."""

    name = "gpt2"
    identity = "gpt2"

    def __init__(self):
        from ..tokenizer import get_tokenizer   # built once per process (lru_cache)
        self._tok = get_tokenizer()
        self.n_vocab = self._tok.n_vocab        # 50257
        self.eot_token = self._tok.eot_token    # 50256

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def encoding(self):
        """The tiktoken encoding (what npgpt.tokenizer.StreamDecoder reads bytes from)."""
        return self._tok.encoding

    def to_json(self) -> dict:
        return {"type": "gpt2"}

    def save(self, path) -> None:
        _write_json(path, self.to_json())

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

    # the two byte-level methods npgpt.tokenizer.StreamDecoder needs, so generation streams char models too
    @property
    def encoding(self):
        return self

    def decode_single_token_bytes(self, i: int) -> bytes:
        return self.decode([i]).encode("utf-8", "surrogatepass")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}

    def save(self, path) -> None:
        _write_json(path, self.to_json())

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
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from None
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char" and isinstance(d.get("chars"), str):
        return CharTokenizer(d["chars"])
    raise ValueError(f"tokenizer file {path}: unknown tokenizer description (type {kind!r})")


def tokenizer_file(tok) -> dict:
    """{"tokenizer.json": bytes}: what a run directory and each of its checkpoints keep, so that
    generation reads text with the tokenizer the model was trained with."""
    return {"tokenizer.json": json.dumps(tok.to_json(), ensure_ascii=True).encode("utf-8")}


def _write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=True)
    os.replace(tmp, path)
