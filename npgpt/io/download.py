"""Download OpenAI's GPT-2 checkpoints and convert them once to the native format.

Cache layout (``cache_dir()`` = ``$NPGPT_HOME`` or ``~/.cache/npgpt``)::

    <cache>/openai/124M/{hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001}
    <cache>/gpt2/{config.json, model.safetensors}          # native, what gets loaded

The base URL (``.../gpt-2/models``) can be overridden with ``NPGPT_BASE_URL``; whatever it serves
must be OpenAI's release: each file's size and SHA-256 where ``RELEASE`` pins them, the model's
shapes those of the named preset, and every tensor its bundle's CRC-32C. A file that fails is
deleted, and nothing is converted or cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import time

from ..config import PRESET_ALIASES, PRESETS, GPTConfig

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
TF_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
MODEL_SIZES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}

RETRIES = 4          # extra attempts after a connection error / cut transfer (each one resumes)
BACKOFF = 0.5        # seconds; doubles per attempt, capped at 8 s
TIMEOUT = (15, 60)   # (connect, read) seconds
CHUNK = 1 << 16    # small enough that a cut connection loses little
DEFAULT_MAX_BYTES = 8 << 30   # the most a download may bring when nothing pins its size (gpt2-xl's weights: 6.2 GB)

# OpenAI's released files, {model size: {file: (bytes, sha256 or None)}}. Only published values:
# - sizes of 124M and 355M: rasbt/LLMs-from-scratch, ch05/01_main-chapter-code/tests.py, which checks
#   them with HEAD requests against openaipublic.blob.core.windows.net;
# - SHA-256s of 124M: the CHECKSUMS table of a public GPT-2 download script (Apache-2.0), corroborated:
#   its encoder.json and vocab.bpe hashes are the ones tiktoken checks (npgpt/tokens/bpe.py), its
#   hparams.json hash is that of the 90-byte file holding the 124M preset, and another public
#   document gives the same size and hash for the data file.
# None found for the 355M hashes or for 774M and 1558M at all: those files are checked by the
# converted shapes (against the preset) and the bundle's own CRC-32Cs only.
RELEASE = {
    "124M": {"hparams.json": (90, "d9d56e4121c427164e0c55c6f03c08e1daf9002b9b672825112d19097b680318"),
             "model.ckpt.index": (5215, "71916f763f9746f9b2a06b12d91996cf1084ae008d0424543d39391c5f2dc687"),
             "model.ckpt.data-00000-of-00001":
                 (497759232, "2060c885360cc0cf41d7a6dbc4d24b5127aae20260c8b5ae521b5a6578407118")},
    "355M": {"hparams.json": (91, None), "model.ckpt.index": (10399, None),
             "model.ckpt.data-00000-of-00001": (1419292672, None)},
}


class DownloadError(OSError):
    """A download failed; the message names the URL.  ``offline`` is True if nothing could be reached."""

    def __init__(self, msg: str, url: str | None = None, offline: bool = False):
        super().__init__(msg)
        self.url = url
        self.offline = offline


def cache_dir() -> str:
    """``$NPGPT_HOME`` if set, else ``~/.cache/npgpt``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("NPGPT_HOME") or os.path.join("~", ".cache", "npgpt")))


