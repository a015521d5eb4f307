"""Checkpoint loading/saving/downloading (numpy only: no TensorFlow, no torch)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from npgpt.io import (DownloadError, cache_dir, download_file, ensure_downloaded, load_checkpoint,
                              load_hf_checkpoint, load_tf_checkpoint, openai_param_map, read_safetensors,
                              save_hf_checkpoint, save_safetensors)
from npgpt.io import crc32c as crcmod
from npgpt.io import download as dl
from npgpt.io import safetensors as st
from npgpt.io.tf_bundle import BundleReader, read_table
from npgpt.config import GPTConfig

FIX = Path(__file__).parent / "fixtures"
TINY_TF, TINY_HF, TINY_HUB = FIX / "tiny_tf", FIX / "tiny_hf", FIX / "tiny_hub"
TF_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
TINY = GPTConfig(n_vocab=101, n_ctx=32, n_embd=48, n_head=4, n_layer=2)


@pytest.fixture(scope="module")
def ref():
    z = np.load(FIX / "reference_f32.npz", allow_pickle=False)
    return {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}


def assert_matches_reference(state, ref):
    assert list(state) == list(ref)          # same names, in Hugging Face order
    for k, v in ref.items():
        assert state[k].dtype == np.float32, k
        assert state[k].shape == v.shape, k
        assert np.array_equal(state[k], v), k


# ---------------------------------------------------------------------------
# A minimal tensor-bundle writer (test helper) to make damaged variants.

def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb(field: int, wire: int, payload) -> bytes:
    key = _pb_varint(field << 3 | wire)
    if wire == 0:
        return key + _pb_varint(payload)
    if wire == 2:
        return key + _pb_varint(len(payload)) + payload
    if wire == 5:
        return key + payload.to_bytes(4, "little")
    raise ValueError(wire)


def _entry(dtype, shape, offset, size, crc) -> bytes:
    shape_msg = b"".join(_pb(2, 2, _pb(1, 0, d)) for d in shape)
    msg = _pb(1, 0, dtype) + _pb(2, 2, shape_msg)
    if offset:
        msg += _pb(4, 0, offset)
    return msg + _pb(5, 0, size) + _pb(6, 5, crc)


def _block(entries, restart_every=4) -> bytes:
    out = bytearray()
    restarts = []
    prev = b""
    for i, (k, v) in enumerate(entries):
        if i % restart_every == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(prev), len(k)) and prev[shared] == k[shared]:
                shared += 1
        out += _pb_varint(shared) + _pb_varint(len(k) - shared) + _pb_varint(len(v)) + k[shared:] + v
        prev = k
    if not restarts:
        restarts = [0]
    for r in restarts:
        out += r.to_bytes(4, "little")
    out += len(restarts).to_bytes(4, "little")
    return bytes(out)


def _with_trailer(block: bytes, ctype: int = 0) -> bytes:
    t = bytes([ctype])
    crc = crcmod.mask(crcmod.crc32c(block + t))
    return block + t + crc.to_bytes(4, "little")


def write_bundle(prefix, tensors: dict, block_entries=5, header_shards=1, compression=0):
    """Write a TF tensor bundle (float32 tensors) the way TensorFlow lays it out."""
    data = bytearray()
    kv = [(b"", _pb(1, 0, header_shards) + _pb(3, 2, _pb(1, 0, 1)))]
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        raw = arr.tobytes()
        kv.append((name.encode(), _entry(1, arr.shape, len(data), len(raw), crcmod.mask(crcmod.crc32c(raw)))))
        data += raw
    table = bytearray()
    index = []
    for i in range(0, len(kv), block_entries):
        chunk = kv[i:i + block_entries]
        blk = _block(chunk)
        index.append((chunk[-1][0] + b"\xff", _pb_varint(len(table)) + _pb_varint(len(blk))))
        table += _with_trailer(blk, compression)
    meta = _block([])
    meta_handle = _pb_varint(len(table)) + _pb_varint(len(meta))
    table += _with_trailer(meta)
    idx = _block(index, restart_every=1)
    idx_handle = _pb_varint(len(table)) + _pb_varint(len(idx))
    table += _with_trailer(idx)
    footer = (meta_handle + idx_handle).ljust(40, b"\x00") + (0xDB4775248B80FB57).to_bytes(8, "little")
    table += footer
    Path(str(prefix) + ".index").write_bytes(bytes(table))
    Path(str(prefix) + ".data-00000-of-00001").write_bytes(bytes(data))


def openai_tensors(ref, config=TINY):
    return {tf: ref[hf].reshape(shape) for tf, (hf, shape) in openai_param_map(config).items()}


def make_tf_dir(d: Path, tensors: dict, hparams=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "hparams.json").write_text(json.dumps(hparams or TINY.to_hparams()))
    write_bundle(d / "model.ckpt", tensors)
    return d


def copy_fixture(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------
# CRC-32C

def test_crc32c_known_values():
    assert crcmod.crc32c(b"") == 0
    assert crcmod.crc32c(b"123456789") == 0xE3069283
    assert crcmod.crc32c(b"\x00" * 32) == 0x8A9136AA
    assert crcmod.crc32c(bytes(range(32))) == 0x46DD794E
    for c in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert crcmod.unmask(crcmod.mask(c)) == c
    assert crcmod.mask(0) == 0xA282EAD8


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 70001, 1 << 20])
def test_crc32c_vectorised_path_matches_bytewise(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    slow = crcmod._raw_small(memoryview(data.tobytes()), 0xFFFFFFFF) ^ 0xFFFFFFFF
    assert crcmod.crc32c(data) == slow
    cut = n // 3
    assert crcmod.extend(crcmod.crc32c(data[:cut]), data[cut:]) == slow


def test_fixture_stores_masked_crc_of_raw_bytes():
    r = BundleReader(str(TINY_TF / "model.ckpt"))
    for name, e in r.entries.items():
        raw = r.raw(name).tobytes()
        assert e.crc32c == crcmod.mask(crcmod.crc32c(raw)), name


# ---------------------------------------------------------------------------
# Loading the real-format fixtures

@pytest.mark.parametrize("verify", [False, True])
def test_load_tf_fixture_matches_reference(ref, verify):
    config, state = load_tf_checkpoint(TINY_TF, verify=verify)
    assert config == TINY
    assert_matches_reference(state, ref)
    assert list(state) == list(ref)


def test_tf_bundle_header_and_entries():
    r = BundleReader(str(TINY_TF / "model.ckpt"))
    assert r.header.num_shards == 1 and r.header.endianness == 0
    assert r.entries["model/h0/attn/c_attn/w"].shape == (1, 48, 144)
    assert r.entries["model/wte"].shape == (101, 48)


@pytest.mark.parametrize("fixture", [TINY_HF, TINY_HUB])
def test_load_hf_fixtures_match_reference(ref, fixture):
    config, state = load_hf_checkpoint(fixture)
    assert config == TINY
    assert_matches_reference(state, ref)
    config2, state2 = load_hf_checkpoint(fixture / "model.safetensors", mmap=False)
    assert config2 == TINY
    assert_matches_reference(state2, ref)
    assert state2["transformer.wte.weight"].flags.writeable


def test_hub_fixture_has_mask_buffers_that_are_skipped():
    tensors, _ = read_safetensors(TINY_HUB / "model.safetensors")
    assert "h.0.attn.bias" in tensors and "h.0.ln_1.weight" in tensors
    _, state = load_hf_checkpoint(TINY_HUB)
    assert not any(re.search(r"\.h\.\d+\.attn\.(bias|masked_bias)$", k) for k in state)
    assert len(state) == 28


@pytest.mark.parametrize("rel", ["tiny_tf", "tiny_tf/model.ckpt", "tiny_tf/model.ckpt.index",
                                 "tiny_tf/model.ckpt.data-00000-of-00001", "tiny_hf", "tiny_hub",
                                 "tiny_hf/model.safetensors"])
def test_load_checkpoint_detects_format(ref, rel):
    config, state = load_checkpoint(str(FIX / rel), verify=True)
    assert config == TINY
    assert_matches_reference(state, ref)


def test_load_tf_prefix_without_checkpoint_file(tmp_path, ref):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    (d / "checkpoint").unlink()
    (d / "model.ckpt.meta").unlink(missing_ok=True)
    assert_matches_reference(load_tf_checkpoint(d)[1], ref)


def test_memory_mapped_by_default():
    _, state = load_hf_checkpoint(TINY_HF)
    w = state["transformer.wte.weight"]
    assert not w.flags.writeable
    base = w
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)


# ---------------------------------------------------------------------------
# Own bundle writer agrees with the real fixture; tolerated extras

def test_written_bundle_roundtrip(tmp_path, ref):
    d = make_tf_dir(tmp_path / "w", openai_tensors(ref))
    config, state = load_tf_checkpoint(d, verify=True)
    assert config == TINY
    assert_matches_reference(state, ref)
    assert read_table(str(d / "model.ckpt.index")).keys() == read_table(str(TINY_TF / "model.ckpt.index")).keys()


def test_non_model_tensors_and_optimizer_slots_are_ignored(tmp_path, ref):
    t = openai_tensors(ref)
    t["global_step"] = np.zeros((), np.float32)
    t["beta1_power"] = np.ones((), np.float32)
    t["model/wte/Adam"] = np.zeros((101, 48), np.float32)
    t["model/h1/mlp/c_fc/w/Adam_1"] = np.zeros((1, 48, 192), np.float32)
    _, state = load_tf_checkpoint(make_tf_dir(tmp_path / "x", t), verify=True)
    assert_matches_reference(state, ref)


# ---------------------------------------------------------------------------
# Damaged TF inputs: clear ValueError/OSError naming file and tensor

def test_truncated_data_file(tmp_path):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    data = d / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.ckpt\.data-00000-of-00001.*tensor 'model/.*truncated"):
        load_tf_checkpoint(d)


def test_missing_data_file(tmp_path):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    (d / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(FileNotFoundError, match="model.ckpt.data-00000-of-00001"):
        load_tf_checkpoint(d)


def test_corrupted_data_detected_by_crc(tmp_path, ref):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    entry = BundleReader(str(d / "model.ckpt")).entries["model/wpe"]
    data = d / "model.ckpt.data-00000-of-00001"
    b = bytearray(data.read_bytes())
    b[entry.offset + 10] ^= 0x40
    data.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"tensor 'model/wpe' fails its CRC-32C"):
        load_tf_checkpoint(d, verify=True)
    _, state = load_tf_checkpoint(d, verify=False)     # without verify it loads the damaged bytes
    assert not np.array_equal(state["transformer.wpe.weight"], ref["transformer.wpe.weight"])


def test_every_single_byte_flip_of_the_index_is_detected(tmp_path):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    index = d / "model.ckpt.index"
    good = index.read_bytes()
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        index.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="model.ckpt.index"):
            load_tf_checkpoint(d)


@pytest.mark.parametrize("keep", [0, 10, 47, 48, 200, -1])
def test_truncated_index(tmp_path, keep):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    index = d / "model.ckpt.index"
    good = index.read_bytes()
    index.write_bytes(good[:keep] if keep >= 0 else good[:-1])
    with pytest.raises(ValueError, match=r"model\.ckpt\.index"):
        load_tf_checkpoint(d)


def test_compressed_index_block_is_rejected(tmp_path, ref):
    d = tmp_path / "w"
    make_tf_dir(d, {})
    write_bundle(d / "model.ckpt", openai_tensors(ref), compression=1)
    with pytest.raises(ValueError, match=r"model\.ckpt\.index.*compressed \(snappy\)"):
        load_tf_checkpoint(d)


@pytest.mark.parametrize("change,pattern", [
    ({"n_embd": 64}, r"tensor 'model/wte' has shape \(101, 48\), expected \(101, 64\)"),
    ({"n_vocab": 100}, r"tensor 'model/wte' has shape \(101, 48\), expected \(100, 48\)"),
    ({"n_layer": 3}, r"n_layer=3 but the file holds blocks \[0, 1\]"),
    ({"n_layer": 1}, r"n_layer=1 but the file holds blocks \[0, 1\]"),
    ({"n_ctx": 64}, r"tensor 'model/wpe' has shape \(32, 48\), expected \(64, 48\)"),
])
def test_hparams_disagree_with_tensors(tmp_path, change, pattern):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    hp = json.loads((d / "hparams.json").read_text())
    hp.update(change)
    (d / "hparams.json").write_text(json.dumps(hp))
    with pytest.raises(ValueError, match=r"model\.ckpt\.index.*hparams\.json.*" + pattern):
        load_tf_checkpoint(d)


def test_missing_hparams(tmp_path):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    (d / "hparams.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"hparams\.json"):
        load_tf_checkpoint(d)
    with pytest.raises(FileNotFoundError, match=r"hparams\.json"):
        load_checkpoint(str(d / "model.ckpt"))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"n_vocab": 101}', '{"n_vocab": 101, "n_ctx": 32, '
                                  '"n_embd": 48, "n_head": 5, "n_layer": 2}'])
def test_invalid_hparams(tmp_path, text):
    d = copy_fixture(TINY_TF, tmp_path / "c")
    (d / "hparams.json").write_text(text)
    with pytest.raises(ValueError, match=r"hparams\.json"):
        load_tf_checkpoint(d)


def test_tensor_missing(tmp_path, ref):
    t = openai_tensors(ref)
    del t["model/h1/mlp/c_proj/b"]
    d = make_tf_dir(tmp_path / "w", t)
    with pytest.raises(ValueError, match=r"model\.ckpt\.index.*tensor 'model/h1/mlp/c_proj/b' is missing"):
        load_tf_checkpoint(d)


def test_tensor_wrong_shape(tmp_path, ref):
    t = openai_tensors(ref)
    t["model/h0/attn/c_attn/w"] = np.zeros((1, 48, 143), np.float32)
    d = make_tf_dir(tmp_path / "w", t)
    with pytest.raises(ValueError, match=r"tensor 'model/h0/attn/c_attn/w' has shape \(1, 48, 143\), "
                                         r"expected \(1, 48, 144\)"):
        load_tf_checkpoint(d)


def test_conv_weights_without_leading_one_are_accepted(tmp_path, ref):
    t = {k: (v[0] if v.ndim == 3 else v) for k, v in openai_tensors(ref).items()}
    _, state = load_tf_checkpoint(make_tf_dir(tmp_path / "w", t))
    assert_matches_reference(state, ref)


def test_several_checkpoints_in_directory_need_a_prefix(tmp_path, ref):
    d = make_tf_dir(tmp_path / "w", openai_tensors(ref))
    write_bundle(d / "other.ckpt", openai_tensors(ref))
    with pytest.raises(ValueError, match="several checkpoints"):
        load_tf_checkpoint(d)
    assert_matches_reference(load_tf_checkpoint(d / "other.ckpt")[1], ref)


# ---------------------------------------------------------------------------
# safetensors

def test_safetensors_roundtrip_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal(7),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "i32": np.arange(3, dtype=np.int32),
        "u8": np.arange(5, dtype=np.uint8),
        "b": np.array([True, False, True]),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((4, 3)).astype(np.float32)),
        "bigendian": np.arange(4, dtype=">f4"),
    }
    p = tmp_path / "t.safetensors"
    save_safetensors(p, tensors, metadata={"format": "pt", "note": "hi"})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")
    for mm in (True, False):
        out, meta = read_safetensors(p, mmap=mm)
        assert meta == {"format": "pt", "note": "hi"}
        assert list(out) == list(tensors)
        for k, v in tensors.items():
            v = np.asarray(v)
            assert out[k].shape == v.shape, k
            assert out[k].dtype == v.dtype.newbyteorder("<"), k
            assert np.array_equal(out[k], v), k
    assert [f for f in os.listdir(tmp_path)] == ["t.safetensors"]


def _write_raw_safetensors(path, header: dict, data: bytes, pad=True):
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    Path(path).write_bytes(len(h).to_bytes(8, "little") + h + data)


def test_safetensors_bf16_is_converted_to_float32(tmp_path):
    vals = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    bf = (vals.view(np.uint32) >> 16).astype("<u2")
    p = tmp_path / "bf.safetensors"
    _write_raw_safetensors(p, {"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, bf.tobytes(), pad=False)
    out, _ = read_safetensors(p)
    assert out["x"].dtype == np.float32 and np.array_equal(out["x"], vals)


@pytest.mark.parametrize("header,data,pattern", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, b"\0" * 16, r"tensor 'w'.*outside the data"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 16, r"tensor 'w'.*outside the data"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, r"tensor 'w'.*needs 16"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 16, r"overlap"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, r"tensor 'w'.*unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, r"tensor 'w'.*invalid shape"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, r"tensor 'w'.*data_offsets"),
    ({"__metadata__": {"a": 1}}, b"", r"__metadata__"),
])
def test_safetensors_invalid_headers(tmp_path, header, data, pattern):
    p = tmp_path / "bad.safetensors"
    _write_raw_safetensors(p, header, data)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*" + pattern):
        read_safetensors(p)


def test_safetensors_bad_header_length_and_json(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*header length"):
        read_safetensors(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*too short"):
        read_safetensors(p)
    p.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*not valid JSON"):
        read_safetensors(p)


def test_hf_truncated_safetensors(tmp_path):
    d = copy_fixture(TINY_HF, tmp_path / "h")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'transformer\..*'.*outside the data section"):
        load_hf_checkpoint(d)


# ---------------------------------------------------------------------------
# Hugging Face layouts and save round trip

def test_save_hf_roundtrip(tmp_path, ref):
    config, state = load_tf_checkpoint(TINY_TF)
    out = save_hf_checkpoint(tmp_path / "native", config, state)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert [f for f in os.listdir(tmp_path) if f != "native"] == []
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_ctx"], cfg["n_embd"], cfg["n_head"], cfg["n_layer"]) == \
        (101, 32, 32, 48, 4, 2)
    assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True
    assert cfg["layer_norm_epsilon"] == 1e-5
    tensors, meta = read_safetensors(tmp_path / "native" / "model.safetensors")
    assert meta == {"format": "pt"}
    assert all(k.startswith("transformer.") for k in tensors) and "lm_head.weight" not in tensors
    config2, state2 = load_hf_checkpoint(out)
    assert config2 == config
    assert_matches_reference(state2, ref)
    assert load_checkpoint(str(out))[0] == config


def test_save_hf_preserves_dropout_and_accepts_bare_names(tmp_path, ref):
    config = GPTConfig(**TINY.to_hparams(), dropout=0.1)
    bare = {k[len("transformer."):]: v for k, v in ref.items()}
    save_hf_checkpoint(tmp_path / "n", config, bare)
    config2, state2 = load_hf_checkpoint(tmp_path / "n")
    assert config2 == config
    assert_matches_reference(state2, ref)


def test_save_hf_overwrites_existing_directory(tmp_path, ref):
    d = tmp_path / "n"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"old junk")
    (d / "tokenizer.json").write_text("{}")
    save_hf_checkpoint(d, TINY, ref)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_matches_reference(load_hf_checkpoint(d)[1], ref)


def test_save_hf_rejects_wrong_state_dict(tmp_path, ref):
    bad = dict(ref)
    bad["transformer.wpe.weight"] = np.zeros((31, 48), np.float32)
    with pytest.raises(ValueError, match=r"tensor 'transformer\.wpe\.weight' has shape \(31, 48\)"):
        save_hf_checkpoint(tmp_path / "n", TINY, bad)
    bad = dict(ref)
    del bad["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match=r"'transformer\.ln_f\.bias' is missing"):
        save_hf_checkpoint(tmp_path / "n", TINY, bad)
    assert not (tmp_path / "n").exists()


def test_interrupted_save_leaves_nothing(tmp_path, ref, monkeypatch):
    real = st._write_safetensors_to

    def boom(f, tensors, metadata, dtypes=None):
        real(f, dict(list(tensors.items())[:3]), metadata)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(st, "_write_safetensors_to", boom)
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(tmp_path / "new", TINY, ref)
    assert os.listdir(tmp_path) == []
    # into an existing checkpoint: the old files stay intact, no temp files remain
    monkeypatch.setattr(st, "_write_safetensors_to", real)
    save_hf_checkpoint(tmp_path / "old", TINY, ref)
    before = {f: (tmp_path / "old" / f).read_bytes() for f in os.listdir(tmp_path / "old")}
    monkeypatch.setattr(st, "_write_safetensors_to", boom)
    zeros = {k: np.zeros_like(v) for k, v in ref.items()}
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(tmp_path / "old", TINY, zeros)
    assert {f: (tmp_path / "old" / f).read_bytes() for f in os.listdir(tmp_path / "old")} == before
    assert os.listdir(tmp_path) == ["old"]


def test_hf_untied_lm_head_is_rejected(tmp_path, ref):
    d = tmp_path / "h"
    d.mkdir()
    shutil.copy(TINY_HF / "config.json", d / "config.json")
    tensors = dict(ref)
    tensors["lm_head.weight"] = ref["transformer.wte.weight"] + 1
    save_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"lm_head\.weight.*untied"):
        load_hf_checkpoint(d)
    tensors["lm_head.weight"] = ref["transformer.wte.weight"].copy()
    save_safetensors(d / "model.safetensors", tensors)
    assert_matches_reference(load_hf_checkpoint(d)[1], ref)


def test_hf_config_disagrees_with_tensors(tmp_path):
    d = copy_fixture(TINY_HF, tmp_path / "h")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layer"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors.*config\.json.*n_layer=3 but the file holds blocks \[0, 1\]"):
        load_hf_checkpoint(d)


@pytest.mark.parametrize("change,pattern", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"model_type": "llama"}, "model_type"),
    ({"vocab_size": None}, "missing"),
    ({"n_positions": None, "n_ctx": 32}, None),
])
def test_hf_config_checks(tmp_path, ref, change, pattern):
    d = copy_fixture(TINY_HF, tmp_path / "h")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    if pattern is None:
        assert_matches_reference(load_hf_checkpoint(d)[1], ref)
    else:
        with pytest.raises(ValueError, match=r"config\.json.*" + pattern):
            load_hf_checkpoint(d)


def test_hf_missing_config_and_weights(tmp_path):
    d = copy_fixture(TINY_HF, tmp_path / "h")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_checkpoint(d)
    e = tmp_path / "e"
    e.mkdir()
    (e / "config.json").write_text("{}")
    (e / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*pickles never"):
        load_hf_checkpoint(e)
    with pytest.raises(ValueError, match="pickle"):
        load_hf_checkpoint(e / "pytorch_model.bin")


def test_hf_extra_tensor_is_rejected(tmp_path, ref):
    d = tmp_path / "h"
    d.mkdir()
    shutil.copy(TINY_HF / "config.json", d / "config.json")
    save_safetensors(d / "model.safetensors", {**ref, "score.weight": np.zeros((2, 48), np.float32)})
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensors \['score\.weight'\]"):
        load_hf_checkpoint(d)


def test_sharded_hf_checkpoint(tmp_path, ref):
    d = tmp_path / "h"
    d.mkdir()
    shutil.copy(TINY_HF / "config.json", d / "config.json")
    names = list(ref)
    save_safetensors(d / "model-00001-of-00002.safetensors", {k: ref[k] for k in names[:10]})
    save_safetensors(d / "model-00002-of-00002.safetensors", {k: ref[k] for k in names[10:]})
    wm = {k: ("model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors")
          for i, k in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert_matches_reference(load_checkpoint(str(d))[1], ref)


# ---------------------------------------------------------------------------
# Paths and formats

def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tf_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")


def test_unknown_format(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_checkpoint(str(tmp_path / "weights.npz"))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "h"))
    assert cache_dir() == str(tmp_path / "h")
    monkeypatch.delenv("NPGPT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / ".cache" / "npgpt")


def test_unknown_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="unknown model name 'gpt5'"):
        ensure_downloaded("gpt5")


# ---------------------------------------------------------------------------
# Downloads against a local HTTP server

class FileServer:
    """Serves {url path: bytes} on 127.0.0.1 with Range support and failure modes per path:
    'cut_once' (first response stops half-way), 'always_cut', 'bad_length' (Content-Length
    1000 bytes too large), 'no_range' (ignores Range, always 200), '404'."""

    def __init__(self, files):
        self.files = dict(files)
        self.modes = {}
        self.requests = []
        self.cut_done = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                owner.requests.append((self.path, rng))
                data = owner.files.get(self.path)
                mode = owner.modes.get(self.path, "normal")
                if data is None or mode == "404":
                    self.send_error(404)
                    return
                start = 0
                if rng and mode != "no_range":
                    start = int(re.match(r"bytes=(\d+)-$", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body) + (1000 if mode == "bad_length" else 0)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if mode == "always_cut" or (mode == "cut_once" and self.path not in owner.cut_done):
                    owner.cut_done.add(self.path)
                    self.wfile.write(body[:max(1, len(body) // 2)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dl, "BACKOFF", 0.0)
    files = {f"/{size}/{f}": (TINY_TF / f).read_bytes() for size in ("124M",) for f in TF_FILES}
    files["/blob.bin"] = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    s = FileServer(files)
    yield s
    s.stop()


def test_download_with_progress(server, tmp_path, capsys):
    dest = tmp_path / "d" / "blob.bin"
    assert download_file(server.url + "/blob.bin", str(dest), desc="blobfile") == str(dest)
    assert dest.read_bytes() == server.files["/blob.bin"]
    assert os.listdir(tmp_path / "d") == ["blob.bin"]
    err = capsys.readouterr().err
    assert "blobfile" in err and "100%" in err


def test_download_resumes_after_cut(server, tmp_path):
    server.modes["/blob.bin"] = "cut_once"
    dest = tmp_path / "blob.bin"
    download_file(server.url + "/blob.bin", str(dest), progress=False)
    assert dest.read_bytes() == server.files["/blob.bin"]
    reqs = [r for p, r in server.requests if p == "/blob.bin"]
    assert len(reqs) == 2 and reqs[0] is None
    m = re.match(r"bytes=(\d+)-$", reqs[1])
    assert m and 0 < int(m.group(1)) < len(server.files["/blob.bin"])
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(b"x" * 5000)       # stale partial file
    server.modes["/blob.bin"] = "no_range"
    download_file(server.url + "/blob.bin", str(dest), progress=False)
    assert dest.read_bytes() == server.files["/blob.bin"]
    assert server.requests[-1] == ("/blob.bin", "bytes=5000-")


def test_download_gives_up_but_keeps_partial_then_resumes(server, tmp_path):
    server.modes["/blob.bin"] = "always_cut"
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match=r"/blob\.bin: download failed after 3 attempts.*kept"):
        download_file(server.url + "/blob.bin", str(dest), retries=2, progress=False)
    part = Path(str(dest) + ".part")
    assert part.exists() and not dest.exists()
    have = part.stat().st_size
    server.modes["/blob.bin"] = "normal"
    download_file(server.url + "/blob.bin", str(dest), progress=False)
    assert dest.read_bytes() == server.files["/blob.bin"]
    assert server.requests[-1] == ("/blob.bin", f"bytes={have}-")


def test_download_size_mismatch_leaves_nothing(server, tmp_path):
    server.modes["/blob.bin"] = "bad_length"
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match=r"/blob\.bin: size mismatch"):
        download_file(server.url + "/blob.bin", str(dest), progress=False)
    assert os.listdir(tmp_path) == []


def test_download_partial_larger_than_file_is_a_mismatch(server, tmp_path):
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(b"x" * 400_000)
    with pytest.raises(DownloadError, match="size mismatch"):
        download_file(server.url + "/blob.bin", str(dest), progress=False)
    assert os.listdir(tmp_path) == []


def test_download_404(server, tmp_path):
    dest = tmp_path / "missing.bin"
    with pytest.raises(DownloadError, match=r"/nothing/here\.bin: HTTP 404"):
        download_file(server.url + "/nothing/here.bin", str(dest), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def tiny_release(monkeypatch):
    """The tiny TF fixture stands for OpenAI's 124M release: its sizes and hashes pinned, its shape gpt2's."""
    import hashlib
    from npgpt.config import PRESETS
    monkeypatch.setitem(dl.RELEASE, "124M", {f: ((TINY_TF / f).stat().st_size,
                                                 hashlib.sha256((TINY_TF / f).read_bytes()).hexdigest())
                                             for f in TF_FILES})
    monkeypatch.setitem(PRESETS, "gpt2", TINY.to_hparams())


def test_ensure_downloaded_end_to_end(server, tiny_release, tmp_path, monkeypatch, ref):
    monkeypatch.setenv("NPGPT_BASE_URL", server.url)
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "cache"))
    server.modes["/124M/model.ckpt.data-00000-of-00001"] = "cut_once"
    native = ensure_downloaded("gpt2", progress=False)
    assert native == str(tmp_path / "cache" / "gpt2")
    assert sorted(os.listdir(native)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path / "cache" / "openai" / "124M")) == sorted(TF_FILES)
    for f in TF_FILES:
        assert (tmp_path / "cache" / "openai" / "124M" / f).read_bytes() == (TINY_TF / f).read_bytes()
    assert len(server.requests) == 4            # three files, one of them resumed once
    config, state = load_checkpoint("gpt2")
    assert config == TINY
    assert_matches_reference(state, ref)

    # second time: no network at all
    server.stop()
    import requests

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(requests.Session, "request", no_network)
    monkeypatch.setattr(requests, "get", no_network)
    assert ensure_downloaded("gpt2") == native
    assert ensure_downloaded("124M") == native
    assert_matches_reference(load_checkpoint("124M")[1], ref)


def test_ensure_downloaded_404_creates_no_native_dir(server, tiny_release, tmp_path, monkeypatch):
    monkeypatch.setenv("NPGPT_BASE_URL", server.url)
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "cache"))
    server.modes["/124M/model.ckpt.index"] = "404"
    with pytest.raises(DownloadError, match=r"/124M/model\.ckpt\.index: HTTP 404"):
        ensure_downloaded("gpt2", progress=False)
    assert not (tmp_path / "cache" / "gpt2").exists()


def test_ensure_downloaded_damaged_download_is_not_converted(server, tiny_release, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.RELEASE, "124M", {})        # no pinned hash: the bundle's CRC-32Cs catch the flip
    monkeypatch.setenv("NPGPT_BASE_URL", server.url)
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "cache"))
    data = bytearray(server.files["/124M/model.ckpt.data-00000-of-00001"])
    data[1234] ^= 1
    server.files["/124M/model.ckpt.data-00000-of-00001"] = bytes(data)
    with pytest.raises(DownloadError, match=r"openai/124M are not OpenAI's 124M.*CRC-32C.*deleted them"):
        ensure_downloaded("gpt2", progress=False)
    assert not (tmp_path / "cache" / "gpt2").exists()
    assert os.listdir(tmp_path / "cache" / "openai" / "124M") == []


def test_ensure_downloaded_offline(tmp_path, monkeypatch):
    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("NPGPT_BASE_URL", f"http://127.0.0.1:{port}/models")
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "BACKOFF", 0.0)
    monkeypatch.setattr(dl, "RETRIES", 1)
    with pytest.raises(DownloadError) as ei:
        load_checkpoint("gpt2-medium")
    msg = str(ei.value)
    assert ei.value.offline
    for f in TF_FILES:
        assert f"http://127.0.0.1:{port}/models/355M/{f}" in msg
        assert os.path.join(str(tmp_path / "cache"), "openai", "355M", f) in msg
    assert "local checkpoint" in msg
    assert not (tmp_path / "cache" / "gpt2-medium").exists()


@pytest.mark.parametrize("fixture,weights", [(TINY_HF, "model.safetensors"),
                                             (TINY_TF, "model.ckpt.data-00000-of-00001")])
def test_from_pretrained_maps_copy_on_write(tmp_path, fixture, weights):
    """from_pretrained adopts copy-on-write maps of the weights file: parameters are writable,
    and writing them (training) never changes the file."""
    import hashlib
    import shutil

    import npgpt
    d = tmp_path / "m"
    shutil.copytree(fixture, d)
    digest = hashlib.sha256((d / weights).read_bytes()).hexdigest()
    model = npgpt.load_model(d)
    ref = np.load(FIX / "reference_f32.npz")
    wte = model.state_dict()["transformer.wte.weight"]
    assert np.array_equal(wte, ref["param/transformer.wte.weight"]) and wte.flags.writeable
    for p in model.parameters():
        p.data += 1.0
    assert hashlib.sha256((d / weights).read_bytes()).hexdigest() == digest
    again = npgpt.load_model(d)
    assert np.array_equal(again.state_dict()["transformer.wte.weight"], ref["param/transformer.wte.weight"])
    assert np.array_equal(model.state_dict()["transformer.wte.weight"], ref["param/transformer.wte.weight"] + 1.0)


@pytest.mark.parametrize("fixture", ["tiny_tf", "tiny_hf", "tiny_hub"])
def test_from_pretrained_logits_match_pytorch(fixture, backend):
    """Each real-format checkpoint (written by TensorFlow, by transformers' save_pretrained, and in
    the hub layout) loads into a model whose logits match PyTorch's reference."""
    import npgpt
    ref = np.load(FIX / "reference_f32.npz")
    model = npgpt.load_model(FIX / fixture)
    logits = model.forward(ref["idx"])
    scale = np.abs(ref["logits"]).max()
    assert logits.dtype == np.float32
    assert np.abs(logits - ref["logits"]).max() <= 1e-5 * scale


