"""Read TensorFlow V2 checkpoints ("tensor bundles") without TensorFlow.

A checkpoint with prefix ``P`` is ``P.index`` plus data shards
``P.data-00000-of-0000N``.

``P.index`` is a LevelDB-format SSTable (TensorFlow's ``core/lib/io/table``):

* footer (last 48 bytes): metaindex BlockHandle, index BlockHandle (each two
  varint64: offset, size), zero padding to 40 bytes, then the 8-byte magic
  0xdb4775248b80fb57 (little-endian);
* the index block maps separator keys to BlockHandles of the data blocks;
* a block is a run of entries ``varint32 shared, varint32 non_shared,
  varint32 value_length, key[shared:] bytes, value bytes`` (keys are
  prefix-compressed against the previous key), then an array of uint32
  restart offsets and their uint32 count; each block is followed by a 1-byte
  compression type (we only accept 0 = none, which is what TensorFlow writes
  for bundles) and a masked CRC-32C of block+type byte (always checked here).

Keys are tensor names; values are serialized ``BundleEntryProto`` messages
(dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6 fixed32, slices=7).
The empty key holds the ``BundleHeaderProto`` (num_shards=1, endianness=2,
version=3).  ``BundleEntryProto.crc32c`` is the *masked* CRC-32C of the
tensor's raw bytes in the data file.

The OpenAI GPT-2 mapping (``load_tf_checkpoint``):

* every expected ``model/...`` variable must be present with exactly the shape
  that ``hparams.json`` implies (the Conv1D weights ``[1, in, out]`` become
  ``(in, out)``); anything missing or mis-shaped raises ``ValueError`` naming
  the index file and the tensor, and nothing is returned;
* tensors outside ``model/`` (``global_step``, ``beta1_power``, ...) are ignored,
  and so are optimizer slots nested under an expected variable
  (``model/wte/Adam``, ``model/h0/attn/c_attn/w/Adam_1``, ...);
* any other tensor under ``model/`` is an error: it means the checkpoint has a
  different architecture than hparams.json says (e.g. more layers).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from ..config import GPTConfig
from . import crc32c as _crc
from .layout import bf16_to_f32, check_config_fits, fmt_shape, openai_param_map, read_json_object

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
TENSOR_BUNDLE_VERSION = 1
_BLOCK_RE = re.compile(r"^model/h(\d+)/")

# TensorFlow DataType enum values we can map to NumPy.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8 = 1, 2, 3, 4, 5, 6
DT_STRING, DT_INT64, DT_BOOL, DT_BFLOAT16, DT_UINT16, DT_HALF = 7, 9, 10, 14, 17, 19
DT_UINT32, DT_UINT64 = 22, 23
_NP_DTYPES = {
    DT_FLOAT: "f4", DT_DOUBLE: "f8", DT_INT32: "i4", DT_UINT8: "u1", DT_INT16: "i2",
    DT_INT8: "i1", DT_INT64: "i8", DT_BOOL: "?", DT_BFLOAT16: "u2", DT_UINT16: "u2",
    DT_HALF: "f2", DT_UINT32: "u4", DT_UINT64: "u8",
}
_DT_NAMES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 5: "DT_INT16", 6: "DT_INT8",
             7: "DT_STRING", 8: "DT_COMPLEX64", 9: "DT_INT64", 10: "DT_BOOL", 14: "DT_BFLOAT16",
             17: "DT_UINT16", 18: "DT_COMPLEX128", 19: "DT_HALF", 21: "DT_VARIANT",
             22: "DT_UINT32", 23: "DT_UINT64"}


class _Corrupt(ValueError):
    """Internal: a structural problem, re-raised with the file name attached."""


# ---------------------------------------------------------------------------
# Minimal protobuf wire-format decoding

def _varint(buf, pos: int, end: int, limit_bits: int = 64) -> tuple:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= limit_bits + 6:
            raise _Corrupt("varint too long")
    if result >> limit_bits:
        raise _Corrupt("varint out of range")
    return result, pos


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a serialized protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Corrupt("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            if pos + 8 > end:
                raise _Corrupt("truncated fixed64")
            value = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Corrupt("truncated length-delimited field")
            value = bytes(buf[pos:pos + n])
            pos += n
        elif wire == 5:
            if pos + 4 > end:
                raise _Corrupt("truncated fixed32")
            value = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _expect_wire(field: int, wire: int, want: int, what: str):
    if wire != want:
        raise _Corrupt(f"{what}: field {field} has wire type {wire}, expected {want}")


@dataclass(frozen=True)
class BundleEntry:
    dtype: int
    shape: tuple
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int | None = None      # masked, as stored
    sliced: bool = False


@dataclass(frozen=True)
class BundleHeader:
    num_shards: int = 0
    endianness: int = 0            # 0 = LITTLE, 1 = BIG
    producer: int = 0
    min_consumer: int = 0


def _parse_shape(buf: bytes) -> tuple:
    dims = []
    for field, wire, value in _fields(buf):
        if field == 2:
            _expect_wire(field, wire, 2, "TensorShapeProto")
            size = 0
            for f2, w2, v2 in _fields(value):
                if f2 == 1:
                    _expect_wire(f2, w2, 0, "TensorShapeProto.Dim")
                    size = _signed64(v2)
            if size < 0:
                raise _Corrupt(f"tensor dimension {size} is negative")
            dims.append(size)
        elif field == 3 and value:
            raise _Corrupt("tensor shape has unknown rank")
    return tuple(dims)


def parse_entry(buf: bytes) -> BundleEntry:
    kw = {"dtype": 0, "shape": ()}
    for field, wire, value in _fields(buf):
        if field == 1:
            _expect_wire(field, wire, 0, "BundleEntryProto.dtype")
            kw["dtype"] = value
        elif field == 2:
            _expect_wire(field, wire, 2, "BundleEntryProto.shape")
            kw["shape"] = _parse_shape(value)
        elif field == 3:
            _expect_wire(field, wire, 0, "BundleEntryProto.shard_id")
            kw["shard_id"] = _signed64(value)
        elif field == 4:
            _expect_wire(field, wire, 0, "BundleEntryProto.offset")
            kw["offset"] = _signed64(value)
        elif field == 5:
            _expect_wire(field, wire, 0, "BundleEntryProto.size")
            kw["size"] = _signed64(value)
        elif field == 6:
            _expect_wire(field, wire, 5, "BundleEntryProto.crc32c")
            kw["crc32c"] = value
        elif field == 7:
            kw["sliced"] = True
    return BundleEntry(**kw)


def parse_header(buf: bytes) -> BundleHeader:
    kw = {}
    for field, wire, value in _fields(buf):
        if field == 1:
            _expect_wire(field, wire, 0, "BundleHeaderProto.num_shards")
            kw["num_shards"] = _signed64(value)
        elif field == 2:
            _expect_wire(field, wire, 0, "BundleHeaderProto.endianness")
            kw["endianness"] = value
        elif field == 3:
            _expect_wire(field, wire, 2, "BundleHeaderProto.version")
            for f2, w2, v2 in _fields(value):
                if f2 == 1 and w2 == 0:
                    kw["producer"] = _signed64(v2)
                elif f2 == 2 and w2 == 0:
                    kw["min_consumer"] = _signed64(v2)
    return BundleHeader(**kw)


# ---------------------------------------------------------------------------
# LevelDB SSTable reading

def _block(data: bytes, handle_buf: bytes, what: str) -> bytes:
    """Decode a BlockHandle and return the checked block contents."""
    offset, pos = _varint(handle_buf, 0, len(handle_buf))
    size, pos = _varint(handle_buf, pos, len(handle_buf))
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(data) - FOOTER_SIZE:
        raise _Corrupt(f"{what} block [{offset}, {end}) runs past the end of the table")
    contents = data[offset:end]
    ctype = data[end]
    if ctype != 0:
        kind = {1: "snappy", 2: "zstd"}.get(ctype, f"type {ctype}")
        raise _Corrupt(f"{what} block is compressed ({kind}); only uncompressed tables are supported")
    stored = int.from_bytes(data[end + 1:end + 5], "little")
    actual = _crc.extend(_crc.crc32c(contents), data[end:end + 1])
    if _crc.unmask(stored) != actual:
        raise _Corrupt(f"{what} block at offset {offset}: CRC-32C mismatch (file is corrupted)")
    return contents


def _block_entries(block: bytes, what: str):
    """Yield (key, value) of one block, undoing the prefix compression."""
    n = len(block)
    if n < 4:
        raise _Corrupt(f"{what} block is too short")
    num_restarts = int.from_bytes(block[n - 4:], "little")
    if num_restarts == 0 or 4 * (num_restarts + 1) > n:
        raise _Corrupt(f"{what} block has a bad restart count {num_restarts}")
    limit = n - 4 * (num_restarts + 1)
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = _varint(block, pos, limit, 32)
        non_shared, pos = _varint(block, pos, limit, 32)
        vlen, pos = _varint(block, pos, limit, 32)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise _Corrupt(f"{what} block has a malformed entry at byte {pos}")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + vlen]
        pos += vlen


def read_table(path: str) -> dict:
    """Read a LevelDB-format SSTable into an ordered {key bytes: value bytes}."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        if len(data) < FOOTER_SIZE:
            raise _Corrupt(f"file is {len(data)} bytes, too short for a table footer")
        footer = data[-FOOTER_SIZE:]
        if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
            raise _Corrupt("bad table magic number (not a TensorFlow checkpoint index, or truncated)")
        _, pos = _varint(footer, 0, 40)            # metaindex handle
        _, pos = _varint(footer, pos, 40)
        meta_handle = footer[:pos]
        _, end = _varint(footer, pos, 40)          # index handle
        _, end = _varint(footer, end, 40)
        index_handle = footer[pos:end]
        if any(footer[end:40]):
            raise _Corrupt("table footer padding is not zero")
        _block(data, meta_handle, "metaindex")     # unused by bundles, but checked
        index = _block(data, index_handle, "index")
        out = {}
        prev = None
        for _, handle in _block_entries(index, "index"):
            for key, value in _block_entries(_block(data, handle, "data"), "data"):
                if prev is not None and key <= prev:
                    raise _Corrupt(f"keys out of order at {key!r}")
                out[key] = value
                prev = key
        return out
    except _Corrupt as e:
        raise ValueError(f"{path}: corrupted checkpoint index: {e}") from None


