"""How kernels are compiled: cached to disk, and, for loops over rows or elements, twice.

The disk cache is Numba's, with two changes. A kernel's cached code is stale when any kernel source
changes, not only the file the kernel is written in (Numba's own test). A kernel compiles the functions it
calls from other files into itself (decode_block, in decode.py, holds quant.py's and few_rows.py's
products), so after an edit or an upgrade that touched only those, Numba would load the old callees'
code, without a word. See _KernelSources below. And a kernel's index of its builds is locked while a
process reads or writes it (see _locked).

`pjit` compiles a kernel written with `prange` both serially (prange runs as range) and in
parallel, and picks per call: a parallel region costs a thread wake-up on every launch, a
waste for the tiny arrays of decoding and gradient checks, and a stall whenever another
process holds a core. Call `kernel(work, *args)` where `work` is the number of elements touched.
"""
import functools
import hashlib
import itertools
import os
import types

try:
    import fcntl
except ImportError:          # Windows: Numba's own unlocked index
    fcntl = None

from .settings import parallel_min_work, quiet_kernel_threads

quiet_kernel_threads()   # before Numba loads libgomp (see npgpt/fast/settings.py)

from numba import njit  # noqa: E402
from numba.core import caching  # noqa: E402

_FAST = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_FAST)


def kernel_sources() -> list:
    """The files that hold npgpt's Numba kernels: npgpt/fast/*.py and npgpt/serve/kernels.py (none where the
    package is not a folder of files, e.g. inside a zip: there Numba's own locators serve)."""
    try:
        fast = sorted(os.path.join(_FAST, f) for f in os.listdir(_FAST) if f.endswith(".py"))
    except OSError:
        return []
    return fast + [os.path.join(_PACKAGE, "serve", "kernels.py")]


@functools.lru_cache(maxsize=None)
def _sources_digest(stamps: tuple) -> bytes:
    h = hashlib.sha256()
    for path, _, _ in stamps:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    return h.digest()


def kernel_sources_digest() -> bytes:
    """sha256 of every kernel source's path and bytes (re-read when one's size or mtime changes)."""
    stamps = []
    for path in kernel_sources():
        if os.path.exists(path):
            st = os.stat(path)
            stamps.append((path, st.st_mtime_ns, st.st_size))
    return _sources_digest(tuple(stamps))


_CACHE_DIRS = globals().get("_CACHE_DIRS", set())   # the folders npgpt's kernels are cached in (indexes locked)


class _KernelSources:
    """A Numba cache locator's mixin for npgpt's own kernels: the source stamp an index is checked against
    is Numba's (the function's own file) and the digest of every kernel source."""

    def get_source_stamp(self):
        return super().get_source_stamp(), kernel_sources_digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        if not os.path.abspath(py_file).startswith(_PACKAGE + os.sep) or not kernel_sources():
            return None                                  # another library's kernel: Numba's own locators
        locator = super().from_function(py_func, py_file)
        if locator is not None:
            _CACHE_DIRS.add(locator.get_cache_path())
        return locator


# The same places as Numba's (NUMBA_CACHE_DIR, __pycache__ beside the source, the user's cache directory),
# tried first, for npgpt's kernels only.
_LOCATORS = [type("Npgpt" + base.__name__, (_KernelSources, base), {})
             for base in (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)]
if not any(c.__name__.startswith("Npgpt") for c in caching.CacheImpl._locator_classes):   # once, reloads too
    caching.CacheImpl._locator_classes[:0] = _LOCATORS


# Numba saves a build by reading the kernel's index, taking the first free data file number and writing the
# index and then the data back, with no lock: two processes saving different builds of one kernel at once
# (the test suite's worker processes, MPI ranks or two commands on a cold cache) could both take file 1,
# leaving the index naming one build's types and the data holding the other's machine code; and a process
# loading between the two writes could read the new index with the old data. For npgpt's kernels a save
# holds an exclusive lock on the index's lock file (KERNEL.nbi.lock beside it) and a load a shared one,
# and a save writes the data before the index that names it (_save_data_first).
def _save_data_first(self, key, data):
    """Numba's IndexDataCacheFile.save with its two writes the other way round: the build's data file, then
    the index. Numba writes the index first: a process killed between the two left an index naming a data
    file that still held an older build (a stale source's, numbered the same), which the next run loaded as
    this one. Each write is whole or absent (a temporary file renamed), and a stale index is emptied before
    the data is written (it may name the same file number), so a kill leaves no index naming the new file,
    or both written."""
    overloads = self._load_index()
    if not overloads and os.path.exists(self._index_path):
        self._save_index({})          # a stale index (another source or Numba) may name the file taken below
    name = overloads.get(key)
    if name is None:
        taken = set(overloads.values())
        name = next(self._data_name(i) for i in itertools.count(1) if self._data_name(i) not in taken)
    self._save_data(name, data)
    if overloads.get(key) != name:
        overloads[key] = name
        self._save_index(overloads)


