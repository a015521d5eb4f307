"""Numba's disk cache of npgpt's kernels goes stale when any kernel source changes (npgpt/fast/_jit.py), not
only the kernel's own file: a kernel holds the code of the functions it calls from other files
(decode_block holds quant.py's and few_rows.py's products)."""
from __future__ import annotations

import os

from numba import njit

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
    locator = decode._block._cache._impl.locator             # a parallel kernel calling other files' code
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
    py_func = decode._block.py_func
    assert all(cls.from_function(py_func, py_func.__code__.co_filename) is None for cls in _jit._LOCATORS)