# ---------------------------------------------------------------------------
# Tensor bundles

def read_bundle_index(prefix: str) -> tuple:
    """Return (BundleHeader, {tensor name: BundleEntry}) of checkpoint ``prefix``."""
    path = prefix + ".index"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint index {path} does not exist")
    table = read_table(path)
    if b"" not in table:
        raise ValueError(f"{path}: corrupted checkpoint index: no bundle header (empty key)")
    try:
        header = parse_header(table[b""])
    except _Corrupt as e:
        raise ValueError(f"{path}: corrupted bundle header: {e}") from None
    if header.num_shards < 1:
        raise ValueError(f"{path}: bundle header says num_shards={header.num_shards}")
    if header.endianness not in (0, 1):
        raise ValueError(f"{path}: bundle header has unknown endianness {header.endianness}")
    if header.min_consumer > TENSOR_BUNDLE_VERSION:
        raise ValueError(f"{path}: bundle needs reader version >= {header.min_consumer}; "
                         f"this reader supports version {TENSOR_BUNDLE_VERSION}")
    entries = {}
    for key, value in table.items():
        if key == b"":
            continue
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: corrupted checkpoint index: tensor name {key!r} is not UTF-8") from None
        try:
            entries[name] = parse_entry(value)
        except _Corrupt as e:
            raise ValueError(f"{path}: corrupted entry for tensor {name!r}: {e}") from None
    return header, entries