def _locked(method, exclusive):
    def with_the_lock(self, *args):
        if fcntl is None or self._cache_path not in _CACHE_DIRS:
            return method(self, *args)                   # another library's kernel: as Numba does it
        try:
            fd = os.open(self._index_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:                                         # a cache someone else writes: a shared lock reads it
                fd = os.open(self._index_path + ".lock", os.O_RDONLY)
            except OSError:
                return method(self, *args)               # no lock file to be had: as Numba does it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError:                              # a file system without locks (some NFS, FUSE)
                pass
            return method(self, *args)
        finally:
            os.close(fd)                                 # closing releases the lock
    with_the_lock = functools.wraps(method)(with_the_lock)
    with_the_lock.npgpt_locked = True
    return with_the_lock


# Numba's own save, kept on the class so that a second import of this module (a reload) finds it, not the wrapper
_NUMBA_SAVE = caching.IndexDataCacheFile.__dict__.get("_npgpt_numba_save") or caching.IndexDataCacheFile.save
caching.IndexDataCacheFile._npgpt_numba_save = _NUMBA_SAVE


def _save(self, key, data):
    # npgpt's kernels: data first (below); another library's: Numba's own save (_locked passes it through)
    return (_save_data_first if self._cache_path in _CACHE_DIRS else _NUMBA_SAVE)(self, key, data)


if not all(hasattr(caching.IndexDataCacheFile, a) for a in ("_load_index", "_data_name", "_save_data", "_save_index")):
    _save = _NUMBA_SAVE                                  # another Numba's internals: its own order, still locked
for _name, _method, _exclusive in (("save", _save, True), ("load", caching.IndexDataCacheFile.load, False)):
    if not getattr(getattr(caching.IndexDataCacheFile, _name), "npgpt_locked", False):
        setattr(caching.IndexDataCacheFile, _name, _locked(_method, _exclusive))


def cache_is_cold(kernel) -> bool:
    """True when the disk cache holds no build of this Numba kernel for the current sources: its first call
    compiles (once after an install, an upgrade or an edit; the decoding kernels take ~15 s on 2 cores).
    False when it holds one, or when this Numba does not let it be told."""
    try:
        magic = kernel.targetctx.codegen().magic_tuple()  # this CPU and OS: Numba keys each build by it
        return not any(key[1] == magic for key in kernel._cache._cache_file._load_index())
    except Exception:                                    # noqa: BLE001  (Numba's private attributes moved)
        return False


# Below ~262k elements one thread finishes before the others are awake: waking the kernels' sleeping
# OpenMP threads right after a GEMM costs ~50-100 us on 2 cores. Measured there (examples/profile_ops.py,
# docs/performance.md "Every op on every core"): at 98k elements (nanoGPT's CPU shape) LayerNorm's
# kernels ran 0.7x as fast on 2 threads as on 1, GELU's 1.2-1.5x; from ~200k up both gain.
# NPGPT_PARALLEL_MIN_WORK sets another crossover (settings.parallel_min_work), for machines with more cores.
PARALLEL_MIN_WORK = parallel_min_work()

# error_model="numpy": a float division by zero gives inf/nan as in NumPy instead of raising
# ZeroDivisionError. Parallel builds use it anyway; in a serial build the Python model's check
# on every division keeps LLVM from vectorising the loop (GELU's serial loop ran ~10x slower).
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")     # every kernel's, serial or parallel
jit = njit(**JIT_OPTIONS)


def _renamed(fn, suffix):
    """A copy of fn under another qualified name, so Numba caches the two builds separately."""
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    g.__module__ = fn.__module__
    return g


# Floating-point sums are sequential unless reassociation is allowed: with it LLVM keeps several
# partial sums in SIMD lanes (accumulating in float64 keeps the result as accurate as NumPy's
# pairwise sums). No 'nnan'/'ninf': the masked softmax relies on -inf.
REDUCTION_MATH = {"reassoc", "contract"}


class _SerialOrParallel:
    def __init__(self, fn, fastmath):
        self.py_func = fn
        opts = dict(JIT_OPTIONS, fastmath=fastmath)
        self.serial = njit(**opts)(_renamed(fn, "_serial"))
        self.parallel = njit(parallel=True, **opts)(_renamed(fn, "_parallel"))
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, work, *args):
        return (self.parallel if work >= PARALLEL_MIN_WORK else self.serial)(*args)


def pjit(fn=None, *, reductions: bool = False):
    """@pjit or @pjit(reductions=True) (allow reassociating sums, see REDUCTION_MATH)."""
    fastmath = REDUCTION_MATH if reductions else False
    if fn is None:
        return lambda f: _SerialOrParallel(f, fastmath)
    return _SerialOrParallel(fn, fastmath)

