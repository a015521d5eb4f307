"""What an evaluation keeps as it goes, so that an interrupted `npgpt eval` continues where it stopped.

score() (npgpt/eval/score.py) writes each finished batch of requests to one file, written whole and then
renamed into place, in a folder named by a digest of everything its numbers depend on: the model's arrays,
the requests, the batch size and the rank count, the kernels (backend, sources, the CPU they were built
for, the fused attention's availability, the packed products' settings) and the versions of npgpt, NumPy
and Numba. Run again, the same evaluation finds that folder, loads its batches and scores only the others:
the same requests in the same batches, so the result is the uninterrupted run's to the bit. A finished
evaluation removes its folder; folders left for more than PRUNE_DAYS days are removed by the next one.

    $NPGPT_HOME/eval-progress/<digest>/rank<R>-<b>.npz     rank R's batch that starts at position b of its
                                                           order: the requests' indices, their scored tokens'
                                                           nll and greedy hits end to end, a count a request

A kill or a lost machine loses at most the batch being written (a `.part` file, ignored, gone with the
folder); a file that cannot be read is scored again; a full disk or an unwritable cache stops the keeping,
not the evaluation.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np

FOLDER = "eval-progress"
PRUNE_DAYS = 14

PACKED = ("packed", "scale")    # a packed layer's weights (npgpt.inference.quant), beside its Parameters


def model_digest(model) -> bytes:
    """sha256 of a model's weights by name: every Parameter and a packed layer's int8/bf16 arrays (not what a
    training forward may have kept for its backward)."""
    h = hashlib.sha256()
    arrays = [(name, p.data) for name, p in model.named_parameters()]
    arrays += [(f"{name}.{attr}", getattr(m, attr)) for name, m in model.named_modules() for attr in PACKED
               if isinstance(getattr(m, attr, None), np.ndarray)]
    for name, arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{name} {arr.dtype.str} {arr.shape}\0".encode())
        h.update(memoryview(arr.reshape(-1)).cast("B"))
    return h.digest()


def progress_folder(model, requests, batch: int, dist) -> str:
    """The folder of this evaluation's finished batches (see the module docstring); not created here. Rank 0
    computes it (hashing the weights once) and every rank gets it."""
    folder = None
    if dist.is_main:
        from .. import fast
        from ..fast import settings
        from ..io.download import cache_dir
        h = hashlib.sha256(model_digest(model))
        for r in requests:
            ids = np.ascontiguousarray(r.ids, dtype=np.int64)
            h.update(np.int64(r.first).tobytes() + np.int64(len(ids)).tobytes() + ids.tobytes())
        h.update(f"batch {batch} ranks {dist.world_size} kernels {fast.get_backend()} npgpt {_version()} numpy "
                 f"{np.__version__} {platform.machine()} {_cpu()} flash {fast.flash_attention_available()} rows "
                 f"{settings.packed_rows()}".encode())
        if fast.use_numba():
            import numba
            from ..fast._jit import kernel_sources_digest
            h.update(f"numba {numba.__version__}".encode() + kernel_sources_digest())
        folder = os.path.join(cache_dir(), FOLDER, h.hexdigest()[:32])
    return dist.bcast(folder)


def _version() -> str:
    try:
        return version("npgpt")
    except PackageNotFoundError:             # run from a source tree that was never installed
        return "source"


def _cpu() -> str:
    """The CPU's model name and flags (what Numba's and OpenBLAS's code is chosen for), where Linux says."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().splitlines() if line.startswith(("model name", "flags"))]
        return " ".join(lines[:2])
    except OSError:
        return platform.processor()


class Kept:
    """This rank's finished batches of one evaluation, on disk: load() what an earlier run kept, add() each
    batch as it finishes, remove() the folder when the evaluation is complete (every rank, once all are:
    a cache on each node's own disk is emptied too)."""

    def __init__(self, folder: str, rank: int):
        self.folder, self.rank, self.failed = folder, rank, False

    def _path(self, first: int) -> str:
        return os.path.join(self.folder, f"rank{self.rank}-{first}.npz")

    def load(self) -> dict:
        """{position in this rank's order: (items, nll, greedy, counts)} kept by an earlier run; a file that
        cannot be read (cut short by a lost machine, damaged) is left out: its batch is scored again."""
        kept = {}
        prefix = f"rank{self.rank}-"
        try:
            names = os.listdir(self.folder)
        except OSError:
            return kept
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".npz")):
                continue
            try:
                first = int(name[len(prefix):-4])
                with np.load(os.path.join(self.folder, name)) as f:
                    kept[first] = (f["items"], f["nll"], f["greedy"], f["counts"])
            except Exception:        # noqa: BLE001  (zipfile.BadZipFile, EOFError, ValueError, OSError, ...)
                continue
        return kept

    def add(self, first: int, items, nll, greedy, counts) -> None:
        """Keep one finished batch (written whole to a .part file, then renamed into place). The first write
        that fails (a full disk, an unwritable cache) ends the keeping for this run, quietly."""
        if self.failed:
            return
        path = self._path(first)
        part = f"{path}.{os.getpid()}.part"
        try:
            os.makedirs(self.folder, exist_ok=True)
            with open(part, "wb") as f:
                np.savez(f, items=np.asarray(items, np.int64), nll=nll, greedy=greedy,
                         counts=np.asarray(counts, np.int64))
            os.replace(part, path)
        except OSError:
            self.failed = True
            try:
                os.remove(part)
            except OSError:
                pass

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def prune(now: float | None = None) -> None:
    """Remove evaluation folders nothing has written to for PRUNE_DAYS days (runs never continued)."""
    from ..io.download import cache_dir
    root = os.path.join(cache_dir(), FOLDER)
    now = time.time() if now is None else now
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        path = os.path.join(root, name)
        try:
            if now - os.stat(path).st_mtime > PRUNE_DAYS * 86400:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
