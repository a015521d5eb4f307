"""AdamW with decoupled weight decay, global gradient-norm clipping, warmup + cosine schedule."""
from __future__ import annotations

import math

import numpy as np

from . import kernels


def _grads(model) -> list:
    """The gradient arrays of the parameters that got one since zero_grad() (p.has_grad)."""
    return [p.grad for p in model.parameters() if p.has_grad]


def grad_norm(model) -> float:
    """The global L2 norm of all gradients (parameters with no gradient since zero_grad() take no part)."""
    return _l2_norm(_grads(model))


def _l2_norm(grads) -> float:
    if kernels.use_numba():
        return math.sqrt(sum(kernels.sum_of_squares(g) for g in grads))
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads))


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
            if kernels.use_numba():
                kernels.scale_(g, coef)
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
    freeze before building it.
    """

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]   # frozen: no state
        self.decay = {name: p.data.ndim >= 2 for name, p in self.named}
        self.m = {name: np.zeros_like(p.data) for name, p in self.named}
        self.v = {name: np.zeros_like(p.data) for name, p in self.named}
        self.t = 0

    def step(self, lr: float | None = None, grad_scale: float = 1.0):
        """One update. grad_scale multiplies every gradient as it is read (g <- grad_scale * g, rounded
        to g's dtype as clip_grad_norm's in-place scaling would): gradient clipping without its own
        pass over the gradients. The gradients themselves are left unchanged."""
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for name, p in self.named:
            if not p.has_grad:
                continue
            wd = self.weight_decay if self.decay[name] else 0.0
            if kernels.use_numba():
                kernels.adamw_update(p.data, p.grad, self.m[name], self.v[name], lr, b1, b2, self.eps, wd, bc1, bc2,
                                     grad_scale)
            else:
                g = p.grad if grad_scale == 1.0 else p.grad * p.grad.dtype.type(grad_scale)
                adamw_update_numpy(p.data, g, self.m[name], self.v[name], lr, b1, b2, self.eps, wd, bc1, bc2)

    def state_dict(self) -> dict:
        """A snapshot (copies) of the step count and both moments, keyed m/<name>, v/<name>."""
        out = {"t": np.array(self.t)}
        for name, _ in self.named:
            out[f"m/{name}"], out[f"v/{name}"] = self.m[name].copy(), self.v[name].copy()
        return out

    def load_state_dict(self, state: dict):
        """Every key and shape is checked before anything changes."""
        expected = {"t": ()}
        for name, _ in self.named:
            expected[f"m/{name}"] = expected[f"v/{name}"] = self.m[name].shape
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(f"AdamW.load_state_dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for k, shape in expected.items():
            if np.shape(state[k]) != shape:
                raise ValueError(f"AdamW.load_state_dict: {k} has shape {np.shape(state[k])}, expected {shape}")
        self.t = int(state["t"])
        for name, _ in self.named:
            self.m[name][...] = state[f"m/{name}"]
            self.v[name][...] = state[f"v/{name}"]


def adamw_update_numpy(p, g, m, v, lr, b1, b2, eps, wd, bc1, bc2):
    """In place; every temporary stays in p's dtype."""
    p *= p.dtype.type(1.0 - lr * wd)                  # decoupled weight decay
    m *= b1; m += (1.0 - b1) * g                      # first moment
    v *= b2; v += (1.0 - b2) * (g * g)                # second moment
    denom = np.sqrt(v) / math.sqrt(bc2) + eps         # sqrt(v_hat) + eps
    p -= (lr / bc1) * m / denom
