"""Parameter and Module: the two pieces of bookkeeping every layer shares.

A Parameter is an array and its gradient. Backward passes only ever *add* into
`.grad` (llm.c style): a parameter used twice (the tied token embedding, which is
both the input lookup table and the output projection) then collects both
contributions with no special case.

A Module finds its parameters by walking its attributes, so a layer only has to
assign them (`self.weight = Parameter(...)`), as in PyTorch.

Grad mode. A layer's forward keeps what its backward needs (its input, layernorm's xhat and
rstd, dropout's mask, ...) through `self.save_for_backward(x=...)`, and backward reads it back
with `self.saved("x")`. Under `npgpt.no_grad()` (a context manager and a decorator, as in
PyTorch) a forward keeps nothing and leaves what an earlier training forward kept untouched: an
evaluation or a KV-cached sample holds no activations of its own, and a sample taken between a
training forward and its backward does not change that backward. A backward with no training
forward behind it raises RuntimeError. `is_grad_enabled()` tells the current mode.
"""
from __future__ import annotations

import contextlib

import numpy as np

_grad_enabled = True


def is_grad_enabled() -> bool:
    """False inside `no_grad()`: forward passes keep nothing for backward."""
    return _grad_enabled


class no_grad(contextlib.ContextDecorator):
    """`with npgpt.no_grad():` or `@npgpt.no_grad()`: forward passes keep no backward caches.

    Only what is kept changes: dropout still applies in training mode (call .eval() to turn it off)."""

    def __init__(self):
        self._outer = []               # a stack, so one instance can be re-entered (a recursive decorated call)

    def __enter__(self):
        global _grad_enabled
        self._outer.append(_grad_enabled)
        _grad_enabled = False
        return self

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._outer.pop()
        return False


class Parameter:
    """An array (data, always C-contiguous) and its gradient (grad), which backward passes only add into.

    - requires_grad = False freezes it: no gradient is computed for it (a frozen Linear skips its
      dL/dw GEMM) and AdamW keeps no moments for it.
    - has_grad: whether a gradient arrived since the last zero_grad(). AdamW and clip_grad_norm skip
      parameters without one, so a parameter no backward reached neither decays nor moves on old momentum.
    - Speed, not math: zero_grad() only marks the gradient as zero (the array is cleared when .grad is
      next read, or overwritten by add_matmul's product with no clearing pass), and move_to() lets
      AdamW keep every parameter in one flat buffer. As with PyTorch's zero_grad(set_to_none=True),
      fetch .grad again after zeroing."""
    __slots__ = ("_data", "_grad", "_grad_is_zero", "requires_grad")

    def __init__(self, data: np.ndarray, requires_grad: bool = True):
        self.data = data
        self._grad = None          # allocated on first use (backward): inference never pays for gradients
        self._grad_is_zero = False
        self.requires_grad = requires_grad

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = np.ascontiguousarray(value)   # no copy when already C-contiguous

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
        """True once a gradient arrived since the last zero_grad() (as PyTorch's grad is not None)."""
        return self._grad is not None and not self._grad_is_zero

    def zero_grad(self):
        if self._grad is None:
            if not self.requires_grad:
                return             # frozen: never allocate a gradient
            self._grad = np.empty_like(self.data)
        self._grad_is_zero = True

    def move_to(self, data: np.ndarray, grad: np.ndarray):
        """Keep the values in `data` and the gradient in `grad` from now on: C-contiguous arrays of this
        parameter's shape and dtype, e.g. views of one flat buffer (npgpt.optim.AdamW packs the
        trainable parameters so). The values are copied over; so is the gradient, or whether there is
        none since zero_grad()."""
        for a, what in ((data, "data"), (grad, "grad")):
            if a.shape != self.data.shape or a.dtype != self.data.dtype or not a.flags.c_contiguous:
                raise ValueError(f"move_to: {what} must be C-contiguous {self.data.dtype} of shape {self.data.shape}, "
                                 f"got {a.dtype} {a.shape}")
        data[...] = self.data
        has_grad = self.has_grad
        if has_grad:
            grad[...] = self._grad
        self._data, self._grad, self._grad_is_zero = data, grad, not has_grad
        return self

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
        frozen = "" if self.requires_grad else ", frozen"
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}{frozen})"


