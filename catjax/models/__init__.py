"""Models: config presets, the decoder, and weights in and out.

    cfg, params = models.from_pretrained(path)      # HF dir, .gguf file, or gs://...
    logits = models.forward(cfg, params, tokens)    # [B, T] int32 -> [B, T, V] float32
    models.save_pretrained(cfg, params, out_dir)    # loads in transformers with the same logits
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from catjax import storage
from catjax.models.config import PRESETS, ModelConfig, RopeConfig, get_preset
from catjax.models.decode import (
    SharedPromptCache,
    decode_layout,
    decode_step,
    init_shared_cache,
)
from catjax.models.decoder import (
    KVCache,
    Params,
    abstract_params,
    embed,
    forward,
    forward_cached,
    hidden_cached,
    hidden_states,
    init_cache,
    init_params,
    last_layer_at,
    logical_axes,
    logits_from_hidden,
    num_flops_per_token,
    param_count,
    param_shapes,
    unstack_layers,
)
from catjax.models.logprobs import token_logprobs
from catjax.models.prefill import prefill

__all__ = [
    "PRESETS", "KVCache", "ModelConfig", "Params", "RopeConfig", "SharedPromptCache",
    "abstract_params", "init_shared_cache",
    "decode_layout", "decode_step", "embed", "forward", "forward_cached", "from_pretrained",
    "get_preset", "hidden_cached", "hidden_states", "init_cache", "init_params", "last_layer_at",
    "logical_axes",
    "logits_from_hidden", "num_flops_per_token", "param_count", "param_shapes", "prefill",
    "save_pretrained", "token_logprobs", "unstack_layers",
]


def from_pretrained(path: str, dtype: Any = None) -> tuple[ModelConfig, Params]:
    """Load `(cfg, params)` from a Hugging Face directory, a `.gguf` file, or either on gs://.

    Weights are converted tensor by tensor into `dtype` (default: the checkpoint's dtype for
    HF directories, float32 for GGUF), so no second full float32 copy is ever held.
    """
    from catjax.models import gguf_io, hf

    path = str(path)
    if storage.is_gcs(path):
        path = storage.download(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: GGUF file not found")
        return gguf_io.load_gguf(path, dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
    return hf.load_hf_dir(path, dtype)


def save_pretrained(cfg: ModelConfig, params: Params, directory: str, dtype: Any = None) -> None:
    """Write a Hugging Face directory (config.json + safetensors); `gs://` uploads it."""
    from catjax.models import hf

    if storage.is_gcs(directory):
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_hf_dir(cfg, params, tmp, dtype)
            storage.upload_dir(tmp, directory)
        return
    hf.save_hf_dir(cfg, params, directory, dtype)
