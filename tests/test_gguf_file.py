"""Our GGUF reader against files written by the `gguf` package: metadata, the tensor table, every
tensor type a checkpoint uses, bad files; and model weights through `models.from_pretrained`."""

from __future__ import annotations

import numpy as np
import pytest

from catjax import models
from catjax.gguf_file import GGUFFile, read_metadata
from catjax.models import gguf_io, hf


def _write(path, endian="LITTLE", fields=(), tensors=(), alignment=None):
    """`tensors`: (name, float32 array, ggml type name); quantised ones go through gguf.quants."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama", endianess=gguf.GGUFEndian[endian])
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype) in dict(fields).items():
        w.add_key_value(key, value, vtype)
    for name, array, type_name in tensors:
        qtype = gguf.GGMLQuantizationType[type_name]
        if type_name in ("F32", "F16"):
            w.add_tensor(name, array.astype(np.float32 if type_name == "F32" else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_metadata_round_trip(tmp_path, endian):
    import gguf

    T = gguf.GGUFValueType
    fields = {"a.u32": (7, T.UINT32), "a.i64": (-3, T.INT64), "a.f32": (0.5, T.FLOAT32),
              "a.bool": (True, T.BOOL), "a.str": ("héllo {{ x }}", T.STRING),
              "a.ints": ([1, -2, 3], T.ARRAY), "a.strs": (["x", "", "ü z"], T.ARRAY),
              "a.floats": ([0.25, 1.5], T.ARRAY)}
    meta = read_metadata(_write(tmp_path / "m.gguf", endian, fields))
    assert meta["general.architecture"] == "llama"
    for key, (value, _) in fields.items():
        assert meta[key] == value, key


def test_tensors_equal_the_gguf_packages_reading(tmp_path):
    """Every type llama.cpp checkpoints commonly carry, a custom alignment, rows that are not a
    multiple of anything: shapes, offsets and values as `gguf.GGUFReader` and `gguf.quants` read
    them, and close to what was written."""
    import gguf

    rng = np.random.default_rng(0)
    written = {
        "f32": (rng.standard_normal((3, 5)), "F32"),
        "f16": (rng.standard_normal((2, 3, 7)), "F16"),
        "bf16": (rng.standard_normal((4, 6)), "BF16"),
        "q8": (rng.standard_normal((3, 64)), "Q8_0"),
        "q41": (rng.standard_normal((5, 32)), "Q4_1"),
        "q50": (rng.standard_normal((2, 96)), "Q5_0"),
        "vec": (rng.standard_normal(9), "F32"),
    }
    path = _write(tmp_path / "t.gguf", alignment=64, tensors=[
        (n, a.astype(np.float32), t) for n, (a, t) in written.items()])
    written = {n: (a.astype(np.float32), t) for n, (a, t) in written.items()}
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.tensors) == [t.name for t in ref.tensors] == list(written)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == written[t.name][0].shape
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes), t.name
        assert ours.type_name(t.name) == written[t.name][1]
        got = ours.array(t.name)
        assert got.dtype == np.float32
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
        np.testing.assert_array_equal(got, want)
        atol = {"F32": 0, "F16": 3e-3, "BF16": 3e-2, "Q8_0": 3e-2}.get(written[t.name][1], 0.3)
        np.testing.assert_allclose(got, written[t.name][0], atol=atol, rtol=0, err_msg=t.name)


def test_big_endian_float_tensors_and_quantised_refused(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    path = _write(tmp_path / "be.gguf", "BIG", tensors=[("a", a, "F32"), ("h", a, "F16")])
    f = GGUFFile(path)
    np.testing.assert_array_equal(f.array("a"), a)
    np.testing.assert_allclose(f.array("h"), a, rtol=1e-3)


def test_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML....")
    with pytest.raises(ValueError, match="x.gguf: not a GGUF file"):
        read_metadata(bad)
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="x.gguf: GGUF metadata is truncated"):
        read_metadata(bad)
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="x.gguf: GGUF metadata is truncated"):
        read_metadata(bad)
    bad.write_bytes(b"GGUF\x01\x00\x00\x00" + bytes(16))
    with pytest.raises(ValueError, match="x.gguf: GGUF version 1 is too old"):
        read_metadata(bad)

    good = _write(tmp_path / "g.gguf", tensors=[("w", np.ones((4, 32), np.float32), "Q8_0")])
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-40])  # a download that stopped short (past the end padding)
    with pytest.raises(ValueError, match=r"cut.gguf: tensor 'w' runs past the end of the file"):
        GGUFFile(cut)
    assert read_metadata(cut)["general.architecture"] == "llama"  # a tokenizer still loads
    table = data.index(b"\x01" + bytes(7) + b"w")  # the tensor table: name length, then "w"
    cut.write_bytes(data[:table + 12])
    with pytest.raises(ValueError, match="cut.gguf: GGUF tensor table is truncated"):
        GGUFFile(cut)


def _raw_gguf(kvs: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors + bytes(64)


def _gguf_str(text: str) -> bytes:
    import struct

    return struct.pack("<Q", len(text)) + text.encode()


def test_crafted_headers_are_one_line_errors(tmp_path):
    """Headers no writer makes but a corrupt or hostile file can hold: each is a ValueError
    naming the file, not a ZeroDivisionError, a RecursionError or a shape wrapped in int64."""
    import struct

    import gguf

    path = tmp_path / "c.gguf"
    u32 = gguf.GGUFValueType.UINT32
    _write(path, fields={"general.alignment": (0, u32)},
           tensors=[("w", np.ones((2, 4), np.float32), "F32")])
    with pytest.raises(ValueError, match=r"c.gguf: GGUF general.alignment=0 must be a positive"):
        GGUFFile(path)
    nested = _gguf_str("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 10 + \
        struct.pack("<IQ", 4, 0)  # arrays of arrays, ten deep, then an empty uint32 array
    path.write_bytes(_raw_gguf(nested, n_kv=1))
    with pytest.raises(ValueError, match="c.gguf: GGUF metadata nests arrays more than 4 deep"):
        read_metadata(path)
    # 2**40 x 2**24 float32 elements: 2**66 bytes, 0 once wrapped in int64.
    huge = _gguf_str("w") + struct.pack("<I2QIQ", 2, 2**24, 2**40, 0, 0)
    path.write_bytes(_raw_gguf(tensors=huge, n_tensors=1))
    with pytest.raises(ValueError, match="c.gguf: tensor 'w' runs past the end of the file"):
        GGUFFile(path)


# Our tree -> a llama.cpp-style GGUF: HF names mapped back, Llama's q/k rows permuted for its
# rotary layout, Gemma's norms stored as 1 + w, every tensor float32 so the check is exact.
_HF_TO_GGUF = {**{v: k for k, v in gguf_io._LAYER_NAMES.items()}}


def _gguf_name(hf_name: str, arch: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, idx, rest = hf_name.split(".", 3)
        stem, suffix = rest.rsplit(".", 1)
        names = {**_HF_TO_GGUF, **{v: k for k, v in gguf_io._LAYER_NAMES_BY_ARCH[arch].items()}}
        return f"blk.{idx}.{names[stem]}.{suffix}"
    stem, suffix = hf_name.rsplit(".", 1)
    return f"{ {v: k for k, v in gguf_io._GLOBAL_NAMES.items()}[stem]}.{suffix}"


def _permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen3", "tiny_gemma3"])
def test_model_weights_round_trip_through_gguf(tmp_path, preset):
    import gguf

    cfg = models.get_preset(preset)
    rng = np.random.default_rng(1)
    params = {k: ({n: rng.standard_normal(s).astype(np.float32) for n, s in v.items()}
                  if k == "layers" else rng.standard_normal(v).astype(np.float32))
              for k, v in models.param_shapes(cfg).items()}
    arch = "llama" if cfg.family == "llama" else cfg.family
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch=arch)
    for key, value in {"embedding_length": cfg.hidden_size, "attention.head_count": cfg.num_heads,
                       "attention.head_count_kv": cfg.num_kv_heads, "block_count": cfg.num_layers,
                       "attention.key_length": cfg.head_dim, "feed_forward_length": cfg.mlp_dim,
                       "vocab_size": cfg.vocab_size}.items():
        w.add_uint32(f"{arch}.{key}", value)
    for name, array in hf.iter_hf_tensors(cfg, params):
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _permute_rotary(array, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        w.add_tensor(_gguf_name(name, arch), np.ascontiguousarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    got_cfg, got = models.from_pretrained(str(tmp_path / "m.gguf"))
    assert (got_cfg.num_layers, got_cfg.num_kv_heads, got_cfg.tie_embeddings) == (
        cfg.num_layers, cfg.num_kv_heads, cfg.tie_embeddings)
    flat_want = dict(jax_leaves(params))
    for path, leaf in jax_leaves(got):
        np.testing.assert_allclose(np.asarray(leaf), flat_want[path], rtol=1e-6, atol=1e-6,
                                   err_msg=path)


def jax_leaves(tree) -> list[tuple[str, np.ndarray]]:
    import jax

    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
