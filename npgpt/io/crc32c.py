"""CRC-32C (Castagnoli), as used by LevelDB tables and TensorFlow tensor bundles.

Pure Python + NumPy.  Small inputs go through a byte-at-a-time table loop; large
inputs are cut into many equal "lanes" whose CRCs are computed side by side with
vectorised slicing-by-4 table look-ups, and the lane CRCs are then merged with
the CRC's linearity (the register after ``n`` zero bytes is a linear map of the
starting register, which we precompute as byte-indexed tables).  This checks a
500 MB checkpoint in a few seconds without any compiled extension.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_POLY = 0x82F63B78          # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8    # LevelDB / TensorFlow CRC masking constant
_M32 = 0xFFFFFFFF


def _make_tables() -> np.ndarray:
    t0 = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        t0[i] = c
    tables = [t0]
    for _ in range(3):
        prev = tables[-1]
        tables.append((prev >> np.uint32(8)) ^ t0[prev & np.uint32(0xFF)])
    return np.stack(tables)


_TABLES = _make_tables()                 # (4, 256) uint32, slicing-by-4
_T0_LIST = [int(v) for v in _TABLES[0]]  # for the pure-Python path


def _raw_small(buf: memoryview, reg: int) -> int:
    """Advance the (un-inverted) CRC register over ``buf`` one byte at a time."""
    t = _T0_LIST
    for b in buf:
        reg = t[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


# ---------------------------------------------------------------------------
# Linear map "register after n zero bytes", as 32 columns and as 4 byte tables.

def _apply_cols(cols: tuple, x: int) -> int:
    out = 0
    j = 0
    while x:
        if x & 1:
            out ^= cols[j]
        x >>= 1
        j += 1
    return out


def _compose(a: tuple, b: tuple) -> tuple:
    """Columns of a∘b (apply b, then a)."""
    return tuple(_apply_cols(a, c) for c in b)


@lru_cache(maxsize=None)
def _zero_cols(n: int) -> tuple:
    """Columns of the linear map taking a register to the register after n zero bytes."""
    if n == 0:
        return tuple(1 << j for j in range(32))
    if n == 1:
        return tuple(_raw_small(memoryview(b"\x00"), 1 << j) for j in range(32))
    half = _zero_cols(n // 2)
    sq = _compose(half, half)
    return _compose(_zero_cols(1), sq) if n % 2 else sq


@lru_cache(maxsize=None)
def _zero_tables(n: int) -> np.ndarray:
    """(4, 256) tables: Z_n(x) = T[0][x&255] ^ T[1][x>>8&255] ^ T[2][x>>16&255] ^ T[3][x>>24]."""
    cols = np.array(_zero_cols(n), dtype=np.uint32)
    idx = np.arange(256, dtype=np.uint32)
    out = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for bit in range(8):
            sel = ((idx >> np.uint32(bit)) & np.uint32(1)).astype(bool)
            out[k, sel] ^= cols[8 * k + bit]
    return out


def _apply_zero(n: int, x):
    """Z_n applied to an int or a uint32 array."""
    t = _zero_tables(n)
    if isinstance(x, np.ndarray):
        m = np.uint32(0xFF)
        return (t[0][x & m] ^ t[1][(x >> np.uint32(8)) & m]
                ^ t[2][(x >> np.uint32(16)) & m] ^ t[3][x >> np.uint32(24)])
    return int(t[0][x & 0xFF] ^ t[1][(x >> 8) & 0xFF] ^ t[2][(x >> 16) & 0xFF] ^ t[3][x >> 24])


# ---------------------------------------------------------------------------

_SMALL = 4096               # below this many bytes: plain table loop
_SEGMENT = 1 << 24          # 16 MiB processed at a time (bounded temporary memory)


def _raw_lanes(seg: np.ndarray, lane_len: int) -> int:
    """Raw register (start 0) over ``seg`` (uint8, length = lanes*lane_len, lane_len % 4 == 0, lanes a power of 2)."""
    lanes = seg.size // lane_len
    words = np.ascontiguousarray(seg.view("<u4").reshape(lanes, lane_len // 4).T)  # (steps, lanes)
    t0, t1, t2, t3 = _TABLES
    m = np.uint32(0xFF)
    s8, s16, s24 = np.uint32(8), np.uint32(16), np.uint32(24)
    reg = np.zeros(lanes, dtype=np.uint32)
    for row in words:
        reg ^= row
        reg = t3[reg & m] ^ t2[(reg >> s8) & m] ^ t1[(reg >> s16) & m] ^ t0[reg >> s24]
    # merge neighbouring lanes pairwise: R(A||B) = Z_len(B)(R(A)) ^ R(B)
    length = lane_len
    while reg.size > 1:
        reg = _apply_zero(length, reg[0::2]) ^ reg[1::2]
        length *= 2
    return int(reg[0])


def _as_u8(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def extend(crc: int, data) -> int:
    """CRC-32C of (A || data) given crc = CRC-32C(A)."""
    arr = _as_u8(data)
    reg = (crc ^ _M32) & _M32
    n = arr.size
    pos = 0
    while n - pos >= _SMALL:
        seg_len = min(_SEGMENT, n - pos)
        lanes = 1 << min(12, (seg_len // 1024).bit_length() - 1)   # 1..4096 lanes of >= 1 KiB
        lane_len = (seg_len // lanes) & ~3
        used = lanes * lane_len
        reg = _apply_zero(used, reg) ^ _raw_lanes(arr[pos:pos + used], lane_len)
        pos += used
    if pos < n:
        reg = _raw_small(memoryview(arr[pos:]), reg)
    return reg ^ _M32


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object or NumPy array (its raw bytes)."""
    return extend(0, data)


def mask(crc: int) -> int:
    """LevelDB/TensorFlow masked CRC (what gets stored in files)."""
    return ((((crc >> 15) | (crc << 17)) & _M32) + _MASK_DELTA) & _M32


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & _M32
    return ((rot >> 17) | (rot << 15)) & _M32
