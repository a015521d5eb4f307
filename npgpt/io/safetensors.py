"""safetensors reading/writing (own implementation) and Hugging Face GPT-2 checkpoints.

File format: an unsigned little-endian 64-bit header length N, N bytes of UTF-8
JSON ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
..., "__metadata__": {str: str}}`` (padded with spaces so the data starts at
a multiple of 8), then the data section; offsets are relative to its start and
tensors are stored little-endian in C order.

Hugging Face GPT-2 (``load_hf_checkpoint``): ``config.json`` (vocab_size,
n_positions or n_ctx, n_embd, n_head, n_layer) plus ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``).  Keys may be bare (``h.0.ln_1.weight``,
as on the Hub) or ``transformer.``-prefixed (as ``save_pretrained`` writes them).
The attention-mask buffers ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias`` are
skipped; ``lm_head.weight`` is skipped when absent or equal to ``wte``, and an
untied lm_head is an error.  PyTorch pickles (``pytorch_model.bin``) are never
read.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np

from ..config import EOT_ID, GPTConfig
from .atomic import atomic_write, fsync_dir
from .layout import PREFIX, bf16_to_f32, check_config_fits, check_state_dict, hf_param_shapes, read_json_object

MAX_HEADER = 100 * 1024 * 1024

_DTYPES = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2",
    "BF16": "<u2", "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8",
}
_FROM_NUMPY = {"b": "BOOL", "u1": "U8", "i1": "I8", "u2": "U16", "i2": "I16", "f2": "F16", "u4": "U32",
               "i4": "I32", "f4": "F32", "u8": "U64", "i8": "I64", "f8": "F64"}


def read_safetensors_header(path: str) -> tuple:
    """Return (header dict without __metadata__, metadata dict, data start offset, file size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: safetensors header length {n} is invalid (file has {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{where}: header entry needs dtype, shape and data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"{where}: invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ValueError(f"{where}: invalid data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] run outside the data section "
                             f"({data_len} bytes; file truncated or header corrupted)")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != nbytes:
            raise ValueError(f"{where}: data_offsets span {end - begin} bytes but {dtype}{shape} needs {nbytes}")
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    return header, meta, data_start, size


def read_safetensors(path, mmap: bool = True, writable: bool = False, raw_bf16: bool = False) -> tuple:
    """Read a .safetensors file -> ({name: array}, metadata).

    With ``mmap=True`` tensors are read-only views of a memory map of the file
    (nothing is read until used), or with ``writable=True`` copy-on-write views
    (writes go to private memory, never to the file); otherwise they are ordinary
    in-memory arrays. BF16 tensors are converted to float32, or with ``raw_bf16=True`` kept as
    their uint16 bit patterns (views of the map, for npgpt.inference.quant's packed weights).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    header, meta, start, size = read_safetensors_header(path)
    if size > start:
        if mmap:
            data = np.memmap(path, dtype=np.uint8, mode="c" if writable else "r", offset=start,
                             shape=(size - start,))
        else:
            with open(path, "rb") as f:
                f.seek(start)
                data = np.fromfile(f, dtype=np.uint8, count=size - start)
    else:
        data = np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dt = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        arr = np.ndarray(shape, dtype=dt, buffer=data[begin:end]) if end > begin else np.zeros(shape, dt)
        if info["dtype"] == "BF16" and not raw_bf16:
            arr = bf16_to_f32(arr)
        out[name] = arr
    return out, meta


def _write_safetensors_to(f, tensors: dict, metadata, dtypes=None) -> None:
    header = {}
    arrays = []
    offset = 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        arr = np.asarray(value)
        key = "b" if arr.dtype == np.bool_ else arr.dtype.str[1:]
        if key not in _FROM_NUMPY:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")   # keeps 0-d arrays 0-d
        st = (dtypes or {}).get(name, _FROM_NUMPY[key])
        if st != _FROM_NUMPY[key] and np.dtype(_DTYPES[st]) != arr.dtype:
            raise ValueError(f"tensor {name!r}: cannot store {arr.dtype} as {st}")
        header[name] = {"dtype": st, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for arr in arrays:
        if arr.nbytes:
            f.write(arr.reshape(-1).view(np.uint8).data)


def save_safetensors(path, tensors: dict, metadata: dict | None = None, dtypes: dict | None = None) -> None:
    """Write ``tensors`` ({name: array}) to ``path`` atomically (temp file + rename). ``dtypes``
    ({name: "BF16"}) stores a uint16 array under another safetensors dtype of the same size."""
    with atomic_write(path) as f:
        if dtypes:
            _write_safetensors_to(f, tensors, metadata, dtypes)
        else:
            _write_safetensors_to(f, tensors, metadata)


# ---------------------------------------------------------------------------
# Hugging Face GPT-2 checkpoints

_SUPPORTED_ACT = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(cfg: dict, source: str) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json dict."""
    try:
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"model_type is {cfg.get('model_type')!r}, expected 'gpt2'")
        act = cfg.get("activation_function", "gelu_new")
        if act not in _SUPPORTED_ACT:
            raise ValueError(f"activation_function {act!r} is not supported (only the tanh GELU, 'gelu_new')")
        if cfg.get("n_inner") not in (None, 4 * cfg.get("n_embd", 0)):
            raise ValueError(f"n_inner={cfg['n_inner']} is not supported (must be 4 * n_embd)")
        if abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
            raise ValueError(f"layer_norm_epsilon={cfg['layer_norm_epsilon']} is not supported (must be 1e-5)")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if cfg.get(flag):
                raise ValueError(f"{flag}=true is not supported")
        if cfg.get("scale_attn_weights", True) is False:
            raise ValueError("scale_attn_weights=false is not supported")
        n_ctx = cfg.get("n_positions", cfg.get("n_ctx"))
        hp = {"n_vocab": cfg.get("vocab_size"), "n_ctx": n_ctx, "n_embd": cfg.get("n_embd"),
              "n_head": cfg.get("n_head"), "n_layer": cfg.get("n_layer")}
        missing = [k for k, v in hp.items() if v is None]
        if missing:
            raise ValueError(f"missing {missing} (HF names vocab_size, n_positions, n_embd, n_head, n_layer)")
        # GPTConfig has one dropout for the embeddings, attention probabilities and residuals: the three
        # Hugging Face fields must agree (a missing one counts as 0, as npgpt's own files never omit them)
        pdrop = {k: float(cfg.get(k, 0.0) or 0.0) for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop")}
        if len(set(pdrop.values())) > 1:
            raise ValueError(f"dropout probabilities differ ({', '.join(f'{k}={v}' for k, v in pdrop.items())}); "
                             f"npgpt uses one dropout for all three")
        return GPTConfig(**hp, dropout=pdrop["resid_pdrop"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: unsupported GPT-2 config: {e}") from None


def hf_config_dict(config: GPTConfig) -> dict:
    """A Hugging Face GPT-2 config.json for ``config``."""
    eot = EOT_ID if config.n_vocab > EOT_ID else None   # GPT-2's <|endoftext|>; a smaller vocabulary has none
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": config.dropout,
        "bos_token_id": eot,
        "embd_pdrop": config.dropout,
        "eos_token_id": eot,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": None,
        "n_layer": config.n_layer,
        "n_positions": config.n_ctx,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": config.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": config.dropout,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": config.n_vocab,
    }


_BUFFER_RE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.")


def check_hf_config_fits(config: GPTConfig, tensors: dict, source: str, config_path: str) -> None:
    """check_config_fits for tensors under Hugging Face names (``transformer.``-prefixed)."""
    layers = [int(m.group(1)) for k in tensors if (m := _BLOCK_RE.match(k))]
    wte, wpe = ((k, tensors[k].shape) if k in tensors else None for k in (PREFIX + "wte.weight", PREFIX + "wpe.weight"))
    check_config_fits(config, layers, wte, wpe, source, config_path)


def _weight_files(d: str) -> list:
    single = os.path.join(d, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: invalid safetensors index: {e}") from None
        for name in files:
            if os.path.basename(name) != name:
                raise ValueError(f"{index}: shard name {name!r} must be a plain file name")
        return [os.path.join(d, name) for name in files]
    others = [f for f in ("pytorch_model.bin", "tf_model.h5", "model.ckpt.index") if os.path.exists(os.path.join(d, f))]
    hint = f" (found {others}; only safetensors is read, pickles never are)" if others else ""
    raise FileNotFoundError(f"{d}: no model.safetensors{hint}")


def load_hf_checkpoint(path, mmap: bool = True, writable: bool = False) -> tuple:
    """Load a Hugging Face GPT-2 checkpoint -> (GPTConfig, state_dict).

    ``path`` is a directory with ``config.json`` and ``model.safetensors``, or a
    ``.safetensors`` file with ``config.json`` beside it.  float32 tensors are
    read-only memory-mapped views (``mmap=True``; copy-on-write with ``writable=True``)
    or in-memory copies; float64 stays float64; half and bfloat16 become float32.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if os.path.isdir(path):
        d, files = path, _weight_files(path)
    elif path.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
        raise ValueError(f"{path}: PyTorch/pickle checkpoints are not read (unpickling can run code); "
                         f"convert it to safetensors")
    else:
        d, files = os.path.dirname(path) or ".", [path]
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} does not exist: a Hugging Face checkpoint needs config.json "
                                f"beside the weights")
    config = config_from_hf(read_json_object(cfg_path, "JSON"), cfg_path)

    raw = {}
    origin = {}
    for file in files:
        tensors, _ = read_safetensors(file, mmap=mmap, writable=writable)
        for k, v in tensors.items():
            if k in raw:
                raise ValueError(f"{file}: tensor {k!r} also appears in {origin[k]}")
            raw[k], origin[k] = v, file
    source = files[0] if len(files) == 1 else d

    state = {}
    original = {}
    lm_head = None
    for k, v in raw.items():
        bare = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if _BUFFER_RE.match(bare):
            continue
        if k == "lm_head.weight":
            lm_head = v
            continue
        name = PREFIX + bare
        if name in state:
            raise ValueError(f"{source}: tensor {name!r} appears both with and without the 'transformer.' prefix")
        state[name], original[name] = v, k
    check_hf_config_fits(config, state, source, cfg_path)     # before the table below, which grows with n_layer
    expected = hf_param_shapes(config)
    unexpected = [original[k] for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"(not a GPT-2 LM checkpoint matching {cfg_path}?)")
    check_state_dict(config, state, source)
    if lm_head is not None:
        wte = state["transformer.wte.weight"]
        if lm_head.shape != wte.shape or not np.array_equal(lm_head, wte):
            raise ValueError(f"{source}: tensor 'lm_head.weight' differs from 'transformer.wte.weight'; "
                             f"untied output embeddings are not supported")
    for k, v in state.items():
        if v.dtype.kind != "f":
            raise ValueError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected a float type")
        if v.dtype not in (np.float32, np.float64) or not v.dtype.isnative:
            state[k] = v.astype(np.float32)   # half / bfloat16 / byte-swapped -> native float32
    return config, {k: state[k] for k in expected}


def save_hf_checkpoint(path, config: GPTConfig, state_dict: dict, dtype=np.float32) -> str:
    """Write ``config.json`` + ``model.safetensors`` (Hugging Face GPT-2 layout) into directory ``path``
    (see ``write_model_dir``).

    ``state_dict`` uses the native names (``transformer.``-prefixed; bare names
    are accepted too).  The result loads with ``GPT2LMHeadModel.from_pretrained``.
    Returns ``path``.
    """
    path = os.fspath(path)
    sd = {}
    for k, v in state_dict.items():
        name = k if k.startswith(PREFIX) else PREFIX + k
        if name == PREFIX + "lm_head.weight" or k == "lm_head.weight":
            continue
        sd[name] = v
    check_state_dict(config, sd, f"save_hf_checkpoint({path!r})")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"save_hf_checkpoint: dtype must be a float type, got {dtype}")
    tensors = {k: np.asarray(sd[k], dtype=dtype) for k in hf_param_shapes(config)}
    cfg = hf_config_dict(config)
    cfg["torch_dtype"] = {"f4": "float32", "f2": "float16", "f8": "float64"}.get(dtype.str[1:], "float32")
    return write_model_dir(path, cfg, tensors, {"format": "pt"})


WEIGHTS, CONFIG = "model.safetensors", "config.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_SUPERSEDED = ("model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors")


def write_model_dir(path, cfg: dict, tensors: dict, metadata: dict, dtypes: dict | None = None) -> str:
    """Write ``config.json`` (``cfg``) and ``model.safetensors`` (``tensors``, see ``save_safetensors``)
    into directory ``path``, and nothing else. Returns ``path``.

    A new directory is assembled under a temporary name beside ``path`` and renamed into place
    whole. In an existing directory only these two files change: the other entries are never read,
    followed, copied or removed (a link stays a link, pointing where it did); each new file is written
    whole and fsynced under a temporary name, then renamed over the old one. A directory holding files
    the new weights would leave stale (a sharded index and its shards, or a LoRA adapter, which
    loaders would read with them) is refused with a ValueError naming them: npgpt removes nothing it
    may not have written. A kill between the two renames leaves the new weights beside the old
    config.json, against which loading checks them."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    cfg_bytes = (json.dumps(cfg, indent=2) + "\n").encode("utf-8")
    files = ((WEIGHTS, lambda f: _write_safetensors_to(f, tensors, metadata, dtypes)),
             (CONFIG, lambda f: f.write(cfg_bytes)))
    if not os.path.lexists(path):
        tmpdir = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            for name, write in files:
                os.replace(_stage(tmpdir, name, write), os.path.join(tmpdir, name))
            os.chmod(tmpdir, 0o755)
            fsync_dir(tmpdir)
            os.rename(tmpdir, path)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        fsync_dir(parent)
        return path
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    stale = sorted(n for n in os.listdir(path) if n in _SUPERSEDED or _SHARD_RE.match(n))
    if stale:
        raise ValueError(f"{path} holds {', '.join(stale)}, which loaders would read with the weights written "
                         f"beside them; remove them or choose another directory (npgpt removes no file it may "
                         f"not have written)")
    staged = []
    try:
        for name, write in files:
            staged.append((_stage(path, name, write), name))
        for tmp, name in staged:
            os.replace(tmp, os.path.join(path, name))
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    fsync_dir(path)
    return path


def _stage(directory: str, name: str, write) -> str:
    """A new file beside ``directory/name`` holding what ``write(f)`` wrote, fsynced; the caller renames it."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp
