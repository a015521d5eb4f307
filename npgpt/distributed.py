"""Data-parallel training over MPI (mpi4py), or one process with nothing to do.

    mpiexec -n 2 npgpt train --config small ...       # 2 ranks, each computes half of every batch

`init()` returns the `dist` object `npgpt.train.fit` takes. Launched by mpiexec (detected from the
launcher's environment: PMI_RANK/PMI_SIZE of MPICH's hydra, OMPI_COMM_WORLD_SIZE of Open MPI, ...)
it is an `MPIDist` over MPI.COMM_WORLD; otherwise a `LocalDist` of rank 0 of 1, and mpi4py is never
imported: one process needs no MPI installed. When the launcher says it started N > 1 processes but
MPI sees a world of 1 (mpi4py built for another MPI than the launcher's: each process would run the
whole job alone), init() raises LaunchMismatch, naming both MPIs and the fix.

Gradients are summed by `allreduce_grads(model)`, in place, with one MPI Allreduce per bucket of
at most BUCKET_BYTES (32 MB) of a flat, contiguous buffer. When the gradients already tile one
buffer (AdamW keeps them so: npgpt.optim._Packed) and every rank agrees on that layout, that buffer
is reduced where it is; otherwise every gradient is copied into a flat buffer per dtype (allocated
once), reduced, and copied back. Each rank's loss was divided by the global batch's target count, so
the sum is the gradient one process computes on the whole batch. (The two paths cut buckets at
different places; with more than 2 ranks MPI may then add in another order, which can change the
last bits of a sum, never more.)

During the backward. `npgpt.train.train_step` runs the last backward of each update inside
`reduce_during_backward(model)`: as GPT.backward_hidden finishes ln_f and then each block (its
grads_ready_hook), that module's slice of AdamW's packed gradient buffer starts its sum over the
ranks (Iallreduce, in place) while the blocks below are still in backward, and allreduce_grads
then starts what is left (wte, wpe), and waits for everything before the gradient norm and
clipping: PyTorch DDP's bucket hooks. Earlier micro-batches of a gradient accumulation start
nothing. Where the layout does not allow it (a frozen parameter, LoRA, a classifier, no packed
buffer, ranks whose layouts differ) every rank falls back, alike, to the path below
(_OverlappedReduce says how they agree). OVERLAP = False turns it off.

Parameters with no gradient this step (`has_grad` False on a rank): the ranks first compare, with
one MAX reduce of two integers per parameter (its code and minus it: no gradient, or where it lies
in the buffer), which parameters received a gradient where. If that differs between ranks, the
copying path is taken: the parameters with a gradient anywhere are reduced on every rank (a rank
without one contributes zeros); the others stay without a gradient on every rank, so AdamW and
clipping skip the same set everywhere.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time

import numpy as np

from .fast.settings import set_threads

BUCKET_BYTES = 32 * 2**20
PROGRESS_SECONDS = 0.005     # how often the progress thread tests unfinished buckets (2 ms hides no more on
                             # 2 cores; testing every 1 ms even when idle made the step 5% slower there)
OVERLAP = True               # False: sum every gradient after the backward (set alike on every rank)

# Set by the launchers: MPICH/Intel hydra (PMI_*, MPI_LOCALNRANKS), Open MPI (OMPI_*), PMIx (PMIX_RANK).
MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MPI_LOCALNRANKS", "PMIX_RANK")

# The launchers' own word on how many processes they started (MPI_LOCALNRANKS: on this machine), and
# which launcher sets each; and this process's rank among them.
LAUNCHER_SIZE_ENV = {"PMI_SIZE": "a PMI launcher (MPICH's or Intel MPI's mpiexec, or srun)",
                     "OMPI_COMM_WORLD_SIZE": "Open MPI's mpirun",
                     "PMIX_SIZE": "a PMIx launcher (Open MPI's mpirun, or srun --mpi=pmix)",
                     "MPI_LOCALNRANKS": "MPICH's or Intel MPI's mpiexec (Hydra)"}
LAUNCHER_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launched_by_mpi(environ=None) -> bool:
    """True when this process was started by mpiexec/mpirun (judged from the environment only)."""
    env = os.environ if environ is None else environ
    return any(k in env for k in MPI_ENV)


class LaunchMismatch(RuntimeError):
    """The launcher started several processes but MPI sees each alone. .rank: this process's rank by
    the launcher (None if it does not say), so that one of them reports it."""

    def __init__(self, message: str, rank: int | None):
        super().__init__(message)
        self.rank = rank


def _env_int(env, name):
    v = env.get(name, "").strip()
    return int(v) if v.isdigit() else None


def mpi_library(MPI) -> str:
    """The MPI library mpi4py loaded, in a few words: 'MPICH 4.2.0', 'Open MPI v4.1.2', ..."""
    first = MPI.Get_library_version().strip().split("\n")[0].split(",")[0]
    return " ".join(first.replace("Version:", " ").split())


def check_launch(world_size: int, mpi_library: str, environ=None) -> None:
    """LaunchMismatch when the launcher's environment says N > 1 processes and MPI a world of 1.
    mpi_library: the MPI mpi4py loaded (see mpi_library)."""
    env = os.environ if environ is None else environ
    if world_size != 1:
        return
    stated = [(_env_int(env, k), k) for k in LAUNCHER_SIZE_ENV if _env_int(env, k) is not None]
    n, var = max(stated, default=(1, None))
    if n <= 1:
        return
    rank = next((_env_int(env, k) for k in LAUNCHER_RANK_ENV if _env_int(env, k) is not None), None)
    raise LaunchMismatch(
        f"the launcher started {n} processes ({var}={n}: {LAUNCHER_SIZE_ENV[var]}) but mpi4py's MPI "
        f"({mpi_library}) sees a world of 1, so each would run the whole job alone: launch with {mpi_library}'s "
        f"mpiexec, or point mpi4py at the launcher's MPI with MPI4PY_LIBMPI=/path/to/its/libmpi.so",
        rank)


class LocalDist:
    """One process: rank 0 of 1, nothing to reduce or broadcast."""
    rank, world_size, local_size, is_main = 0, 1, 1, True

    def allreduce_grads(self, model, optimizer=None):
        pass

    def reduce_during_backward(self, model, optimizer=None):
        return contextlib.nullcontext()

    def allgather_shards(self, optimizer):
        pass

    def gather_shards(self, x, bounds):
        return x.copy()

    def allreduce_sum(self, x: float) -> float:
        return x

    def broadcast_parameters(self, model):
        pass

    def bcast(self, obj):
        return obj

    def gather(self, obj):
        return [obj]

    def barrier(self):
        pass

    def abort(self, code: int = 1):
        raise SystemExit(code)


class MPIDist:
    """MPI.COMM_WORLD: rank, world_size, gradient all-reduce, weight broadcast."""

    def __init__(self, comm=None):
        import warnings
        with warnings.catch_warnings():       # a launcher of another MPI: init() says so in one line
            warnings.filterwarnings("ignore", "suspicious MPI execution environment", RuntimeWarning)
            from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.is_main = self.rank == 0
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)    # the ranks on this machine
        self.local_size = node.Get_size()
        node.Free()
        self._plans = {}
        self._overlap = None               # the _OverlappedReduce of the backward in progress
        self.bytes_per_step = 0            # bytes this rank's last allreduce_grads handed to MPI
        self.allreduce_seconds = 0.0       # time the last allreduce_grads spent in MPI (incl. waiting):
                                           # the communication left exposed after the backward
        self.overlapped_buckets = 0        # buckets of the last update started during its backward
        self.overlapped_bytes = 0          # and their bytes

    # ------------------------------------------------------------------ gradients
    def _plan(self, params):
        """Flat buffers (one per dtype) and each parameter's slice of its buffer, made once per model."""
        key = tuple(id(p) for p in params)
        plan = self._plans.get(key)
        if plan is None:
            sizes, buffers, where = {}, {}, []
            for p in params:
                dt = p.data.dtype
                off = sizes.get(dt, 0)
                where.append((dt, off, p.data.size))
                sizes[dt] = off + p.data.size
            for dt, n in sizes.items():
                buffers[dt] = np.zeros(n, dtype=dt)    # slots of never-reached parameters stay 0
            plan = self._plans[key] = (buffers, where)
        return plan

    @contextlib.contextmanager
    def reduce_during_backward(self, model, optimizer=None):
        """Around the last backward of an update (every rank enters it, for the same update): as the
        backward finishes each block's gradients (model.grads_ready_hook), their slice of AdamW's
        packed gradient buffer starts its sum over the ranks (Iallreduce, in place; for a
        ShardedAdamW, Ireduce_scatter into each rank's shard) while the blocks below are still in
        backward; allreduce_grads then reduces the rest and waits for them all.
        See _OverlappedReduce for when it falls back to reducing everything after the backward."""
        if not OVERLAP:
            yield
            return
        overlap = self._overlap = _OverlappedReduce(self, model, _sharded(optimizer))
        hooked = hasattr(model, "grads_ready_hook")
        if hooked:
            model.grads_ready_hook = overlap.ready
        try:
            yield
        except BaseException:
            overlap.stop_progress()
            self._overlap = None
            raise
        finally:
            if hooked:
                del model.grads_ready_hook          # back to the class's None

    def allreduce_grads(self, model, optimizer=None):
        """Sum every rank's gradients: in place in each parameter's .grad, or, for a ShardedAdamW, into
        optimizer.grad, the sum of this rank's shard alone (reduce-scatter). Waits for the sums
        reduce_during_backward started."""
        from .optim import tiled_buffer
        params = list(model.parameters())
        overlap, self._overlap = self._overlap, None
        self.overlapped_buckets = self.overlapped_bytes = 0
        shard = _sharded(optimizer)
        if overlap is not None and overlap.shard is not shard:
            if overlap.agreed():
                overlap.finish()                         # its buckets are in flight on every rank: end them
            raise RuntimeError("allreduce_grads: reduce_during_backward and allreduce_grads were given different "
                               "optimizers; pass the same (a ShardedAdamW to both, or to neither)")
        if shard is not None:                            # a reduce-scatter: only the overlap's buckets do it
            if self.world_size == 1:                     # the gradients are the sum already (shard.grad is G)
                shard.grad_summed = True
                return
            if overlap is None:                          # OVERLAP off: every bucket starts now
                overlap = _OverlappedReduce(self, model, shard)
            if not overlap.agreed():
                raise RuntimeError("ShardedAdamW: the ranks' packed gradients differ (a parameter's .data or "
                                   ".grad rebound, or another model on some rank); they cannot be reduce-scattered")
        if overlap is not None and overlap.agreed():     # alike on every rank
            t0 = time.perf_counter()
            self.bytes_per_step = overlap.finish()
            self._agree_on_missing(params, sharded=shard is not None)
            if shard is not None:
                shard.grad_summed = True
            self.overlapped_buckets, self.overlapped_bytes = overlap.buckets_in_backward, overlap.bytes_in_backward
            self.allreduce_seconds = time.perf_counter() - t0
            return
        if not params:
            return
        t0 = time.perf_counter()
        # Each parameter's code: -2 no gradient on this rank, -1 a gradient outside one tiled buffer,
        # else its offset in the buffer the gradients tile. One MAX reduce of (code, -code) gives every
        # rank the codes' maximum and minimum over the ranks, and the path is chosen from those alone,
        # so every rank takes the same one.
        flat = tiled_buffer([p.grad for p in params if p.has_grad])
        code = np.full(len(params), -2, dtype=np.int64)
        for i, p in enumerate(params):
            if p.has_grad:
                code[i] = -1 if flat is None else (p.grad.ctypes.data - flat.ctypes.data) // flat.itemsize
        both = np.concatenate([code, -code])
        self.comm.Allreduce(self.MPI.IN_PLACE, both, op=self.MPI.MAX)
        hi, lo = both[:len(params)], -both[len(params):]
        if np.array_equal(lo, hi) and hi.max() >= 0 and not (hi == -1).any():
            # every rank has the same gradients at the same offsets of a tiled buffer (flat, here too)
            self.bytes_per_step = self._allreduce_flat(flat)
        else:
            self.bytes_per_step = self._allreduce_copied(params, hi > -2)    # hi > -2: a gradient on some rank
        self.allreduce_seconds = time.perf_counter() - t0

    def _agree_on_missing(self, params, sharded=False):
        """After an overlapped reduce: a parameter with no gradient on this rank sent zeros (its slot was
        cleared first); it gets the sum as its gradient when another rank had one, and stays without
        one when no rank had (as the copying path leaves it). One MAX reduce of a flag a parameter.
        Sharded (ShardedAdamW updates every parameter of its shard): a trainable parameter that got no
        gradient on any rank is an error, alike on every rank."""
        flags = np.array([p.has_grad for p in params], dtype=np.int8)
        self.comm.Allreduce(self.MPI.IN_PLACE, flags, op=self.MPI.MAX)
        if sharded:
            missing = [i for i, (p, f) in enumerate(zip(params, flags)) if p.requires_grad and not f]
            if missing:
                raise RuntimeError(f"ShardedAdamW: {len(missing)} trainable parameter(s) got no gradient on any "
                                   f"rank this update; a sharded update needs one for every parameter (use "
                                   f"AdamW: leave out --shard-optimizer)")
        for p, f in zip(params, flags):
            if f and not p.has_grad:
                p.grad = p._grad                # the slot holds the sum: mark it as this rank's gradient

    def _allreduce_flat(self, buf) -> int:
        """Sum buf over the ranks in place, bucket by bucket; returns the bytes handed to MPI."""
        step = max(1, BUCKET_BYTES // buf.itemsize)
        for lo in range(0, buf.size, step):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf[lo:lo + step], op=self.MPI.SUM)
        return buf.nbytes

    def _allreduce_copied(self, params, flags) -> int:
        """Copy the flagged parameters' gradients into the flat buffers (zeros for a rank without one),
        sum those over the ranks, and copy the sums back."""
        buffers, where = self._plan(params)
        for p, (dt, off, n), f in zip(params, where, flags):
            if f:
                dst = buffers[dt][off:off + n]
                if p.has_grad:
                    np.copyto(dst, p.grad.reshape(-1))
                else:
                    dst.fill(0)
        sent = sum(self._allreduce_flat(buf) for buf in buffers.values())
        for p, (dt, off, n), f in zip(params, where, flags):
            if f:
                p.grad.reshape(-1)[...] = buffers[dt][off:off + n]   # .grad of a gradless one: zeros first
        return sent

    def allreduce_sum(self, x: float) -> float:
        return float(self.comm.allreduce(float(x), op=self.MPI.SUM))

    # ------------------------------------------------------------------ ZeRO-1 (ShardedAdamW)
    def allgather_shards(self, optimizer):
        """After a ShardedAdamW update: every rank's updated shard of the packed parameters into every
        rank's P (in place, one Allgatherv a chunk of at most BUCKET_BYTES a rank). Time taken (all
        of it exposed): self.allgather_seconds."""
        if self.world_size == 1:
            return
        t0 = time.perf_counter()
        P, bounds = optimizer.packed.P, optimizer.bounds
        step = max(1, BUCKET_BYTES // P.itemsize)
        longest = max(hi - lo for lo, hi in bounds)
        for k in range(0, longest, step):                  # chunk k of every shard, together
            parts = [(min(lo + k, hi), min(lo + k + step, hi)) for lo, hi in bounds]
            counts, displs = [b - a for a, b in parts], [a for a, _ in parts]
            self.comm.Allgatherv(self.MPI.IN_PLACE, [P, (counts, displs)])
        self.allgather_seconds = time.perf_counter() - t0

    def gather_shards(self, x, bounds):
        """Each rank's x (its shard [lo, hi) of bounds) joined into one array on rank 0; None elsewhere."""
        counts, displs = [hi - lo for lo, hi in bounds], [lo for lo, _ in bounds]
        whole = np.empty(bounds[-1][1], dtype=x.dtype) if self.is_main else None
        self.comm.Gatherv(x, [whole, (counts, displs)] if self.is_main else None, root=0)
        return whole

    # ------------------------------------------------------------------ weights and objects
    def broadcast_parameters(self, model):
        """Rank 0's weights into every rank's parameters (after init, after loading)."""
        for p in model.parameters():
            self.comm.Bcast(p.data, root=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def gather(self, obj):
        """Every rank's obj as a list on rank 0 (None elsewhere)."""
        return self.comm.gather(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code: int = 1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


class _OverlappedReduce:
    """One update's gradient sum, started during its backward (MPIDist.reduce_during_backward).

    Made as the last micro-batch's backward begins: every rank describes its layout (1 when the model
    calls grads_ready_hook, every parameter is trainable and the gradients tile one flat buffer, as
    AdamW packs them; the parameter count; a digest of each one's offset and size) and starts one
    MAX reduce of it, so that every rank decides alike, from the reduced result alone, whether to
    overlap. Otherwise (a frozen parameter, LoRA, a classifier whose model calls no hook, no packed
    buffer, ranks disagreeing) nothing starts early and allreduce_grads takes its usual path.

    When they agree, each module the backward reports (ready) has its parameters' slices summed in
    place: adjacent slices merged into contiguous runs of the buffer, each run cut into buckets of at
    most BUCKET_BYTES, one Iallreduce a bucket. AdamW packs the >= 2-D parameters first, then the
    rest, each part in model order, so a block gives two runs (its matrices; its biases and layernorm
    weights). finish() starts what is left (wte and wpe, final only when backward returns) and waits
    for everything. Every rank must run the same backward (the same modules reported, in the same
    order), as with PyTorch's DDP: the ranks' buckets pair up by the order they start in.

    With a ShardedAdamW (shard) each bucket is reduce-scattered instead (Ireduce_scatter): rank r
    receives the sum of the bucket's part inside its shard [lo_r, hi_r), into shard.grad, and the
    layout is the optimizer's packed buffer (parameters it does not hold, frozen ones, are skipped).

    MPICH moves a non-blocking collective only while some MPI call runs in the process, so a thread
    (_Progress) tests the buckets in flight every PROGRESS_SECONDS while the backward computes; when MPI
    was not initialised for threads, each report tests them instead."""

    def __init__(self, dist, model, shard=None):
        self.dist, self.MPI, self.shard = dist, dist.MPI, shard
        self.params = model.parameters()
        self.flat, self.where = self._layout(model, self.params) if shard is None else self._shard_layout(shard)
        digest = 0
        if self.flat is not None:
            spans = np.array([self.where[id(p)] for p in self.params if id(p) in self.where], dtype=np.int64)
            h = hashlib.blake2b(spans.tobytes() + self.flat.dtype.str.encode(), digest_size=7).digest()
            digest = int.from_bytes(h, "little")
        mine = np.array([self.flat is not None, len(self.params), digest, shard is not None], dtype=np.int64)
        self._layouts = np.concatenate([mine, -mine])            # MAX of (x, -x): each entry's max and min
        self._request = dist.comm.Iallreduce(self.MPI.IN_PLACE, self._layouts, op=self.MPI.MAX)
        self._agreed = None
        self.started = set()                  # id of every parameter whose slice is on its way
        self.requests, self.sent = [], 0
        self.buckets_in_backward = self.bytes_in_backward = 0
        self.progress = None

    @staticmethod
    def _layout(model, params):
        """(the flat buffer the gradients tile, {id(p): (offset, size)}), or (None, None)."""
        from .optim import tiled_buffer
        if not hasattr(model, "grads_ready_hook") or not params or \
                any(not p.requires_grad or p._grad is None for p in params):
            return None, None
        flat = tiled_buffer([p._grad for p in params])
        if flat is None:
            return None, None
        base = flat.ctypes.data
        return flat, {id(p): ((p._grad.ctypes.data - base) // flat.itemsize, p._grad.size) for p in params}

    @staticmethod
    def _shard_layout(shard):
        """A ShardedAdamW's packed gradients and each parameter's place in them, or (None, None) where a
        parameter's .data or .grad no longer lies in the packed buffers."""
        pk = shard.packed
        if any(p.data is not d or p._grad is not g for p, d, g in pk.views):
            return None, None
        base = pk.G.ctypes.data
        return pk.G, {id(p): ((g.ctypes.data - base) // pk.G.itemsize, g.size) for p, _, g in pk.views}

    def agreed(self) -> bool:
        """Whether every rank can overlap, with the same layout (waits for the layouts' reduce once)."""
        if self._agreed is None:
            self._request.Wait()
            n = len(self._layouts) // 2
            hi, lo = self._layouts[:n], -self._layouts[n:]
            self._agreed = bool(np.array_equal(hi, lo) and hi[0] == 1)
            if self._agreed and self.MPI.Query_thread() == self.MPI.THREAD_MULTIPLE:
                self.progress = _Progress(self.MPI)
        return self._agreed

    def ready(self, module):
        """grads_ready_hook: `module`'s parameters have their final gradients; start summing them."""
        if not self.agreed():
            return
        self._start([p for p in module.parameters() if id(p) in self.where and id(p) not in self.started])
        self.buckets_in_backward = len(self.requests)
        self.bytes_in_backward = self.sent
        if self.progress is None:
            self.MPI.Request.Testall(self.requests)      # no progress thread: move them along now

    def _start(self, params):
        runs = []                                        # [offset, end) of each contiguous run
        for p in sorted(params, key=lambda p: self.where[id(p)][0]):
            self.started.add(id(p))
            if not p.has_grad:
                p._grad.fill(0)                          # no gradient here: this rank adds zeros
            off, n = self.where[id(p)]
            if runs and runs[-1][1] == off:
                runs[-1][1] = off + n
            else:
                runs.append([off, off + n])
        step = max(1, BUCKET_BYTES // self.flat.itemsize)
        for lo, hi in runs:
            for a in range(lo, hi, step):
                bucket = self.flat[a:min(a + step, hi)]
                if self.shard is None:
                    request = self.dist.comm.Iallreduce(self.MPI.IN_PLACE, bucket, op=self.MPI.SUM)
                else:
                    request = self._reduce_scatter(a, a + bucket.size)
                self.requests.append(request)
                if self.progress is not None:
                    self.progress.add(request)
                self.sent += bucket.nbytes

    def _reduce_scatter(self, a, b):
        """Start summing flat[a:b] over the ranks, each rank receiving the part inside its shard:
        shard.grad[x - lo:y - lo] = sum over ranks of flat[x:y], [x, y) = [a, b) within [lo, hi)."""
        counts = [max(0, min(b, hi) - max(a, lo)) for lo, hi in self.shard.bounds]
        lo, hi = self.shard.lo, self.shard.hi
        x = min(max(a, lo), hi)
        mine = self.shard.grad[x - lo:x - lo + counts[self.dist.rank]]
        return self.dist.comm.Ireduce_scatter(self.flat[a:b], mine, counts, op=self.MPI.SUM)

    def finish(self) -> int:
        """Start the parameters no report covered, wait for every bucket; returns the bytes handed to MPI."""
        self._start([p for p in self.params if id(p) in self.where and id(p) not in self.started])
        self.stop_progress()
        self.MPI.Request.Waitall(self.requests)
        return self.sent

    def stop_progress(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class _Progress:
    """A thread that tests the requests it is given, every PROGRESS_SECONDS while any is unfinished,
    until stop(): MPICH progresses a non-blocking collective only inside MPI calls (a bucket takes
    about 5 tests, its copying done inside one of them), and the main thread makes none while it
    computes. It sleeps while nothing is in flight: each wake-up costs the main thread a GIL hand-off
    and, on a machine with no idle core, a context switch. mpi4py releases the GIL inside MPI calls;
    the main thread never touches these requests before stop()."""

    def __init__(self, MPI):
        self.MPI = MPI
        self._requests, self._lock, self._work, self._stopped = [], threading.Lock(), threading.Event(), False
        self._thread = threading.Thread(target=self._run, name="npgpt-mpi-progress", daemon=True)
        self._thread.start()

    def add(self, request):
        with self._lock:
            self._requests.append(request)
            self._work.set()

    def _run(self):
        while True:
            self._work.wait()
            if self._stopped:
                return
            time.sleep(PROGRESS_SECONDS)
            with self._lock:
                pending = list(self._requests)
            if self.MPI.Request.Testall(pending):
                with self._lock:
                    # none added meanwhile: sleep until one is. Not once stop() has set the event: cleared,
                    # the thread would wait forever and stop() with it (a hang seen on 2 ranks).
                    if len(self._requests) == len(pending) and not self._stopped:
                        self._requests.clear()
                        self._work.clear()

    def stop(self):
        with self._lock:                              # never between the thread's check and its clear()
            self._stopped = True
            self._work.set()
        self._thread.join()


def _sharded(optimizer):
    """optimizer when it is a ShardedAdamW (ZeRO-1: each rank receives its shard of the sum), else None."""
    from .optim import ShardedAdamW
    return optimizer if isinstance(optimizer, ShardedAdamW) else None


_DIST = None


def init(threads: int | None = None):
    """The process's dist object (made once): MPIDist under mpiexec, LocalDist otherwise. Under MPI it
    also sets this rank's BLAS and Numba threads (see set_threads); LaunchMismatch (check_launch) when
    the launcher and mpi4py use different MPIs."""
    global _DIST
    if _DIST is None:
        if launched_by_mpi():
            dist = MPIDist()
            check_launch(dist.world_size, mpi_library(dist.MPI))
            _DIST = dist
            set_threads(threads, _DIST.local_size)
        else:
            _DIST = LocalDist()
            if threads:
                set_threads(threads, 1)
    elif threads:
        set_threads(threads, _DIST.local_size)
    return _DIST


def rank() -> int:
    return init().rank


def world_size() -> int:
    return init().world_size


def is_main() -> bool:
    return init().is_main


def allreduce_grads(model) -> None:
    init().allreduce_grads(model)


def allreduce_sum(x: float) -> float:
    return init().allreduce_sum(x)


def broadcast_parameters(model) -> None:
    init().broadcast_parameters(model)
