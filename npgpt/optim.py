"""AdamW with decoupled weight decay, global gradient-norm clipping, warmup + cosine schedule."""
from __future__ import annotations

import math
import weakref

import numpy as np

from . import fast


def _grads(model) -> list:
    """The gradient arrays of the parameters that got one since zero_grad() (p.has_grad); `model` is a
    Module or the list its parameters() gave (a loop that has it saves walking the model again)."""
    params = model if isinstance(model, list) else model.parameters()
    return [p.grad for p in params if p.has_grad]


def grad_norm(model) -> float:
    """The global L2 norm of all gradients (parameters with no gradient since zero_grad() take no part).
    `model`: a Module, or the list of its parameters."""
    return _l2_norm(_grads(model))


def _l2_norm(grads) -> float:
    if fast.use_numba():
        flat = tiled_buffer(grads)
        if flat is not None:
            grads = [flat]              # AdamW's packed gradients: one kernel launch (float64 sums)
    return math.sqrt(sum(sum_of_squares(g) for g in grads))


def sum_of_squares(g) -> float:
    """sum(g ** 2) of one array: the kernel on every core (float64 sums), or NumPy's vdot (g's dtype)."""
    return fast.sum_of_squares(g) if fast.use_numba() else float(np.vdot(g, g))


_last_tiling = ((), None)    # weak references to the arrays of the last tiling found, and to its buffer


def tiled_buffer(arrays):
    """The one flat buffer that `arrays` cover exactly (each a C-contiguous view of it, with no gap and
    no overlap), or None. Its sum of squares is then theirs.
    The answer for the same array objects as last time is remembered (a view's place in its buffer
    never changes): reading every view's address costs about 1 us an array, a step's glue."""
    global _last_tiling
    refs, base_ref = _last_tiling
    if len(refs) == len(arrays) and refs and all(r() is a for r, a in zip(refs, arrays)):
        return base_ref()
    base = _tiling(arrays)
    if base is not None:
        _last_tiling = (tuple(weakref.ref(a) for a in arrays), weakref.ref(base))
    return base


def _tiling(arrays):
    if not arrays:
        return None
    base = arrays[0].base
    if not isinstance(base, np.ndarray) or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    if any(a.base is not base or a.dtype != base.dtype or not a.flags.c_contiguous for a in arrays):
        return None
    start = base.ctypes.data
    end = 0
    for offset, nbytes in sorted((a.ctypes.data - start, a.nbytes) for a in arrays):
        if offset != end:
            return None
        end += nbytes
    return base if end == base.nbytes else None


def clip_coef(norm: float, max_norm: float) -> float:
    """The factor clipping multiplies the gradients by: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + 1e-6))


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before clipping.
    Parameters with no gradient since zero_grad() (p.has_grad False) take no part.
    (A training loop saves the pass that scales them: `norm = grad_norm(model)`, then
    `optimizer.step(grad_scale=clip_coef(norm, max_norm))` applies the factor inside the update.)"""
    grads = _grads(model)
    total = _l2_norm(grads)
    coef = clip_coef(total, max_norm)
    if coef < 1.0:
        for g in grads:
            if fast.use_numba():
                fast.scale_(g, coef)
            else:
                g *= g.dtype.type(coef)
    return total


