"""Weight-only 16- and 8-bit inference: packed weights, float32 activations and sums.

Decoding reads every weight once per token and little else, so its speed is the DRAM bandwidth
divided by the weights' bytes. Two packings, both one output channel per row, (out, in):

    bf16: w16 = the top 16 bits of each float32 weight, rounded to nearest even
          w   = (w16.astype(np.uint32) << 16).view(np.float32)            (2 bytes a weight)
    int8: scale[o] = max_k |w[o, k]| / 127     (symmetric, per output channel, float32)
          q[o, k]  = round(w[o, k] / scale[o])  in [-127, 127]
          w        = q * scale[:, None]                                      (1 byte a weight)

(A third layout keeps float32 values: `decode_layout(model)` holds each Linear's weight as float32 rows
(out, in), for decoding's dot products; see its docstring.)

`quantize(model, "bf16" | "int8")` swaps QuantLinear in for every Linear and one QuantEmbedding
for the tied token embedding: wte is packed ONCE (V, C) and serves both of its uses, the input
lookup (unpacking only the looked-up rows) and the LM head (which reads the packed matrix).
LayerNorms, biases and wpe stay float32. A quantized model is inference-only: backward raises.

Products with few rows (decoding and short prompts: `packed_max_rows`, 16 for int8, 64 for bf16)
run the Numba kernels of npgpt/fast/quant.py straight from the packed weights; with more rows (a
long prompt) a block of output channels at a time is unpacked into a float32 scratch and
multiplied by BLAS.

With int8 weights those few rows are quantized too, to 16-bit integers, so that a product is a sum
of exact integer dot products on the CPU's own instructions (VNNI's vpdpwssd, or AVX2's pmaddwd):
each row of x in blocks of 32 along K (as GGUF's Q8_0 activations, with 16 bits instead of 8), each
block its own scale,

    d[b]   = max_k |x[block b]| / 32767                 (float32)
    x16[k] = rint(x[k] * (1 / d[b]))  in [-32767, 32767] (int16)
    y[o]   = scale[o] * sum_b d[b] * (x16[block b] . q[o, block b]) + bias[o]

(`quantize_activations`, `q8_product`). Rounding x to 16 bits costs 1/258 of what 8 bits would (far
below the weights' own rounding); the products read the same int8 weights. Longer inputs (a prompt's
prefill) keep float32 activations against the unpacked weights.

Their files (npgpt.save_model of a quantized model, npgpt.load_model of its directory, with no
copy) are npgpt/io/quantized.py's.
"""
from __future__ import annotations

import numpy as np

from .. import fast
from ..layers.embedding import Embedding, TiedLMHead
from ..layers.linear import Linear
from ..layers.module import Module, Parameter

KINDS = ("fp32", "bf16", "int8")
PACKED_MAX_ROWS = 16             # int8: up to this many rows the packed kernels; above: unpack a block + BLAS
BF16_PACKED_MAX_ROWS = 64        # bf16: the packed kernels up to this many rows (a 32-token prompt of GPT-2
                                 # 124M on a Zen 4: 115 -> 74 ms; int8's kernels gained nothing above 16)
SCRATCH_FLOATS = 1 << 22         # float32 scratch for the unpacked block (16 MB)
META_KEY = "npgpt.weights"


def check_kind(kind) -> str:
    kind = "fp32" if kind is None else str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"weights must be one of {KINDS}, got {kind!r}")
    return kind


# ----------------------------------------------------------------------------- packing (NumPy)
def to_bf16(w) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even; NaN stays NaN."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(w)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype(np.uint16)