def base_url() -> str:
    return (os.environ.get("NPGPT_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def canonical_name(name: str) -> str:
    """``gpt2``/``124M`` -> ``gpt2`` etc.; ValueError for an unknown name."""
    key = PRESET_ALIASES.get(name, name)
    if key not in MODEL_SIZES or key not in PRESETS:
        raise ValueError(f"unknown model name {name!r}; choose one of {list(MODEL_SIZES) + list(PRESET_ALIASES)}")
    return key


def is_model_name(name) -> bool:
    return isinstance(name, str) and PRESET_ALIASES.get(name, name) in MODEL_SIZES


def _content_range(value: str | None):
    """Parse ``bytes a-b/N`` or ``bytes */N`` -> (a or None, N or None); None if absent/invalid."""
    if not value:
        return None
    m = re.match(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", value)
    if not m:
        return None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _unlink(path: str):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def download_file(url: str, dest: str, desc: str | None = None, **options) -> str:
    """Download ``url`` to ``dest`` (the options: _download's), one process at a time in dest's folder:
    two processes fetching the same file (a sweep's runs, test workers) would both write
    ``dest + '.part'``, one appending to the other's bytes. Each holds a lock on the folder (_locked:
    the directory itself, no lock file left) while it downloads; one that waited for it and finds
    ``dest`` made meanwhile returns it."""
    dest = os.fspath(dest)
    there = os.path.isfile(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)

    def waiting():
        if options.get("progress", True):
            print(f"npgpt: another process is downloading into {folder}; waiting for it", file=sys.stderr, flush=True)
    with _locked(folder, waiting):
        if not there and os.path.isfile(dest):
            return dest
        return _download(url, dest, desc, **options)


def _download(url: str, dest: str, desc: str | None = None, *, retries: int | None = None,
              backoff: float | None = None, timeout=TIMEOUT, progress: bool = True,
              session=None, max_bytes: int | None = None, verify=None) -> str:
    """Download ``url`` to ``dest`` with a progress bar, resuming ``dest + '.part'``.

    Resumes with an HTTP Range request (a 200 answer restarts from byte 0, a 206
    appends); connection errors and transfers cut short are retried ``retries``
    times, each attempt resuming where the last stopped.  The final size must
    equal the Content-Length / Content-Range total; on a mismatch the partial
    file is deleted and DownloadError raised.  HTTP errors (404, ...) raise
    DownloadError naming the URL.  ``dest`` appears only when complete
    (atomic rename).  At most ``max_bytes`` (default ``DEFAULT_MAX_BYTES``) are accepted: a
    larger announced size is refused at once, and a transfer with no announced size that runs past
    the limit is stopped and its partial file deleted.  ``verify(path)``, when given, is called on the
    complete ``.part`` before it becomes ``dest`` (a pinned hash: it raises, and deletes what is wrong).
    Returns ``dest``.
    """
    import requests                      # imported lazily: loading checkpoints needs no network stack
    from tqdm.auto import tqdm

    retryable = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                 requests.exceptions.ChunkedEncodingError)
    retries = RETRIES if retries is None else retries
    limit = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    backoff = BACKOFF if backoff is None else backoff
    dest = os.fspath(dest)
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    sess = session or requests.Session()
    expected = None          # total size once a response has told us
    failures = 0
    got_response = False
    bar = None

    def mismatch(msg):
        _unlink(part)
        raise DownloadError(f"{url}: size mismatch: {msg}; the partial download was deleted", url)

    def too_large(what):
        _unlink(part)
        raise DownloadError(f"{url}: {what}, more than the limit of {limit:,} bytes; "
                            f"the partial download was deleted", url)

    def retry_or_raise(reason):
        nonlocal failures
        failures += 1
        if failures > retries:
            kept = os.path.exists(part)
            raise DownloadError(
                f"{url}: download failed after {failures} attempts: {reason}"
                + (f"; the partial file {part} was kept and the next attempt resumes it" if kept else ""),
                url, offline=not got_response)
        time.sleep(min(8.0, backoff * 2 ** (failures - 1)))

    try:
        while True:
            offset = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={offset}-", "Accept-Encoding": "identity"} if offset else \
                {"Accept-Encoding": "identity"}
            try:
                with sess.get(url, headers=headers, stream=True, timeout=timeout) as r:
                    got_response = True
                    status = r.status_code
                    if status == 416 and offset:
                        cr = _content_range(r.headers.get("Content-Range"))
                        total = cr[1] if cr else None
                        if total is not None and total == offset and expected in (None, total):
                            break                      # the partial file was already complete
                        if total is not None and total < offset:
                            mismatch(f"partial file has {offset} bytes but the server says the file has {total}")
                        if expected is not None and total is not None and total != expected:
                            mismatch(f"server first announced {expected} bytes, now {total}")
                        _unlink(part)                  # unusable partial file: start over
                        retry_or_raise("server refused to resume (HTTP 416)")
                        continue
                    if status >= 500:
                        retry_or_raise(f"HTTP {status} {r.reason}")
                        continue
                    if status >= 400:
                        raise DownloadError(f"{url}: HTTP {status} {r.reason}"
                                            + (" (no such file on the server)" if status == 404 else ""), url)
                    if status == 206:
                        cr = _content_range(r.headers.get("Content-Range"))
                        if cr is None or cr[0] != offset:
                            _unlink(part)
                            retry_or_raise(f"server answered the range request for byte {offset} with "
                                           f"Content-Range {r.headers.get('Content-Range')!r}")
                            continue
                        total = cr[1]
                        mode = "ab"
                    elif status == 200:
                        offset = 0                     # server ignored the Range: restart
                        cl = r.headers.get("Content-Length")
                        total = int(cl) if cl and cl.isdigit() else None
                        mode = "wb"
                    else:
                        raise DownloadError(f"{url}: unexpected HTTP status {status} {r.reason}", url)
                    if total is not None:
                        if expected is not None and total != expected:
                            mismatch(f"server first announced {expected} bytes, now {total}")
                        expected = total
                        if total > limit:
                            too_large(f"the server announces {total:,} bytes")
                    if bar is None:
                        bar = tqdm(total=expected, initial=offset, unit="B", unit_scale=True,
                                   unit_divisor=1024, desc=desc or os.path.basename(dest),
                                   disable=not progress, dynamic_ncols=True)
                    else:
                        bar.total = expected
                        bar.n = offset
                        bar.refresh()
                    with open(part, mode) as f:
                        got = offset
                        for chunk in r.iter_content(CHUNK):
                            got += len(chunk)
                            if got > limit:
                                f.close()
                                too_large(f"the transfer went on past {limit:,} bytes")
                            f.write(chunk)
                            bar.update(len(chunk))
            except retryable as e:
                retry_or_raise(f"{type(e).__name__}: {e}")
                continue
            size = os.path.getsize(part)
            if expected is None or size == expected:
                break
            if size > expected:
                mismatch(f"received {size} bytes but the server announced {expected}")
            retry_or_raise(f"transfer ended after {size} of {expected} bytes")
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        if verify is not None:
            verify(part)
        os.replace(part, dest)
        return dest
    finally:
        if bar is not None:
            bar.close()
        if session is None:
            sess.close()


@contextlib.contextmanager
def _locked(path: str, waiting=None):
    """An exclusive advisory lock (POSIX flock) held for the block, so two processes don't download into
    the same place: on `path` itself where it is a directory (no file left behind), else on a lock file
    made there (and its folder). waiting(): called once when another holder makes this one wait. Nothing
    where locks are not to be had (Windows, a file system without them)."""
    try:
        import fcntl
    except ImportError:                      # pragma: no cover - non-POSIX
        yield
        return
    folder = os.path.isdir(path)
    if not folder:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDONLY if folder else os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:                      # some NFS and FUSE mounts refuse flock: go on unlocked
            pass
        yield
    finally:
        os.close(fd)                         # closing releases the lock


def native_dir(name: str) -> str:
    return os.path.join(cache_dir(), canonical_name(name))


def _native_complete(d: str, key: str) -> bool:
    """The converted checkpoint is there, with the named preset's shape (an older npgpt cached unchecked ones)."""
    from .layout import read_json_object
    from .safetensors import config_from_hf
    cfg = os.path.join(d, "config.json")
    if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(d, "model.safetensors"))):
        return False
    try:
        return config_from_hf(read_json_object(cfg, "JSON"), cfg) == GPTConfig.from_preset(key)
    except (OSError, ValueError):
        return False


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def check_release_file(path: str, size: str, name: str) -> None:
    """DownloadError (and ``path`` deleted) unless it has the bytes and SHA-256 ``RELEASE`` pins for OpenAI's
    ``size/name`` (nothing to check where none is pinned)."""
    want_bytes, want_sha = RELEASE.get(size, {}).get(name, (None, None))
    got = os.path.getsize(path)
    problem = None
    if want_bytes is not None and got != want_bytes:
        problem = f"{got:,} bytes, but OpenAI's {size}/{name} has {want_bytes:,}"
    elif want_sha is not None and (digest := _sha256(path)) != want_sha:
        problem = f"sha256 {digest}, but OpenAI's {size}/{name} has {want_sha}"
    if problem:
        _unlink(path)
        raise DownloadError(f"{path}: {problem}: not OpenAI's file (from {base_url()}); deleted it, nothing was cached")


