"""Numba's disk cache of npgpt's kernels goes stale when any kernel source changes (npgpt/fast/_jit.py), not
only the kernel's own file: a kernel holds the code of the functions it calls from other files
(decode_block holds quant.py's and few_rows.py's products)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from numba import njit
from numba.core import caching

from npgpt.fast import _jit


def test_every_kernel_file_is_a_source():
    names = {os.path.relpath(p, _jit._PACKAGE) for p in _jit.kernel_sources()}
    assert {"fast/decode.py", "fast/quant.py", "fast/few_rows.py", "fast/_q8.py", "serve/kernels.py"} <= \
        {n.replace(os.sep, "/") for n in names}


def test_the_digest_follows_every_source(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    monkeypatch.setattr(_jit, "kernel_sources", lambda: [str(a), str(b)])
    first = _jit.kernel_sources_digest()
    assert _jit.kernel_sources_digest() == first
    b.write_text("y = 3\n")                                  # the other file: what Numba's own stamp misses
    os.utime(b, ns=(1, 1))
    assert _jit.kernel_sources_digest() != first
    b.write_text("y = 2\n")
    os.utime(b, ns=(2, 2))
    assert _jit.kernel_sources_digest() == first             # content, not times


def test_npgpt_kernels_are_stamped_with_every_source():
    from npgpt.fast import decode
    locator = decode.BLOCKS[True]._cache._impl.locator             # a parallel kernel calling other files' code
    assert isinstance(locator, _jit._KernelSources)
    own, every = locator.get_source_stamp()
    assert every == _jit.kernel_sources_digest() and own     # Numba's stamp of its own file kept beside it


def test_other_kernels_keep_numbas_locator():
    @njit(cache=True)
    def twice(x):
        return 2 * x
    assert not isinstance(twice._cache._impl.locator, _jit._KernelSources)


def test_no_file_tree_leaves_numbas_locators(monkeypatch):
    """Where the kernel sources cannot be listed (a zip, a frozen app), npgpt's locators step aside."""
    from npgpt.fast import decode

    def unreadable(path):
        raise NotADirectoryError(path)
    monkeypatch.setattr(_jit.os, "listdir", unreadable)
    assert _jit.kernel_sources() == []
    py_func = decode.BLOCKS[True].py_func
    assert all(cls.from_function(py_func, py_func.__code__.co_filename) is None for cls in _jit._LOCATORS)


def _waits_for(call, fd, fcntl, mode, index_path):
    """True if call() (in a thread) waits while fd holds `mode` on the lock file, and then finishes."""
    fcntl.flock(fd, mode)
    worker = threading.Thread(target=call, daemon=True)
    try:
        worker.start()
        worker.join(0.5)
        waited = worker.is_alive()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    worker.join(30)
    assert not worker.is_alive()
    return waited