def to_int8(w) -> tuple:
    """w (out, in) float -> (q int8 (out, in), scale float32 (out,)): symmetric per output channel."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def pack(w_out_in, kind) -> tuple:
    """(packed (out, in), scale (out,) | None) of a float weight already laid out (out, in); "fp32": its
    float32 values as they are, C-ordered (out, in) (decode_layout)."""
    if kind == "fp32":
        return np.ascontiguousarray(w_out_in, dtype=np.float32), None
    if kind == "bf16":
        return to_bf16(w_out_in), None
    if kind == "int8":
        return to_int8(w_out_in)
    raise ValueError(f"cannot pack weights as {kind!r} (fp32, bf16 or int8)")


def unpack(packed, scale=None) -> np.ndarray:
    """The float32 weights (out, in) a packing stands for (the NumPy reference of the kernels)."""
    if packed.dtype == np.float32:
        return packed
    if packed.dtype == np.uint16:
        return (packed.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return packed.astype(np.float32) * scale[:, None]


Q8_BLOCK = 32                    # activations of int8 products quantized in blocks of this many along K
Q8_LEVELS = 32767                # ... to integers in [-Q8_LEVELS, Q8_LEVELS] (int16)


def quantize_activations(x) -> tuple:
    """x (N, K) float32 -> (x16 (N, K) int16, d (N, ceil(K/32)) float32), blocks of 32 along K (the last
    may be shorter): d = max|x| / 32767 over the block, x16 = rint(x * (1 / d)) ties to even (zeros where
    d is 0 or not finite, or so small that 1 / d overflows). A block holding NaN gets d = NaN, one holding
    inf d = inf, so the products' outputs come out NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, K = x.shape
    nb = -(-K // Q8_BLOCK)
    blocks = np.zeros((N, nb * Q8_BLOCK), np.float32)
    blocks[:, :K] = x
    blocks = blocks.reshape(N, nb, Q8_BLOCK)                                     # (N, nb, 32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.abs(blocks).max(axis=-1) / np.float32(Q8_LEVELS)                  # (N, nb), NaN propagates
        inv = np.float32(1.0) / np.where(d > 0, d, np.float32(1.0))              # (N, nb) float32
        ok = (d > 0) & np.isfinite(d) & np.isfinite(inv)       # else zeros: all-zero, non-finite, 1/d overflowing
        x16 = np.where(ok[..., None], np.rint(blocks * inv[..., None]), 0)
    x16 = x16.astype(np.int16).reshape(N, -1)[:, :K]
    return x16, d.astype(np.float32)


def q8_product(x, q, scale) -> np.ndarray:
    """y (N, out) = scale[o] * sum_b d[n, b] * (x16[n, block b] . q[o, block b]): x (N, K) quantized
    by quantize_activations, against int8 q (out, K) with per-row scale (out,)."""
    x16, d = quantize_activations(x)
    y = np.zeros((x16.shape[0], q.shape[0]))                                       # (N, out) float64
    with np.errstate(invalid="ignore", over="ignore"):
        for b in range(d.shape[1]):
            k = slice(b * Q8_BLOCK, (b + 1) * Q8_BLOCK)
            isum = x16[:, k].astype(np.float64) @ q[:, k].astype(np.float64).T   # exact: |isum| <= 32 * 32767 * 127
            y += d[:, b:b + 1] * isum
        return (y * scale).astype(np.float32)


def packed_max_rows(packed) -> int:
    """Up to how many rows of x a product runs the packed kernels (more: unpack a block + BLAS; float32 rows:
    BLAS on them as they are)."""
    if packed.dtype == np.float32:
        return fast.dots_limit() if fast.use_numba() else 0
    return BF16_PACKED_MAX_ROWS if packed.dtype == np.uint16 else PACKED_MAX_ROWS


def kind_of(packed) -> str:
    return {np.dtype(np.float32): "fp32", np.dtype(np.uint16): "bf16", np.dtype(np.int8): "int8"}[packed.dtype]


# ----------------------------------------------------------------------------- products
_scratch = None


def _block_scratch(n: int) -> np.ndarray:
    global _scratch
    if _scratch is None or _scratch.size < n:
        _scratch = np.empty(n, np.float32)
    return _scratch[:n]


def packed_linear(x2, packed, scale, bias):
    """y (N, out) = x2 (N, in) @ W^T + bias, W the float32 weights `packed` stands for."""
    N, K = x2.shape
    O = packed.shape[0]
    if not fast.use_numba():
        if packed.dtype == np.int8 and N <= PACKED_MAX_ROWS:
            y = q8_product(x2, packed, scale)
        else:
            y = np.asarray(x2, np.float32) @ unpack(packed, scale).T
        return y + bias if bias is not None else y
    from ..fast.quant import dequantize_rows, packed_matmul
    if N <= packed_max_rows(packed):
        return packed_matmul(x2, packed, scale, bias)
    if packed.dtype == np.float32:                   # rows as they are, to BLAS (the transposed view, no copy)
        y = np.asarray(x2, np.float32) @ packed.T
        if bias is not None:
            fast.add_bias_(y, bias)
        return y
    x2 = np.ascontiguousarray(x2, dtype=np.float32)
    y = np.empty((N, O), np.float32)
    step = max(1, min(O, SCRATCH_FLOATS // K))
    for o0 in range(0, O, step):                     # unpack a block of output channels, then BLAS
        o1 = min(O, o0 + step)
        w = dequantize_rows(packed, scale, np.arange(o0, o1), out=_block_scratch((o1 - o0) * K).reshape(o1 - o0, K))
        np.matmul(x2, w.T, out=y[:, o0:o1])
    if bias is not None:
        fast.add_bias_(y, bias)                   # y += bias, a Numba loop
    return y


def _inference_only(self, *_):
    if self.kind == "fp32":
        raise RuntimeError(f"{type(self).__name__} holds float32 weights laid out for decoding (decode_layout): "
                           f"inference-only (no backward); train the model as loaded, without decode_layout")
    raise RuntimeError(f"{type(self).__name__} holds {self.kind} weights: a quantized model is inference-only "
                       f"(no backward); train the float32 model and quantize it afterwards")


class QuantLinear(Module):
    """y = x @ W^T + b with W (out, in) packed as bf16 or int8, or float32 rows (decode_layout); the float32
    bias stays a Parameter."""

    def runs_on_kernel_threads(self, rows: int) -> bool:
        """Whether a product of `rows` rows runs on the Numba kernels' threads (packed kernels), not BLAS
        (see CausalSelfAttention.forward_cached)."""
        return fast.use_numba() and rows <= packed_max_rows(self.packed)

    def __init__(self, packed, scale=None, bias=None):
        self.packed = np.ascontiguousarray(packed)         # (out, in) float32 | uint16 | int8; no copy if contiguous
        self.scale = scale                                 # (out,) float32 for int8, else None
        self.kind = kind_of(packed)
        if self.kind == "int8" and scale is None:
            raise ValueError("int8 weights need their per-channel scales")
        self.bias = Parameter(np.zeros(packed.shape[0], np.float32) if bias is None else bias)

    @classmethod
    def from_linear(cls, lin: Linear, kind: str) -> "QuantLinear":
        packed, scale = pack(lin.weight.data.T, kind)      # Linear keeps (in, out); pack (out, in)
        return cls(packed, scale, np.array(lin.bias.data, dtype=np.float32))

    def forward(self, x):
        *lead, n_in = x.shape
        y = packed_linear(x.reshape(-1, n_in), self.packed, self.scale, self.bias.data)
        return y.reshape(*lead, -1)

    backward = _inference_only


class QuantEmbedding(Module):
    """The tied token embedding, packed once (V, C): forward looks rows up and unpacks only those."""

    def __init__(self, packed, scale=None):
        self.packed, self.scale, self.kind = np.ascontiguousarray(packed), scale, kind_of(packed)

    @classmethod
    def from_embedding(cls, emb: Embedding, kind: str) -> "QuantEmbedding":
        return cls(*pack(emb.weight.data, kind))           # wte (V, C) is already (out, in) for the head

    def forward(self, idx):
        idx = np.asarray(idx)
        if fast.use_numba():
            from ..fast.quant import dequantize_rows
            rows = dequantize_rows(self.packed, self.scale, idx)
        else:
            flat = idx.reshape(-1)
            rows = unpack(self.packed[flat], None if self.scale is None else self.scale[flat])
        return rows.reshape(*idx.shape, self.packed.shape[1])

    backward = _inference_only


class QuantTiedLMHead(Module):
    """logits = x @ wte^T straight from the embedding's packed matrix (the same arrays, no copy)."""

    def __init__(self, wte: QuantEmbedding):
        self.packed, self.scale, self.kind = wte.packed, wte.scale, wte.kind

    def forward(self, x):
        *lead, C = x.shape
        return packed_linear(x.reshape(-1, C), self.packed, self.scale, None).reshape(*lead, -1)

    backward = _inference_only


# ----------------------------------------------------------------------------- whole models


def quantize(model, kind: str = "int8"):
    """Swap packed bf16 / int8 modules into `model` in place (and return it): every Linear becomes a
    QuantLinear, the tied wte a QuantEmbedding packed once and the head a QuantTiedLMHead over the
    same arrays. The float32 weights are dropped. "fp32" returns the model unchanged."""
    kind = check_kind(kind)
    if kind == "fp32":
        return model
    current = model.weight_format
    if current != "fp32":
        raise ValueError(f"the model already holds {current} weights; quantize its float32 original")
    if model.dtype != np.float32:
        raise ValueError(f"quantize needs a float32 model, got {model.dtype}")
    from ..layers.lora import LoRALinear
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model holds LoRA adapters: npgpt.layers.lora.merge(model) first, then quantize")
    if not (isinstance(model.lm_head, TiedLMHead) and model.lm_head.weight is model.wte.weight):
        raise ValueError("quantize expects the LM head tied to wte")
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
        model.replace(name, QuantLinear.from_linear(lin, kind))
    for name, rows in [(n, m) for n, m in model.named_modules() if type(m) is QuantLinear and m.kind == "fp32"]:
        model.replace(name, QuantLinear(*pack(rows.packed, kind), rows.bias.data))   # decode_layout's rows
    model.wte = QuantEmbedding.from_embedding(model.wte, kind)
    model.lm_head = QuantTiedLMHead(model.wte)
    model.weight_format = kind
    return model.eval()


def decode_layout(model):
    """Lay a float32 model's Linear weights out (out, in) for decoding, in place (and return it): each Linear
    becomes a QuantLinear holding its float32 weight transposed, C-ordered (pack(w.T, "fp32")), the same
    values; the (in, out) original is dropped, so memory stays the same. Decoding then reads each output's
    weights as one contiguous row: products of 1 to fast.dots_limit() rows run the packed kernels
    (npgpt/fast/quant.py: few_rows' dot products, bf16's rules), and each decoded block one compiled call
    (npgpt/inference/fused.py); longer inputs run BLAS on the rows as they are (a transposed view). Like
    a quantized model it is inference-only (backward raises); its weights save as float32 (float_state).
    What `npgpt generate`, `chat` and `serve` do with float32 weights (docs/performance.md, "sixth
    session"). Packed (bf16, int8) and float64 models are returned unchanged."""
    if model.weight_format != "fp32" or model.dtype != np.float32:
        return model
    from ..layers.lora import LoRALinear
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model holds LoRA adapters: npgpt.layers.lora.merge(model) first, then decode_layout")
    for name, lin in [(n, m) for n, m in model.named_modules() if type(m) is Linear]:
        model.replace(name, QuantLinear.from_linear(lin, "fp32"))
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes of every weight the model holds (float parameters + packed matrices + scales), each once."""
    seen, total = set(), 0
    arrays = [p.data for p in model.parameters()]
    for m in model.modules():
        for attr in ("packed", "scale"):
            a = getattr(m, attr, None)
            if isinstance(a, np.ndarray):
                arrays.append(a)
    for a in arrays:
        if id(a) not in seen:
            seen.add(id(a))
            total += a.nbytes
    return total


def float_state(model) -> dict:
    """The model's weights as float arrays under Hugging Face names and layouts, whatever it holds:
    packed weights are unpacked (what they stand for), float ones returned as they are."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            state[f"{name}.weight"] = unpack(m.packed, m.scale).T      # (out, in) -> Conv1D's (in, out)
        elif isinstance(m, QuantEmbedding):
            state[f"{name}.weight"] = unpack(m.packed, m.scale)
    return state
