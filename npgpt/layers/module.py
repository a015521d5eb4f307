"""Parameter and Module: the two pieces of bookkeeping every layer shares.

A Parameter is an array and its gradient. Backward passes only ever *add* into
`.grad` (llm.c style): a parameter used twice (the tied token embedding, which is
both the input lookup table and the output projection) then collects both
contributions with no special case.

A Module finds its parameters by walking its attributes, so a layer only has to
assign them (`self.weight = Parameter(...)`), as in PyTorch.
"""
from __future__ import annotations

import numpy as np


class Parameter:
    """data and its gradient. zero_grad() only marks the gradient as zero; the array is
    cleared when `.grad` is next read, or, by add_matmul, overwritten by a product with no
    temporary and no clearing pass (the largest gradients are all matmul products). As with
    PyTorch's zero_grad(set_to_none=True), a gradient array fetched before zero_grad() keeps
    its old values: fetch `.grad` again after zeroing."""
    __slots__ = ("data", "_grad", "_grad_is_zero")

    def __init__(self, data: np.ndarray):
        self.data = data
        self._grad = None          # allocated on first use (backward): inference never pays for gradients
        self._grad_is_zero = False

    @property
    def grad(self):
        if self._grad is None:
            self._grad = np.zeros_like(self.data)
        elif self._grad_is_zero:
            self._grad.fill(0)
            self._grad_is_zero = False
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad, self._grad_is_zero = value, False

    @property
    def has_grad(self) -> bool:
        return self._grad is not None

    def zero_grad(self):
        if self._grad is None:
            self._grad = np.empty_like(self.data)
        self._grad_is_zero = True

    def add_matmul(self, a, b):
        """grad += a @ b  (a 2-D GEMM; written straight into grad when grad is still zero)."""
        if self._grad is None:
            self.zero_grad()
        if self._grad_is_zero:
            np.matmul(a, b, out=self._grad)
            self._grad_is_zero = False
        else:
            self.grad += a @ b

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    training = True

    def _members(self):
        """(name, Parameter | Module) in attribute order; lists of modules are numbered."""
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Module):
                for i, m in enumerate(value):
                    yield f"{name}.{i}", m

    def named_parameters(self, prefix: str = "", _seen=None):
        """(dotted name, Parameter), each Parameter once (first name wins, as in PyTorch)."""
        seen = set() if _seen is None else _seen
        for name, value in self._members():
            if isinstance(value, Parameter):
                if id(value) not in seen:
                    seen.add(id(value))
                    yield prefix + name, value
            else:
                yield from value.named_parameters(prefix + name + ".", seen)

    def modules(self):
        yield self
        for _, value in self._members():
            if isinstance(value, Module):
                yield from value.modules()

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def spawn_seeds(seed, n: int):
    """n independent child seeds for sub-layers' dropout generators (seed: None, int or SeedSequence)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return ss.spawn(n)


def normal_init(rng, shape, std: float, dtype):
    """N(0, std^2) weights from rng; with rng=None, zeros (allocation only: the caller loads weights,
    and untouched zero pages cost no time)."""
    if rng is None:
        return np.zeros(shape, dtype=dtype)
    return (std * rng.standard_normal(shape, dtype=np.float32 if dtype == np.float32 else np.float64)).astype(dtype)