def data_file_name(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


class BundleReader:
    """Memory-mapped access to the tensors of one checkpoint."""

    def __init__(self, prefix: str, writable: bool = False):
        self.prefix, self.writable = prefix, writable      # writable: copy-on-write maps
        self.index_path = prefix + ".index"
        self.header, self.entries = read_bundle_index(prefix)
        self._maps = {}

    def _map(self, shard: int):
        if shard not in self._maps:
            path = data_file_name(self.prefix, shard, self.header.num_shards)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint data file {path} does not exist")
            if os.path.getsize(path) == 0:
                self._maps[shard] = (path, np.zeros(0, np.uint8))
            else:
                self._maps[shard] = (path, np.memmap(path, dtype=np.uint8, mode="c" if self.writable else "r"))
        return self._maps[shard]

    def raw(self, name: str, verify: bool = False) -> np.ndarray:
        """The tensor as stored (NumPy dtype of the TF dtype; bfloat16 comes back as raw uint16)."""
        e = self.entries[name]
        where = f"{self.index_path}: tensor {name!r}"
        if e.sliced:
            raise ValueError(f"{where} is stored as slices (partitioned variable); not supported")
        if e.dtype not in _NP_DTYPES:
            raise ValueError(f"{where} has unsupported dtype {_DT_NAMES.get(e.dtype, e.dtype)}")
        if not 0 <= e.shard_id < self.header.num_shards:
            raise ValueError(f"{where} is in shard {e.shard_id}, but the bundle has {self.header.num_shards}")
        dt = np.dtype(_NP_DTYPES[e.dtype]).newbyteorder("<" if self.header.endianness == 0 else ">")
        count = int(np.prod(e.shape, dtype=np.int64))
        if e.size != count * dt.itemsize:
            raise ValueError(f"{where}: entry size {e.size} bytes does not match shape {fmt_shape(e.shape)} "
                             f"x {dt.itemsize} bytes (corrupted index)")
        path, buf = self._map(e.shard_id)
        if e.offset < 0 or e.offset + e.size > buf.size:
            raise ValueError(f"{path}: tensor {name!r} occupies bytes [{e.offset}, {e.offset + e.size}) but the "
                             f"file has only {buf.size} bytes (truncated or wrong data file)")
        raw = buf[e.offset:e.offset + e.size]
        if verify:
            if e.crc32c is None:
                raise ValueError(f"{where} has no stored CRC-32C to verify")
            if _crc.crc32c(raw) != _crc.unmask(e.crc32c):
                raise ValueError(f"{path}: tensor {name!r} fails its CRC-32C check (data file is corrupted)")
        return np.ndarray(e.shape, dtype=dt, buffer=raw) if count else np.zeros(e.shape, dt)

    def read(self, name: str, verify: bool = False) -> np.ndarray:
        """The tensor; bfloat16 converted to float32, other dtypes as stored."""
        arr = self.raw(name, verify)
        if self.entries[name].dtype == DT_BFLOAT16:
            arr = bf16_to_f32(arr)
        return arr


def find_checkpoint_prefix(path: str) -> str:
    """Resolve a directory, an ``.index``/``.data-*`` file or a prefix to a checkpoint prefix."""
    path = os.fspath(path)
    if os.path.isdir(path):
        ckpt_file = os.path.join(path, "checkpoint")
        if os.path.isfile(ckpt_file):
            with open(ckpt_file, encoding="utf-8", errors="replace") as f:
                m = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', f.read(), re.M)
            if m:
                name = m.group(1)
                for cand in (name if os.path.isabs(name) else os.path.join(path, name),
                             os.path.join(path, os.path.basename(name))):
                    if os.path.isfile(cand + ".index"):
                        return cand
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
        if len(indexes) == 1:
            return os.path.join(path, indexes[0][:-len(".index")])
        if not indexes:
            raise FileNotFoundError(f"{path}: no TensorFlow checkpoint (*.index) in this directory")
        raise ValueError(f"{path}: several checkpoints {indexes} and no usable 'checkpoint' file; "
                         f"pass the prefix of the one to load")
    if path.endswith(".index"):
        prefix = path[:-len(".index")]
    else:
        m = re.match(r"^(.*)\.data-\d{5}-of-\d{5}$", path)
        prefix = m.group(1) if m else path
    if not os.path.isfile(prefix + ".index"):
        raise FileNotFoundError(f"TensorFlow checkpoint index {prefix}.index does not exist")
    return prefix


def read_hparams(path: str) -> GPTConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: an OpenAI GPT-2 checkpoint needs hparams.json "
                                f"(n_vocab, n_ctx, n_embd, n_head, n_layer) beside the checkpoint")
    hp = read_json_object(path, "hparams")
    try:
        return GPTConfig.from_hparams(hp)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid hparams: {e}") from None


