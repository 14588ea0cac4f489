"""Weights in and out: export round trip, GGUF (SmolLM2), sharded checkpoints, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from catjax import models
from catjax.models import safetensors_io
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures)
from tests.hf_fixtures import hf_logits, make_hf_model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_save_pretrained_round_trip(tmp_path, family):
    make_hf_model(family, str(tmp_path / "src"))
    cfg, params = models.from_pretrained(str(tmp_path / "src"))
    models.save_pretrained(cfg, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 50))
    ours = np.asarray(models.forward(cfg, params, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_array_less(np.abs(hf_logits(reloaded, tokens) - ours).max(), 1e-5)
    cfg2, params2 = models.from_pretrained(str(tmp_path / "out"))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    from catjax.models import hf

    hf.save_hf_dir(cfg, params, str(tmp_path), dtype="bfloat16", max_shard_bytes=40_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    cfg2, params2 = models.from_pretrained(str(tmp_path))
    assert cfg2.dtype == "bfloat16" and params2["embed"].dtype == jnp.bfloat16
    want = jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16)), params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params2), want)
    _, params3 = models.from_pretrained(str(tmp_path), dtype=jnp.float32)
    assert params3["embed"].dtype == jnp.float32


def test_bad_inputs_name_the_field_or_tensor(tmp_path):
    make_hf_model("qwen3", str(tmp_path))
    cfg_path = tmp_path / "config.json"
    hf_cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**hf_cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        models.from_pretrained(str(tmp_path))

    cfg_path.write_text(json.dumps({**hf_cfg, "hidden_size": 80}))
    with pytest.raises(ValueError, match="embed_tokens.weight' has shape"):
        models.from_pretrained(str(tmp_path))

    cfg_path.write_text(json.dumps({**hf_cfg, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.3"):
        models.from_pretrained(str(tmp_path))

    bad = {k: v for k, v in hf_cfg.items() if k != "vocab_size"}
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="missing field 'vocab_size'"):
        models.from_pretrained(str(tmp_path))

    for text, why in [
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        (json.dumps({**hf_cfg, "hidden_size": "64"}), "field 'hidden_size' must be an integer, got '64'"),
        (json.dumps({**hf_cfg, "num_attention_heads": None}), "missing field 'num_attention_heads'"),
        (json.dumps({**hf_cfg, "num_attention_heads": 0}), "field 'num_attention_heads' is 0, must be >= 1"),
        (json.dumps({**hf_cfg, "num_hidden_layers": -2}), "field 'num_hidden_layers' is -2"),
        (json.dumps({**hf_cfg, "head_dim": 15.5}), "field 'head_dim' must be an integer, got 15.5"),
        (json.dumps({**hf_cfg, "rms_norm_eps": "tiny"}), "field 'rms_norm_eps' must be a number"),
        (json.dumps({**hf_cfg, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}),
         "missing field 'rope factor'"),
        (json.dumps({**hf_cfg, "rope_parameters": [1e4]}), "field 'rope_parameters' must be an object"),
        (json.dumps({**hf_cfg, "rope_scaling": "linear"}), "field 'rope_scaling' must be an object"),
    ]:
        cfg_path.write_text(text)
        with pytest.raises(ValueError, match=f"^{tmp_path}/config.json: ") as e:
            models.from_pretrained(str(tmp_path))
        assert why in str(e.value), (why, str(e.value))
    cfg_path.write_text(json.dumps({**hf_cfg, "max_position_embeddings": 4096.0}))  # a whole float
    assert models.from_pretrained(str(tmp_path))[0].max_position == 4096

    cfg_path.write_text(json.dumps(hf_cfg))
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        models.from_pretrained(str(tmp_path))

    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.from_pretrained(str(tmp_path / "nowhere"))


def test_safetensors_writer_reads_in_the_reference_library(tmp_path):
    import ml_dtypes
    from safetensors.torch import load_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.ones((3,), ml_dtypes.bfloat16)}
    safetensors_io.save_file(arrays, str(tmp_path / "x.safetensors"))
    loaded = load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(loaded["a"].numpy(), arrays["a"])
    assert loaded["b"].dtype == torch.bfloat16 and loaded["b"].float().sum() == 3


def _safetensors_with(tmp_path, entry) -> str:
    import json
    import struct

    blob = json.dumps({"w": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(64))
    return str(path)


@pytest.mark.parametrize("entry,why", [
    ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}, "hold 16 bytes, its shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "bad shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "bad shape"),
    ({"dtype": "F32", "shape": [2]}, "needs dtype, shape and data_offsets"),
    ([1, 2], "needs dtype, shape and data_offsets"),
    ({"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}, "truncated safetensors file"),
])
def test_safetensors_header_entries_checked_before_reading(tmp_path, entry, why):
    path = _safetensors_with(tmp_path, entry)
    with pytest.raises(ValueError, match=why) as e:
        safetensors_io.SafetensorsFile(path)
    assert str(e.value).startswith(path)


def test_from_pretrained_and_save_pretrained_on_gs(tmp_path, gcs_bucket, monkeypatch):  # noqa: F811
    from catjax import storage

    monkeypatch.setattr(storage, "CACHE_DIR", str(tmp_path / "cache"))
    make_hf_model("qwen3", str(tmp_path / "src"))
    cfg, params = models.from_pretrained(str(tmp_path / "src"))
    models.save_pretrained(cfg, params, f"{gcs_bucket}/models/q")
    cfg2, params2 = models.from_pretrained(f"{gcs_bucket}/models/q")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(FileNotFoundError, match="no such object or prefix"):
        models.from_pretrained(f"{gcs_bucket}/models/missing")
