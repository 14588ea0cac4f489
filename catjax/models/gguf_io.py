"""GGUF files (llama.cpp): metadata -> `ModelConfig`, tensors dequantised into our tree.

llama.cpp stores Llama's q/k projections with the rows of each head interleaved for its
rotary layout; we undo that permutation so the decoder sees the Hugging Face layout. Gemma
norms are stored as (1 + w) there; we subtract the 1 again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from catjax.gguf_file import GGUFFile, TensorInfo
from catjax.models import hf
from catjax.models.config import ModelConfig, RopeConfig, gemma3_pattern
from catjax.models.decoder import Params

# GGUF tensor name -> HF tensor name (within a layer, then the globals).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_NAMES_BY_ARCH = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen3": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {"post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}


def _field(meta: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"{where}: GGUF metadata {key!r} is missing")
    return meta[key]


def config_from_gguf(file: GGUFFile, dtype: str | None = None) -> ModelConfig:
    meta, where = file.metadata, file.path
    arch = _field(meta, "general.architecture", where)
    if arch not in _LAYER_NAMES_BY_ARCH:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported "
                         f"({sorted(_LAYER_NAMES_BY_ARCH)})")
    g = lambda k, d=None: _field(meta, f"{arch}.{k}", where, d)  # noqa: E731
    d, n, layers = int(g("embedding_length")), int(g("attention.head_count")), int(g("block_count"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(_field(meta, "tokenizer.ggml.tokens", where))
    head_dim = int(g("attention.key_length", d // n))
    kw: dict[str, Any] = dict(
        family="llama" if arch == "llama" else arch, vocab_size=int(vocab), hidden_size=d,
        num_layers=layers, num_heads=n, num_kv_heads=int(g("attention.head_count_kv", n)),
        head_dim=head_dim, mlp_dim=int(g("feed_forward_length")),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(g("context_length", 8192)),
        tie_embeddings="output.weight" not in file.tensors, dtype=dtype or "float32",
    )
    theta = float(g("rope.freq_base", 10_000.0))
    if arch == "gemma3":
        window = int(g("attention.sliding_window", 1024))
        kw.update(activation="gelu_tanh", norm_style="gemma", qk_norm=True, sandwich_norms=True,
                  rope=RopeConfig(theta=theta, scaling="linear",
                                  factor=float(g("rope.scaling.factor", 1.0))),
                  rope_local=RopeConfig(theta=10_000.0), sliding_window=window,
                  sliding_pattern=gemma3_pattern(layers), embed_scale=True,
                  query_pre_attn_scalar=float(head_dim))
    else:
        kw.update(rope=RopeConfig(theta=theta), qk_norm=arch == "qwen3")
    return ModelConfig(**kw)


class _GGUFTensors:
    """HF-named, dequantised float32 tensors of a GGUF file, produced on demand."""

    def __init__(self, file: GGUFFile, cfg: ModelConfig, arch: str):
        self.file, self.cfg, self.arch = file, cfg, arch
        layer_names = {**_LAYER_NAMES, **_LAYER_NAMES_BY_ARCH[arch]}
        self.tensors: dict[str, TensorInfo] = {}
        for t in file.tensors.values():
            stem, _, suffix = t.name.rpartition(".")
            if stem.startswith("blk."):
                _, idx, short = stem.split(".", 2)
                if short not in layer_names:
                    continue  # e.g. rope_freqs: derived from the config instead
                name = f"model.layers.{idx}.{layer_names[short]}.{suffix}"
            elif stem in _GLOBAL_NAMES:
                name = f"{_GLOBAL_NAMES[stem]}.{suffix}"
            else:
                continue
            self.tensors[name] = t

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> np.ndarray:
        w = self.file.array(self.tensors[name].name)
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.cfg.num_heads if "q_proj" in name else self.cfg.num_kv_heads
            w = _unpermute_rotary(w, heads)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0
        return w


def _unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, (h/2, 2) rows -> (2, h/2)."""
    out_dim = w.shape[0]
    return w.reshape(heads, out_dim // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype: Any = None) -> tuple[ModelConfig, Params]:
    file = GGUFFile(path)
    dtype_name = hf._np_dtype(dtype).name if dtype is not None else None
    cfg = config_from_gguf(file, dtype=dtype_name)
    params = hf.load_params(cfg, _GGUFTensors(file, cfg, file.metadata["general.architecture"]),
                            path)
    return cfg, params
