"""Process-wide settings that make long NumPy jobs faster: every one npgpt makes, in one place.

    apply(inference=False)     what the `npgpt` command and `npgpt bench` call first, before NumPy loads:
                               blas_threads_spin_briefly(), keep_freed_memory(), and for the
                               inference commands spin_between_kernels()
    quiet_kernel_threads()     OMP_WAIT_POLICY=PASSIVE, which npgpt/fast/_jit.py asks for before Numba
                               loads libgomp (the kernels' OpenMP threads sleep between kernels,
                               leaving the cores to OpenBLAS; otherwise the two pools fight over the
                               cores and a 2-core train step runs ~4x slower)
    set_threads(n, local_ranks) BLAS and Numba threads of this process (npgpt.distributed.init calls it
                               for an MPI rank, or for --threads)
    packed_rows()              NPGPT_PACKED_ROWS, or by the CPU's vendor: how decoding's packed products
                               of one row stream their weight rows (npgpt/fast/quant.py, side_by_side)
    parallel_min_work()        NPGPT_PARALLEL_MIN_WORK, or 2^18: the elements from which a kernel runs its
                               parallel build (npgpt/fast/_jit.py reads it once, when the kernels load)

Library users call apply() themselves, first thing, if they want the same.

blas_threads_spin_briefly(): OpenBLAS's idle threads spin for ~2^28 cycles after every GEMM, on the
cores the Numba kernels between GEMMs need. A short spin (OPENBLAS_THREAD_TIMEOUT=4: 2^4 cycles)
measured ~7% faster train steps and 2x faster softmax/cross-entropy kernels on 2 cores. Decoding
is the opposite case: float32 weights as loaded (in, out) go through 48 BLAS matrix-vector products a
token with little between them (the inference commands now lay them out as rows for Numba's kernels:
npgpt.inference.quant.decode_layout; BLAS stays for prompts), and threads that sleep after each cost
their wake-up every time; the inference commands let them spin 2^20 cycles (~0.3 ms): fp32 decode
41.5 -> 45.5 tokens/s (with the weights as loaded, before decode_layout), prefill the same or faster,
int8/bf16 (no BLAS) unchanged (docs/performance.md). OpenBLAS reads it when NumPy first loads it,
so it only takes effect before NumPy is imported.

keep_freed_memory(): glibc hands every large array (the (B, T, V) logits, attention scores,
activations) its own fresh mmap and returns it to the kernel on free, so every training
step page-faults and zeroes gigabytes anew (with transparent huge pages, compaction stalls
too): measured 7.05 -> 6.26 s for a GPT-2 124M train step at B=8, T=256, same peak RSS.
With mmap off and trimming off, freed blocks stay in the heap and the next step reuses them.
The cost: the process keeps its peak heap until it exits, which is what a training or
generation run does anyway. Library users can call it themselves.

spin_between_kernels(): the Numba kernels' OpenMP threads sleep as soon as a parallel loop ends
(OMP_WAIT_POLICY=PASSIVE, set in npgpt/fast/_jit.py, so that they leave the cores to OpenBLAS
during training). Waking them costs ~80 us a launch on 2 cores, and decoding launches ~60 small
parallel kernels per token, one after the other: 4-5 ms of a 14 ms int8 token. Spinning ~10k
rounds (~0.1-0.3 ms) before sleeping makes the next launch ~5 us. Training is better off without
it (its kernels sit between GEMMs that need both cores), so only the inference commands
(generate, chat, classify) turn it on. libgomp reads it once, at the first parallel launch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

INFERENCE_SPIN_COUNT = "10000"     # GOMP_SPINCOUNT for inference: covers the gaps between decoding's kernels
INFERENCE_BLAS_TIMEOUT = "20"      # OPENBLAS_THREAD_TIMEOUT for inference: 2^20 cycles (~0.3 ms) of spin

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def apply(inference: bool = False) -> None:
    """Every setting of the module docstring that a process makes for itself, at its start."""
    blas_threads_spin_briefly(INFERENCE_BLAS_TIMEOUT if inference else "4")
    quiet_kernel_threads()
    keep_freed_memory()
    if inference:
        spin_between_kernels()


def blas_threads_spin_briefly(timeout: str = "4") -> bool:
    """OPENBLAS_THREAD_TIMEOUT=timeout (2^timeout cycles; 4 for training, INFERENCE_BLAS_TIMEOUT for the
    inference commands) unless set (the user's value wins); False if NumPy was loaded already."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", timeout)
    return "numpy" not in sys.modules


def keep_freed_memory() -> bool:
    """Linux/glibc only; returns True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)


def spin_between_kernels() -> bool:
    """Let the kernels' idle threads spin briefly before sleeping (see the module docstring). Takes
    effect only before the first parallel kernel runs; returns False if GOMP_SPINCOUNT was already
    set (the user's value wins)."""
    if "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = INFERENCE_SPIN_COUNT
    return True


def quiet_kernel_threads() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: idle OpenMP threads sleep instead of spinning on the cores the
    next GEMM needs. libgomp reads it when Numba first loads it (the first parallel launch)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def packed_rows() -> int:
    """How many packed weight rows a one-row product (decoding's int8/bf16 weights) streams side by side:
    NPGPT_PACKED_ROWS (1 or 4) if set, else 1 on AMD CPUs and 4 on the others, the faster way on each as
    measured (npgpt/fast/quant.py, side_by_side). A bad value is a ValueError naming the variable."""
    value = os.environ.get("NPGPT_PACKED_ROWS", "").strip()
    if value not in ("", "1", "4"):
        raise ValueError(f"the environment variable NPGPT_PACKED_ROWS must be 1 or 4, got {value!r}")
    return int(value) if value else (1 if cpu_vendor() == "AuthenticAMD" else 4)


DEFAULT_PARALLEL_MIN_WORK = 1 << 18     # the crossover measured on 2 cores (why: npgpt/fast/_jit.py)


def parallel_min_work() -> int:
    """From how many elements a Numba kernel runs its parallel build rather than its serial one:
    NPGPT_PARALLEL_MIN_WORK (a whole number; 0: always parallel) if set, else DEFAULT_PARALLEL_MIN_WORK.
    On many cores the crossover may lie lower (the work is cut in more pieces) or higher (more threads to
    wake): examples/many_cores.sh compares. A bad value is a ValueError naming the variable."""
    value = os.environ.get("NPGPT_PARALLEL_MIN_WORK", "").strip()
    if value and not value.isdigit():
        raise ValueError(f"the environment variable NPGPT_PARALLEL_MIN_WORK must be a whole number of elements "
                         f"(0: always parallel), got {value!r}")
    return int(value) if value else DEFAULT_PARALLEL_MIN_WORK


def prefetch_rows(row_bytes: int) -> int:
    """How many weight rows ahead of the one it reads a decoding product asks the CPU to start loading
    (a software prefetch; 0: none, the hardware prefetchers alone), for weight rows of row_bytes bytes:
    NPGPT_PREFETCH_ROWS (0 to 64) if set; else 8 on Intel and other CPUs, and on AMD CPUs 4 for rows of up
    to 1 KB and 0 for longer ones: the faster way on each as measured (an Intel Sapphire Rapids read int8
    weights at 19-20 GB/s with it against 11 without; on an AMD Zen 4 it cost bf16 rows and int8 rows of
    3 KB a quarter to a third of their rate, and gained int8 rows of 768 bytes 8-16%: docs/performance.md).
    A bad value is a ValueError naming the variable."""
    value = os.environ.get("NPGPT_PREFETCH_ROWS", "").strip()
    if value and not (value.isdigit() and int(value) <= 64):
        raise ValueError(f"the environment variable NPGPT_PREFETCH_ROWS must be a whole number from 0 to 64, got {value!r}")
    if value:
        return int(value)
    if cpu_vendor() != "AuthenticAMD":
        return 8
    return 4 if row_bytes <= 1024 else 0


def cpu_vendor() -> str:
    """The CPU's vendor id on Linux ("GenuineIntel", "AuthenticAMD", ...), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(threads: int | None = None, local_ranks: int = 1) -> int | None:
    """BLAS (threadpoolctl) and Numba threads: `threads` if given, else max(1, cores // local_ranks),
    unless the user set OMP_NUM_THREADS / NUMBA_NUM_THREADS (then those stand). Returns what was set."""
    quiet_kernel_threads()                  # before numba.set_num_threads loads libgomp
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS") or os.environ.get("NUMBA_NUM_THREADS"):
            return None
        threads = max(1, cores() // max(1, local_ranks))
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # BLAS libraries loaded later (SciPy's, via Numba)
        os.environ[var] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=threads)
    except ImportError:
        pass
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return threads
