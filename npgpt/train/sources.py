"""Where training text comes from: ``--data`` resolved to one string.

``--data`` may be

- ``None`` or ``"the-verdict"``: Edith Wharton's short story "The Verdict" (1908, public
  domain, 20479 characters), shipped inside the package, so training works offline;
- ``"tinyshakespeare"``: downloaded once from ``NAMED_URLS["tinyshakespeare"]`` into the cache;
- an ``http://`` or ``https://`` URL: downloaded once into the cache (progress bar, resumable,
  atomic, at most ``max_bytes``: ``npgpt.io.download.download_file``); later runs reuse
  the cached file;
- a ``.txt`` (or any UTF-8 text) file;
- a directory: its ``*.txt`` files (not recursive), sorted by name, joined with one blank
  line (``DOC_SEPARATOR = "\\n\\n"``) between consecutive files.

Names are looked up before paths. Downloads go to ``<cache>/data/`` where ``<cache>`` is
``$NPGPT_HOME`` (default ``~/.cache/npgpt``) unless a ``cache_dir`` is given.
"""
from __future__ import annotations

import hashlib
import os
from urllib.parse import urlparse

from ..io.download import cache_dir as default_cache_dir
from ..io.download import download_file

__all__ = ["load_text", "NAMED_URLS", "BUNDLED", "DOC_SEPARATOR", "DEFAULT_DATA"]

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED = {"the-verdict": os.path.join(ASSETS, "the-verdict.txt")}
NAMED_URLS = {"tinyshakespeare":
              "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"}
DEFAULT_DATA = "the-verdict"
DOC_SEPARATOR = "\n\n"
NAME_TAIL = 96          # bytes of a URL's last path part kept in its cached file's name (names stop at 255)


def load_text(data=None, cache_dir=None, progress: bool = True, max_bytes: int | None = None) -> tuple[str, str]:
    """Resolve ``data`` (see the module docstring) -> ``(text, description)``.

    ``description`` names the source (the dataset name, URL or path). Raises
    FileNotFoundError for a missing path or a directory with no ``.txt`` files,
    ValueError for an unknown name or an empty text."""
    data = DEFAULT_DATA if data is None else os.fspath(data)
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    if data in BUNDLED:
        path, desc = BUNDLED[data], data
    elif data in NAMED_URLS:
        path, desc = fetch_url(NAMED_URLS[data], root, f"{data}.txt", progress, max_bytes), data
    elif is_url(data):
        path, desc = fetch_url(data, root, None, progress, max_bytes), data
    else:
        path, desc = local_path(data), data
    text = read_dir(path) if os.path.isdir(path) else read_file(path)
    if not text:
        raise ValueError(f"--data {desc}: the text is empty")
    return text, desc


def is_url(data: str) -> bool:
    return urlparse(data).scheme in ("http", "https")


def fetch_url(url: str, root: str, filename: str | None = None, progress: bool = True,
              max_bytes: int | None = None) -> str:
    """The cached copy of ``url`` under ``<root>/data/``, downloaded if not there yet.

    Without ``filename`` the file is named by a hash of the URL plus the end of its last path part
    (at most ``NAME_TAIL`` bytes of it, so that any URL makes a name the file system takes)."""
    if filename is None:
        base = os.path.basename(urlparse(url).path).encode()[-NAME_TAIL:].decode(errors="ignore") or "index"
        filename = f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"
    dest = os.path.join(root, "data", filename)
    if not os.path.isfile(dest):
        download_file(url, dest, desc=filename, progress=progress, max_bytes=max_bytes)
    return dest


def local_path(data: str) -> str:
    """``data`` if it exists; else FileNotFoundError, or ValueError if it looks like a name."""
    if os.path.exists(data):
        return data
    looks_like_name = not any(ch in data for ch in "./\\")
    if looks_like_name:
        names = ", ".join(list(BUNDLED) + list(NAMED_URLS))
        raise ValueError(f"--data {data!r}: unknown dataset name and no such file or directory "
                         f"(names: {names}; or give a .txt file, a directory or an http(s) URL)")
    raise FileNotFoundError(f"--data {data}: no such file or directory")


def read_file(path: str, allow_empty: bool = False) -> str:
    """A UTF-8 text file's contents; ValueError naming the file if it is not UTF-8 (or empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text and not allow_empty:
        raise ValueError(f"--data {path}: the file is empty")
    return text


def read_dir(path: str) -> str:
    """The directory's ``*.txt`` files, sorted by name, joined with ``DOC_SEPARATOR``."""
    names = sorted(n for n in os.listdir(path)
                   if n.endswith(".txt") and os.path.isfile(os.path.join(path, n)))
    if not names:
        raise FileNotFoundError(f"--data {path}: the directory has no .txt files")
    return DOC_SEPARATOR.join(read_file(os.path.join(path, n), allow_empty=True) for n in names)
