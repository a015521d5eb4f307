"""Writing files so that a kill or a full disk never leaves one half-written.

Every file npgpt writes goes through atomic_write: the bytes go to a temporary file beside the
target, are fsynced, and the temporary file is renamed over the target (rename is atomic within a
directory), then the directory is fsynced so the rename itself survives a power cut. On any error,
Ctrl-C included, the temporary file is removed and the target keeps its old content.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile


def fsync_dir(path) -> None:
    """Make a directory's entries (a rename into it) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path):
    """Open a temporary file beside ``path`` for writing (binary); on success fsync it and rename it over
    ``path``; on any error (or Ctrl-C) delete it, so ``path`` is never left half-written."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


def write_bytes(path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_json(path, obj, indent: int | None = 1) -> None:
    """obj as JSON (UTF-8, a final newline), atomically."""
    write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))
