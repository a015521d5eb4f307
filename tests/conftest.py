"""Shared fixtures for npgpt's tests.

`backend` runs a test once per kernel backend ("numpy", the readable reference, and
"numba", the fast kernels); `kernel_build` adds a third run, "numba-parallel", with every
Numba kernel forced onto its parallel build; `kernel_threads` runs a kernel test on its serial
and its parallel build.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import npgpt
import npgpt.fast

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's test command): a worker a core, at most 4, unless PYTEST_XDIST_AUTO_NUM_WORKERS
    says. Most of a cold run is Numba compiling kernels, each on one core (with an empty kernel cache the
    suite took 582-610 s in one process on 2 cores, 279-291 s in two); more workers than that mostly compile
    the same shared kernels twice, and every worker's parallel kernels and BLAS use every core as it is."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None                                   # pytest-xdist's own hook reads it
    from npgpt.fast import _jit
    if _jit.fcntl is None:
        return 1                                      # no lock on the kernel cache's index here (Windows)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@pytest.fixture(params=["numpy", "numba"])
def backend(request):
    name = request.param
    with npgpt.fast.use_backend(name):
        yield name


@pytest.fixture(params=["numpy", "numba", "numba-parallel"])
def kernel_build(request, monkeypatch):
    """Like `backend`, plus "numba-parallel": the numba backend with every kernel forced onto its
    parallel build (Numba kernels run serially below a work-size threshold, which the tiny test
    models never reach, so without this the parallel builds would go untested end to end)."""
    name = request.param
    if name == "numba-parallel":
        from npgpt.fast import _jit
        monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 0)
    with npgpt.fast.use_backend("numpy" if name == "numpy" else "numba"):
        yield name


@pytest.fixture(params=["serial", "parallel"])
def kernel_threads(request, monkeypatch):
    """Runs a kernel test on both builds of every Numba kernel: "serial" (prange as range, what small
    work gets) and "parallel" (forced, whatever the size). Kernel test modules use it for every test."""
    from npgpt.fast import _jit
    monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 1 << 62 if request.param == "serial" else 0)
    return request.param


@pytest.fixture(scope="session")
def ref_f32():
    with np.load(os.path.join(FIXTURES, "reference_f32.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, list(z.files)


@pytest.fixture(scope="session")
def ref_f64():
    with np.load(os.path.join(FIXTURES, "reference_f64.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, list(z.files)


def _randomize_params(model, rng, weight_std=None, bias_std=0.1, gain_std=0.1):
    """Make biases and layernorm gains non-trivial (not 0 / 1); optionally redraw the weights.

    1-D parameters named *weight are layernorm gains (-> 1 + gain_std * z), other 1-D ones are
    biases (-> bias_std * z); >= 2-D parameters are only redrawn (weight_std * z) when
    weight_std is given."""
    for name, p in model.named_parameters():
        d = p.data
        if d.ndim == 1:
            if name.endswith("weight"):
                d[...] = 1.0 + gain_std * rng.standard_normal(d.shape)
            else:
                d[...] = bias_std * rng.standard_normal(d.shape)
        elif weight_std is not None:
            d[...] = weight_std * rng.standard_normal(d.shape)
    return model


@pytest.fixture
def randomize():
    """randomize(module, rng, weight_std=None, bias_std=0.1, gain_std=0.1) -> module (in place)."""
    return _randomize_params