def load_tf_checkpoint(path, verify: bool = False, writable: bool = False) -> tuple:
    """Load an OpenAI GPT-2 TensorFlow checkpoint.

    ``path`` is the directory (with ``hparams.json`` and one checkpoint), the
    checkpoint prefix (``.../model.ckpt``) or its ``.index`` file; hparams.json
    is looked up beside the checkpoint.  ``verify=True`` also checks every
    tensor's CRC-32C (about 2-3 s per 500 MB).

    Returns ``(GPTConfig, state_dict)`` where the state dict has the Hugging
    Face names/layouts of ``npgpt.io.layout``.  float32 and float64
    tensors are read-only memory-mapped views of the data file; half and
    bfloat16 are converted to float32.
    """
    path = os.fspath(path)
    if not os.path.exists(path) and not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    prefix = find_checkpoint_prefix(path)
    hparams_path = os.path.join(os.path.dirname(prefix) or ".", "hparams.json")
    if os.path.isdir(path):
        hparams_path = os.path.join(path, "hparams.json")
    config = read_hparams(hparams_path)
    reader = BundleReader(prefix, writable=writable)
    index = reader.index_path
    layers = [int(m.group(1)) for n in reader.entries if (m := _BLOCK_RE.match(n))]
    wte, wpe = ((n, reader.entries[n].shape) if n in reader.entries else None for n in ("model/wte", "model/wpe"))
    check_config_fits(config, layers, wte, wpe, index, hparams_path)   # before the table below grows with n_layer
    mapping = openai_param_map(config)

    problems = []
    for tf_name, (_, shape) in mapping.items():
        e = reader.entries.get(tf_name)
        if e is None:
            problems.append(f"tensor {tf_name!r} is missing (expected shape {fmt_shape(shape)})")
        elif tuple(e.shape) != shape and not (len(shape) == 3 and tuple(e.shape) == shape[1:]):
            problems.append(f"tensor {tf_name!r} has shape {fmt_shape(e.shape)}, expected {fmt_shape(shape)}")
        elif e.dtype not in (DT_FLOAT, DT_DOUBLE, DT_HALF, DT_BFLOAT16):
            problems.append(f"tensor {tf_name!r} has dtype {_DT_NAMES.get(e.dtype, e.dtype)}, expected a float type")
    unexpected = [n for n in reader.entries if n.startswith("model/") and n not in mapping
                  and not any(n.startswith(m + "/") for m in _parents(n, mapping))]
    if unexpected:
        problems.append(f"unexpected tensors under model/ {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise ValueError(f"{index}: checkpoint does not match {hparams_path} ({config.to_hparams()}): "
                         + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more problems" if len(problems) > 8 else ""))

    state = {}
    for tf_name, (hf_name, shape) in mapping.items():
        arr = reader.read(tf_name, verify)
        if len(shape) == 3:
            arr = arr.reshape(shape[1:])
        if arr.dtype not in (np.float32, np.float64) or not arr.dtype.isnative:
            arr = arr.astype(np.float32)      # half / bfloat16 / byte-swapped -> native float32
        state[hf_name] = arr
    return config, state


def _parents(name: str, mapping: dict):
    """Expected variable names that are path-prefixes of ``name`` (optimizer slots live under them)."""
    parts = name.split("/")
    return [p for p in ("/".join(parts[:k]) for k in range(2, len(parts))) if p in mapping]