def lr_schedule(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), one step per call:

        p  <- p - lr * wd * p                (only for >= 2-D parameters: matrices and embeddings)
        m  <- b1 m + (1 - b1) g
        v  <- b2 v + (1 - b2) g^2
        p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    A parameter with no gradient since zero_grad() (p.has_grad False: no backward reached it, or it
    is frozen) is skipped: no decay, no moment update, as PyTorch with zero_grad(set_to_none=True).
    t counts the optimizer's steps (one for all parameters), where PyTorch counts per parameter.
    Only the parameters trainable when the optimizer is built (requires_grad) get moments and updates:
    freeze before building it. Building it also moves those parameters' values and gradients into
    flat buffers (_Packed): arrays taken from p.data or state_dict() before then are no longer the
    parameters, and weights loaded afterwards should be copied in (load_state_dict without assign).
    """

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        self._hyper(model, lr, betas, eps, weight_decay)
        self.packed = _Packed.build(self.named, self.decay)
        if self.packed is not None:
            self.m, self.v = self.packed.m, self.packed.v
        else:
            self.m = {name: np.zeros_like(p.data) for name, p in self.named}
            self.v = {name: np.zeros_like(p.data) for name, p in self.named}
        self.t = 0

    def _hyper(self, model, lr, betas, eps, weight_decay):
        """The settings, the trainable parameters by name (frozen ones get no state) and which decay."""
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.decay = {name: p.data.ndim >= 2 for name, p in self.named}

    def step(self, lr: float | None = None, grad_scale: float = 1.0):
        """One update. grad_scale multiplies every gradient as it is read (g <- grad_scale * g, rounded
        to g's dtype as clip_grad_norm's in-place scaling would): gradient clipping without its own
        pass over the gradients. The gradients themselves are left unchanged."""
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        if self.packed is not None and fast.use_numba() and self.packed.intact():   # all at once, two launches
            pk = self.packed
            for lo, hi, decays in ((0, pk.n_decay, True), (pk.n_decay, pk.P.size, False)):
                if hi > lo:
                    self._update(pk.P[lo:hi], pk.G[lo:hi], pk.M[lo:hi], pk.V[lo:hi], lr, decays, bc1, bc2, grad_scale)
            return
        for name, p in self.named:
            if not p.has_grad:
                continue
            self._update(p.data, p.grad, self.m[name], self.v[name], lr, self.decay[name], bc1, bc2, grad_scale)

    def _update(self, p, g, m, v, lr, decays, bc1, bc2, grad_scale):
        b1, b2 = self.betas
        wd = self.weight_decay if decays else 0.0
        if fast.use_numba():
            fast.adamw_update(p, g, m, v, lr, b1, b2, self.eps, wd, bc1, bc2, grad_scale)
        else:
            g = g if grad_scale == 1.0 else g * g.dtype.type(grad_scale)
            adamw_update_numpy(p, g, m, v, lr, b1, b2, self.eps, wd, bc1, bc2)

    def state_dict(self) -> dict:
        """A snapshot (copies) of the step count and both moments, keyed m/<name>, v/<name>."""
        out = {"t": np.array(self.t)}
        for name, _ in self.named:
            out[f"m/{name}"], out[f"v/{name}"] = self.m[name].copy(), self.v[name].copy()
        return out

    def load_state_dict(self, state: dict):
        """Every key and shape is checked before anything changes."""
        _check_state(state, {name: self.m[name].shape for name, _ in self.named}, "AdamW")
        self.t = int(state["t"])
        for name, _ in self.named:
            self.m[name][...] = state[f"m/{name}"]
            self.v[name][...] = state[f"v/{name}"]


def shard_bounds(n: int, world_size: int, align: int = 16) -> list:
    """[lo, hi) of each of world_size contiguous shards of n elements: equal to within `align` elements,
    each boundary a multiple of align (64 bytes of float32), the last shard ending at n."""
    cuts = [min(n, (n * r // world_size) // align * align) for r in range(world_size)] + [n]
    return [(cuts[r], cuts[r + 1]) for r in range(world_size)]


class ShardedAdamW(AdamW):
    """AdamW of which this process keeps 1/world_size: ZeRO stage 1 (Rajbhandari et al., 2019). The
    trainable parameters are packed into one flat buffer P (as AdamW packs them) and cut into
    world_size contiguous shards (shard_bounds); rank r holds both moments and the gradient summed
    over the ranks for its shard [lo, hi) only, and updates only P[lo:hi]:

        grad   = (sum over ranks of G)[lo:hi]        npgpt.distributed: reduce-scatter, during the backward
        P[lo:hi], m, v <- AdamW(P[lo:hi], grad, m, v)          the same update, element by element
        P      = the ranks' updated shards, joined   npgpt.distributed.MPIDist.allgather_shards

    so each rank's optimizer memory (m, v, the summed gradient) falls from 3 to 3 / world_size copies
    of the parameters, and no two ranks repeat the same update. The >= 2-D parameters come first in P
    (they decay), so a shard has at most two parts: decayed, then not. Every trainable parameter must
    share one dtype and get a gradient every update (a GPT's pretraining does); dist: npgpt.distributed's
    object (rank, world_size; state_dict gathers the moments over it)."""

    def __init__(self, model, dist, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        self._hyper(model, lr, betas, eps, weight_decay)
        self.packed = _Packed.build(self.named, self.decay, moments=False)
        if self.packed is None:
            raise ValueError("ShardedAdamW: the trainable parameters must exist and share one dtype")
        self.dist = dist
        self.bounds = shard_bounds(self.packed.P.size, dist.world_size)
        self.lo, self.hi = self.bounds[dist.rank]
        dtype, n = self.packed.P.dtype, self.hi - self.lo
        self.m, self.v = np.zeros(n, dtype), np.zeros(n, dtype)           # (hi - lo,) each
        # the summed gradients of the shard: filled by npgpt.distributed's reduce-scatter, which sets
        # grad_summed; one process: the gradients are already the sum
        self.grad = np.zeros(n, dtype) if dist.world_size > 1 else self.packed.G
        self.grad_summed = False
        self.t = 0

    def step(self, lr: float | None = None, grad_scale: float = 1.0):
        """One update of this rank's shard from self.grad (the summed gradients of P[lo:hi]). grad_scale
        as in AdamW.step. Over several processes the gradients must have been reduce-scattered since the
        last step (train_step does it: dist.allreduce_grads(model, optimizer)), and the updated shards
        are then all-gathered (dist.allgather_shards(optimizer)); RuntimeError otherwise, as when a
        parameter was rebound or (one process) got no gradient."""
        if self.dist.world_size > 1 and not self.grad_summed:
            raise RuntimeError("ShardedAdamW.step: no reduce-scatter filled its gradients since the last step; "
                               "sum them with dist.allreduce_grads(model, optimizer) (npgpt.train.train_step does)")
        if not self.packed.intact(require_grads=self.dist.world_size == 1):
            raise RuntimeError("ShardedAdamW.step: a parameter's .data or .grad no longer lies in the packed "
                               "buffers, or (one process) a parameter got no gradient; use AdamW")
        self.grad_summed = False
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        lo, hi, cut = self.lo, self.hi, self.packed.n_decay
        for a, b, decays in ((lo, min(hi, cut), True), (max(lo, cut), hi, False)):    # P[lo:hi] = decayed, rest
            if b > a:
                s = slice(a - lo, b - lo)
                self._update(self.packed.P[a:b], self.grad[s], self.m[s], self.v[s], lr, decays, bc1, bc2, grad_scale)

    def grad_sum_of_squares(self) -> float:
        """This rank's part of the squared gradient norm (of its shard of the summed gradients)."""
        return sum_of_squares(self.grad)

    def state_dict(self) -> dict | None:
        """Collective (every rank calls it): the whole optimizer's state, keyed as AdamW.state_dict's, on
        rank 0 (the moments gathered from every shard); None on the other ranks."""
        m, v = (self.dist.gather_shards(x, self.bounds) for x in (self.m, self.v))
        if m is None:
            return None
        out = {"t": np.array(self.t)}
        for name, p in self.named:
            off, n = self.packed.offsets[name]
            out[f"m/{name}"] = m[off:off + n].reshape(p.data.shape)
            out[f"v/{name}"] = v[off:off + n].reshape(p.data.shape)
        return out

    def load_state_dict(self, state: dict):
        """The whole optimizer's state (AdamW.state_dict's keys): each rank keeps its shard's part.
        Every key and shape is checked before anything changes."""
        _check_state(state, {name: p.data.shape for name, p in self.named}, "ShardedAdamW")
        self.t = int(state["t"])
        for name, _ in self.named:
            off, n = self.packed.offsets[name]
            a, b = max(off, self.lo), min(off + n, self.hi)         # the parameter's part in this shard
            if b > a:
                self.m[a - self.lo:b - self.lo] = np.asarray(state[f"m/{name}"]).reshape(-1)[a - off:b - off]
                self.v[a - self.lo:b - self.lo] = np.asarray(state[f"v/{name}"]).reshape(-1)[a - off:b - off]


def _check_state(state: dict, shapes: dict, who: str):
    """ValueError unless `state` has t and m/<name>, v/<name> of each parameter's shape."""
    expected = {"t": ()}
    for name, shape in shapes.items():
        expected[f"m/{name}"] = expected[f"v/{name}"] = shape
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{who}.load_state_dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for k, shape in expected.items():
        if np.shape(state[k]) != shape:
            raise ValueError(f"{who}.load_state_dict: {k} has shape {np.shape(state[k])}, expected {shape}")


class _Packed:
    """The trainable parameters, their gradients and both moments, each kept in one flat buffer (P, G,
    M, V), as llm.c keeps params_memory and grads_memory: a step then updates all of them in two kernel
    launches (the decayed >= 2-D parameters first in every buffer, then the rest) and grad_norm sums
    one array, instead of one launch per parameter (148 for GPT-2), each waking the kernel's threads.
    GPT-2 124M, one process, kernels alone: AdamW 76 -> 63 ms, the squared norm 22 -> 16 ms. Only the
    Numba kernels take that path: NumPy's reference update would make temporaries of the whole buffer.

    Built when the optimizer is: each parameter moves its values and gradient into its slice
    (Parameter.move_to). Anything that later rebinds a parameter's .data or .grad to another array
    (load_state_dict(assign=True), a user's assignment), or a parameter without a gradient this step,
    sends that step down the per-parameter path: same result, one launch per parameter."""

    def __init__(self, named, decay, moments: bool = True):
        order = [i for i, (name, _) in enumerate(named) if decay[name]]
        self.n_decay = sum(named[i][1].data.size for i in order)
        order += [i for i, (name, _) in enumerate(named) if not decay[name]]
        dtype = named[0][1].data.dtype
        total = sum(p.data.size for _, p in named)
        self.P, self.G = (np.zeros(total, dtype) for _ in range(2))
        self.M, self.V = (np.zeros(total if moments else 0, dtype) for _ in range(2))   # ShardedAdamW: its own
        self.m, self.v, self.views, self.offsets = {}, {}, [], {}
        off = 0
        for i in order:
            name, p = named[i]
            shape, n = p.data.shape, p.data.size
            p.move_to(self.P[off:off + n].reshape(shape), self.G[off:off + n].reshape(shape))
            if moments:
                self.m[name], self.v[name] = self.M[off:off + n].reshape(shape), self.V[off:off + n].reshape(shape)
            self.views.append((p, p.data, p._grad))
            self.offsets[name] = (off, n)
            off += n

    @classmethod
    def build(cls, named, decay, moments: bool = True):
        """None when there is nothing to pack or the parameters do not share one dtype."""
        if not named or len({p.data.dtype for _, p in named}) != 1:
            return None
        return cls(named, decay, moments)

    def intact(self, require_grads: bool = True) -> bool:
        """Every parameter still in its slice, and (require_grads) every one with a gradient this step."""
        return all(p.data is d and (p.has_grad or not require_grads) and p._grad is g and d.base is self.P
                   and g.base is self.G for p, d, g in self.views)


def adamw_update_numpy(p, g, m, v, lr, b1, b2, eps, wd, bc1, bc2):
    """In place; every temporary stays in p's dtype."""
    p *= p.dtype.type(1.0 - lr * wd)                  # decoupled weight decay
    m *= b1; m += (1.0 - b1) * g                      # first moment
    v *= b2; v += (1.0 - b2) * (g * g)                # second moment
    denom = np.sqrt(v) / math.sqrt(bc2) + eps         # sqrt(v_hat) + eps
    p -= (lr / bc1) * m / denom