def test_float64_model_save_load_exact(tmp_path):
    import npgpt
    cfg = npgpt.GPTConfig(n_vocab=17, n_ctx=8, n_embd=8, n_head=2, n_layer=1)
    model = npgpt.GPT(cfg, dtype=np.float64, seed=3)
    npgpt.save_model(model, tmp_path / "m64")
    again = npgpt.load_model(tmp_path / "m64", dtype=np.float64)
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert b.data.dtype == np.float64 and np.array_equal(a.data, b.data), n
    assert not again.training                                   # from_pretrained returns eval mode


def test_save_into_existing_dir_replaces_pair_and_keeps_other_files(tmp_path):
    import npgpt
    cfg = npgpt.GPTConfig(n_vocab=17, n_ctx=8, n_embd=8, n_head=2, n_layer=1)
    d = tmp_path / "m"
    npgpt.save_model(npgpt.GPT(cfg, seed=1), d)
    (d / "tokenizer.json").write_text("{}")
    cfg2 = npgpt.GPTConfig(n_vocab=17, n_ctx=8, n_embd=8, n_head=2, n_layer=2)
    model2 = npgpt.GPT(cfg2, seed=2)
    npgpt.save_model(model2, d)
    loaded = npgpt.load_model(d)
    assert loaded.config.n_layer == 2 and (d / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old directories left