def test_saving_a_build_waits_for_the_index_lock(tmp_path, monkeypatch):
    """Numba reads a kernel's index, takes a free data file and writes both back, unlocked: two processes
    saving builds at once could cross them. npgpt's saves take turns on KERNEL.nbi.lock (_jit._locked);
    a load waits for a save and shares the lock with other loads."""
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(_jit, "_CACHE_DIRS", {str(tmp_path)})
    cache_file = caching.IndexDataCacheFile(str(tmp_path), "kernel-1.py311", ("stamp",))
    fd = os.open(cache_file._index_path + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        save = lambda: cache_file.save(("float32",), "its machine code")      # noqa: E731
        assert _waits_for(save, fd, fcntl, fcntl.LOCK_EX, cache_file._index_path)   # another process saving
        assert cache_file.load(("float32",)) == "its machine code"
        loaded = []
        load = lambda: loaded.append(cache_file.load(("float32",)))           # noqa: E731
        assert _waits_for(load, fd, fcntl, fcntl.LOCK_EX, cache_file._index_path)   # a save in progress
        assert not _waits_for(load, fd, fcntl, fcntl.LOCK_SH, cache_file._index_path)  # another load
        assert loaded == ["its machine code"] * 2
    finally:
        os.close(fd)


def test_npgpt_kernels_indexes_are_locked():
    from npgpt.fast import decode
    assert decode.BLOCKS[True]._cache._cache_file._cache_path in _jit._CACHE_DIRS


def test_other_libraries_indexes_are_left_unlocked(tmp_path):
    cache_file = caching.IndexDataCacheFile(str(tmp_path), "theirs-1.py311", ("stamp",))
    cache_file.save(("float64",), "code")
    assert cache_file.load(("float64",)) == "code" and not os.path.exists(cache_file._index_path + ".lock")


def test_cache_is_cold_until_a_build_is_saved(tmp_path, monkeypatch):
    (tmp_path / "cold_kernel_module.py").write_text("from numba import njit\n\n\n@njit(cache=True)\n"
                                                    "def plus_one(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cold_kernel_module", raising=False)
    import importlib
    module = importlib.import_module("cold_kernel_module")
    assert _jit.cache_is_cold(module.plus_one)               # nothing compiled here yet: a first call compiles
    assert module.plus_one(1) == 2
    assert not _jit.cache_is_cold(module.plus_one)           # its build is on disk now
    assert not _jit.cache_is_cold(lambda x: x)               # not a cached kernel: nothing to tell


@pytest.mark.parametrize("killed_at", ["_save_data", "_save_index"])
def test_a_save_killed_half_way_never_pairs_a_build_with_another_builds_code(killed_at, tmp_path, monkeypatch):
    """A kill during a save leaves no index naming a data file that holds another build. (Numba writes the
    index first: killed before the data, the index named file 1, which still held a stale source's build,
    and the next run loaded that code as this build. Data first, a kill before the index would leave the
    stale index naming file 1 with the new build in it: so a stale index is emptied first.)"""
    monkeypatch.setattr(_jit, "_CACHE_DIRS", {str(tmp_path)})
    stale = caching.IndexDataCacheFile(str(tmp_path), "kernel-1.py311", ("old source",))
    stale.save(("float32",), "the old source's machine code")              # data file 1
    fresh = caching.IndexDataCacheFile(str(tmp_path), "kernel-1.py311", ("new source",))
    real = getattr(caching.IndexDataCacheFile, killed_at)

    def killed(self, *args):
        if killed_at == "_save_index" and args[0] == {}:
            return real(self, *args)                                          # the stale index emptied
        raise KeyboardInterrupt                                               # the process dies here
    with monkeypatch.context() as m:
        m.setattr(caching.IndexDataCacheFile, killed_at, killed)
        with pytest.raises(KeyboardInterrupt):
            fresh.save(("float64",), "the new build's machine code")         # a free number: file 1 again
    again = caching.IndexDataCacheFile(str(tmp_path), "kernel-1.py311", ("new source",))
    assert again.load(("float64",)) is None                                   # compiled again, not the old code
    assert stale.load(("float32",)) in (None, "the old source's machine code")   # nor the new one for the old
    again.save(("float64",), "the new build's machine code")
    assert again.load(("float64",)) == "the new build's machine code"


def test_npgpt_saves_name_files_as_numba_does(tmp_path, monkeypatch):
    """The data-first save takes the same file for each build as Numba's own: the same key again reuses its
    file, a new key the first free number, a stale index starts again at 1."""
    names = {}
    for who, save in (("numba", _jit._NUMBA_SAVE), ("npgpt", _jit._save_data_first)):
        folder = tmp_path / who
        folder.mkdir()
        f = caching.IndexDataCacheFile(str(folder), "kernel-1.py311", ("source 1",))
        for key, data in ((("a",), 1), (("b",), 2), (("a",), 3), (("c",), 4)):
            save(f, key, data)
        g = caching.IndexDataCacheFile(str(folder), "kernel-1.py311", ("source 2",))
        save(g, ("d",), 5)
        names[who] = (f._load_index(), g._load_index(), sorted(os.listdir(folder)),
                      [g.load(("d",)), f.load(("a",))])
    assert names["npgpt"] == names["numba"]
    assert names["npgpt"][1] == {("d",): "kernel-1.py311.1.nbc"} and names["npgpt"][3] == [5, None]


def test_a_second_import_of_the_cache_module_keeps_numbas_save(tmp_path):
    """A reload (IPython's autoreload) runs the module again: it must wrap Numba's own save, not its wrapper
    (which then called itself), and keep the folders it locks. In a process of its own."""
    (tmp_path / "reloaded_kernel.py").write_text("from numba import njit\n\n\n@njit(cache=True)\n"
                                                 "def twice(x):\n    return 2 * x\n")
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1])\n"
            "from npgpt.fast import _jit, decode\n"
            "save, dirs = _jit._NUMBA_SAVE, set(_jit._CACHE_DIRS)\n"
            "importlib.reload(_jit)\n"
            "assert _jit._NUMBA_SAVE is save and not getattr(save, 'npgpt_locked', False)\n"
            "assert dirs and dirs <= _jit._CACHE_DIRS\n"
            "import reloaded_kernel; assert reloaded_kernel.twice(2) == 4\n"          # a save after the reload
            "assert not _jit.cache_is_cold(reloaded_kernel.twice)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