class Module:
    training = True

    def _members(self):
        """(name, Parameter | Module) in attribute order; inside lists and tuples they are numbered
        (h.0, h.1, ...), inside dicts named by key (heads.a), at any depth."""
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple, dict)):
                yield from _find_members(name, value)

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

    def named_modules(self, prefix: str = ""):
        """(dotted name, module): this module (named `prefix`, "" at the top), then every submodule, depth
        first, each parent before its children, named as named_parameters names their parameters."""
        yield prefix, self
        for name, value in self._members():
            if isinstance(value, Module):
                yield from value.named_modules(dotted(prefix, name))

    def replace(self, name: str, new: "Module") -> "Module":
        """Put `new` where the submodule called `name` (as named_modules names it) is; returns the old one."""
        owner_name, _, attr = name.rpartition(".")
        owner = dict(self.named_modules())[owner_name]
        old = getattr(owner, attr)
        if not isinstance(old, Module):
            raise KeyError(f"{name} is not a submodule")
        setattr(owner, attr, new)
        return old

    def modules(self):
        """This module and every submodule, depth first, each parent before its children."""
        stack = [self]
        while stack:
            m = stack.pop()
            yield m
            stack += reversed([v for _, v in m._members() if isinstance(v, Module)])

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_grads(self):
        """(dotted name, gradient array), or None for a parameter with no gradient since zero_grad()."""
        for name, p in self.named_parameters():
            yield name, p.grad if p.has_grad else None

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    # ----------------------------------------------------------------- freezing
    def requires_grad_(self, flag: bool = True):
        """Set requires_grad on every parameter (False freezes them all); returns self."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def freeze(self):
        return self.requires_grad_(False)

    def unfreeze(self):
        return self.requires_grad_(True)

    def needs_grad(self) -> bool:
        """True if any parameter of this module is trainable (its backward has gradients to compute)."""
        return any(p.requires_grad for p in self.parameters())

    def state_dict(self) -> dict:
        """{dotted name: parameter array} (the arrays themselves, not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        """Copy arrays into the parameters by name. Names (with strict), shapes and number types are
        all checked before anything is copied, so a bad state dict leaves the module unchanged.
        assign=True makes writable C-contiguous arrays of a parameter's dtype the parameters themselves
        (no copy); other arrays are copied, cast to the parameter's dtype."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        arrays = {}
        for k, p in params.items():
            if k not in state:
                continue
            a = np.asarray(state[k])
            if a.dtype.kind not in "fiu":
                raise ValueError(f"load_state_dict: tensor {k} has dtype {a.dtype}, expected a number type")
            if a.shape != p.data.shape:
                raise ValueError(f"load_state_dict: tensor {k} has shape {a.shape}, the model expects {p.data.shape}")
            arrays[k] = a
        for k, a in arrays.items():
            p = params[k]
            if assign and a.dtype == p.data.dtype and a.flags.writeable and a.flags.c_contiguous:
                p.data = a
            else:
                p.data[...] = a   # casts to the parameter's dtype
        return self

    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    @contextlib.contextmanager
    def eval_mode(self, modules=None):
        """`with module.eval_mode():` every submodule in eval mode (no dropout), each one's own
        mode restored afterwards (inference inside a training run, e.g. GPT.forward_cached).
        Re-entering it on the same module inside that block costs nothing. modules: list(self.modules()),
        when the caller already holds it (a decoding loop collects it once, not at every token)."""
        if getattr(self, "_in_eval_mode", False):
            yield self
            return
        modes = [(m, m.training) for m in (self.modules() if modules is None else modules)]
        for m, _ in modes:
            m.training = False
        self._in_eval_mode = True
        try:
            yield self
        finally:
            self._in_eval_mode = False
            for m, mode in modes:
                m.training = mode

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ----------------------------------------------------------------- what backward needs
    def save_for_backward(self, **values):
        """self.<name> = value for each keyword; under no_grad nothing (see the module docstring)."""
        if not _grad_enabled:
            return
        for name, value in values.items():
            setattr(self, name, value)
        self._saved = True

    def saved(self, *names):
        """The values the last training forward kept (one value for one name, else a tuple);
        RuntimeError if no forward ran with gradients enabled."""
        if not getattr(self, "_saved", False):
            raise RuntimeError(f"{type(self).__name__}.backward: no forward pass kept its activations "
                               f"(forward ran only under npgpt.no_grad(), or not at all); run forward "
                               f"with gradients enabled first")
        values = tuple(getattr(self, name) for name in names)
        return values[0] if len(values) == 1 else values


def _find_members(name, value):
    if isinstance(value, (Parameter, Module)):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _find_members(f"{name}.{i}", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _find_members(f"{name}.{k}", v)


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


def dotted(*names) -> str:
    """The dotted path of names, the empty ones left out: dotted("", "h.0", "attn") == "h.0.attn"."""
    return ".".join(n for n in names if n)


def first_non_finite(named_arrays) -> str | None:
    """The name of the first array in (name, array) pairs holding a NaN or an infinity, or None."""
    for name, a in named_arrays:
        if not np.isfinite(a).all():
            return name
    return None