def ensure_downloaded(name: str, progress: bool = True) -> str:
    """Return the native checkpoint directory of ``name`` (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl or 124M/355M/774M/1558M), downloading OpenAI's files and converting them
    the first time.  If the native directory exists, no network is used.  The files must be
    OpenAI's (see the module docstring); any that is not is deleted, with one line naming it."""
    from .safetensors import save_hf_checkpoint
    from .tf_bundle import load_tf_checkpoint, read_hparams

    key = canonical_name(name)
    native = native_dir(key)
    if _native_complete(native, key):
        return native
    size = MODEL_SIZES[key]
    tf_dir = os.path.join(cache_dir(), "openai", size)
    with _locked(os.path.join(cache_dir(), "openai", f".{size}.lock")):
        if _native_complete(native, key):     # another process finished meanwhile
            return native
        urls = {f: f"{base_url()}/{size}/{f}" for f in TF_FILES}
        try:
            for f in TF_FILES:                # the small files first: a wrong server is caught before the weights
                dest = os.path.join(tf_dir, f)
                if not os.path.isfile(dest):
                    download_file(urls[f], dest, desc=f"{key}: {f}", progress=progress,
                                  max_bytes=RELEASE.get(size, {}).get(f, (None,))[0])
                check_release_file(dest, size, f)
        except DownloadError as e:
            if not e.offline:
                raise
            listing = "\n".join(f"  {urls[f]}\n    -> {os.path.join(tf_dir, f)}" for f in TF_FILES)
            raise DownloadError(
                f"cannot download {key} ({e}).\nIf this machine is offline, download these files "
                f"elsewhere and put them here:\n{listing}\nthen run again (it converts them once into "
                f"{native}); or pass the path of a local checkpoint instead of a model name.",
                e.url, offline=True) from e
        try:
            config = read_hparams(os.path.join(tf_dir, "hparams.json"))
            if config != GPTConfig.from_preset(key):
                raise ValueError(f"hparams.json says {config.to_hparams()}, but {key} is {PRESETS[key]}")
            config, state = load_tf_checkpoint(tf_dir, verify=True)     # shapes as hparams.json, CRC-32Cs
        except (ValueError, OSError) as e:
            for f in TF_FILES:
                _unlink(os.path.join(tf_dir, f))
            raise DownloadError(f"the files downloaded for {key} into {tf_dir} are not OpenAI's {size} "
                                f"(from {base_url()}): {e}; deleted them, nothing was cached") from None
        save_hf_checkpoint(native, config, state)
    return native
