"""`ModelConfig`: one frozen dataclass that describes Gemma 3, Qwen 3 and Llama 3.x decoders.

The config is hashable so it can be a static argument of `jax.jit`. Presets give the published
sizes; `tiny_*` presets are for unit tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

Activation = Literal["silu", "gelu_tanh"]
NormStyle = Literal["rms", "gemma"]  # rms: x * w; gemma: x * (1 + w)
RopeScaling = Literal["none", "llama3", "linear"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type."""

    theta: float = 10_000.0
    scaling: RopeScaling = "none"
    factor: float = 1.0
    # llama3 frequency scaling only.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float64 on the host then cast by the caller."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if self.scaling == "linear":
            return inv / self.factor
        if self.scaling == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled)
        return inv


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama / Qwen 3 / Gemma 3 families)."""

    family: str  # "llama" | "qwen3" | "gemma3": selects weight names on import/export
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    activation: Activation = "silu"
    norm_style: NormStyle = "rms"
    norm_eps: float = 1e-6
    qk_norm: bool = False  # Qwen 3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    sandwich_norms: bool = False  # Gemma 3: post-attention and pre/post-MLP norms (4 per layer)
    attention_bias: bool = False  # biases on q, k, v and o projections
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # RoPE of sliding-window layers, when it differs
    sliding_window: int | None = None  # keys within this many positions (the query included)
    # 1 marks a sliding-window layer; () means no sliding layers.
    sliding_pattern: tuple[int, ...] = ()
    query_pre_attn_scalar: float | None = None  # None: scale by head_dim ** -0.5
    embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(hidden_size)
    tie_embeddings: bool = True
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_position: int = 8192
    dtype: str = "float32"  # activations and parameters
    remat: bool = False  # rematerialise each layer in the backward pass (training)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_pattern and len(self.sliding_pattern) != self.num_layers:
            raise ValueError(
                f"ModelConfig.sliding_pattern has {len(self.sliding_pattern)} entries for "
                f"{self.num_layers} layers"
            )
        if any(self.sliding_pattern) and not self.sliding_window:
            raise ValueError("ModelConfig.sliding_pattern marks sliding layers but sliding_window is unset")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"ModelConfig.activation={self.activation!r}: use 'silu' or 'gelu_tanh'")
        if self.norm_style not in ("rms", "gemma"):
            raise ValueError(f"ModelConfig.norm_style={self.norm_style!r}: use 'rms' or 'gemma'")

    @property
    def jnp_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar**-0.5
        return self.head_dim**-0.5

    def layer_is_sliding(self) -> np.ndarray:
        """[num_layers] bool: which layers use the sliding window (and the local RoPE)."""
        if not self.sliding_pattern:
            return np.zeros(self.num_layers, bool)
        return np.asarray(self.sliding_pattern, bool)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, h, k, hd, f = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                          self.mlp_dim)
        per_layer = d * hd * (h + 2 * k) + h * hd * d + 3 * d * f
        per_layer += (4 if self.sandwich_norms else 2) * d + (2 * hd if self.qk_norm else 0)
        if self.attention_bias:
            per_layer += hd * (h + 2 * k) + d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head


def gemma3_pattern(num_layers: int, every: int = 6) -> tuple[int, ...]:
    """Gemma 3: five sliding-window layers, then one global layer, repeated."""
    return tuple(0 if (i + 1) % every == 0 else 1 for i in range(num_layers))


# --- presets ---------------------------------------------------------------------------------

def gemma3_4b() -> ModelConfig:
    """Gemma 3 4B (text tower of google/gemma-3-4b-it)."""
    return ModelConfig(
        family="gemma3", vocab_size=262_208, hidden_size=2560, num_layers=34, num_heads=8,
        num_kv_heads=4, head_dim=256, mlp_dim=10_240, activation="gelu_tanh", norm_style="gemma",
        norm_eps=1e-6, qk_norm=True, sandwich_norms=True,
        rope=RopeConfig(theta=1_000_000.0, scaling="linear", factor=8.0),
        rope_local=RopeConfig(theta=10_000.0), sliding_window=1024,
        sliding_pattern=gemma3_pattern(34), query_pre_attn_scalar=256, embed_scale=True,
        tie_embeddings=True, max_position=131_072, dtype="bfloat16",
    )


def qwen3_4b() -> ModelConfig:
    """Qwen 3 4B (Qwen/Qwen3-4B, also the 2507 Instruct release)."""
    return ModelConfig(
        family="qwen3", vocab_size=151_936, hidden_size=2560, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, mlp_dim=9728, norm_eps=1e-6, qk_norm=True,
        rope=RopeConfig(theta=1_000_000.0), tie_embeddings=True, max_position=40_960,
        dtype="bfloat16",
    )


def llama31_8b() -> ModelConfig:
    """Llama 3.1 8B Instruct."""
    return ModelConfig(
        family="llama", vocab_size=128_256, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, mlp_dim=14_336, norm_eps=1e-5,
        rope=RopeConfig(theta=500_000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position=8192),
        tie_embeddings=False, max_position=131_072, dtype="bfloat16",
    )


def smollm2_135m() -> ModelConfig:
    """SmolLM2-135M-Instruct (Llama architecture)."""
    return ModelConfig(
        family="llama", vocab_size=49_152, hidden_size=576, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, mlp_dim=1536, norm_eps=1e-5,
        rope=RopeConfig(theta=100_000.0), tie_embeddings=True, max_position=8192,
    )


def tiny_llama() -> ModelConfig:
    """A few-layer Llama 3.1 with llama3 RoPE scaling and untied head (tests)."""
    return ModelConfig(
        family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=24, mlp_dim=128, norm_eps=1e-5,
        rope=RopeConfig(theta=500_000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position=32),
        tie_embeddings=False, max_position=4096,
    )


def tiny_qwen3() -> ModelConfig:
    return ModelConfig(
        family="qwen3", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=1, head_dim=32, mlp_dim=128, qk_norm=True,
        rope=RopeConfig(theta=1_000_000.0), tie_embeddings=True, max_position=4096,
    )


def tiny_gemma3() -> ModelConfig:
    return ModelConfig(
        family="gemma3", vocab_size=512, hidden_size=64, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=32, mlp_dim=128, activation="gelu_tanh", norm_style="gemma",
        qk_norm=True, sandwich_norms=True,
        rope=RopeConfig(theta=1_000_000.0, scaling="linear", factor=8.0),
        rope_local=RopeConfig(theta=10_000.0), sliding_window=8,
        sliding_pattern=gemma3_pattern(3, every=3), query_pre_attn_scalar=16, embed_scale=True,
        tie_embeddings=True, max_position=4096,
    )


PRESETS = {
    "gemma3_4b": gemma3_4b,
    "qwen3_4b": qwen3_4b,
    "llama31_8b": llama31_8b,
    "smollm2_135m": smollm2_135m,
    "tiny_llama": tiny_llama,
    "tiny_qwen3": tiny_qwen3,
    "tiny_gemma3": tiny_gemma3,
    "tiny": tiny_qwen3,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides (e.g. `dtype='float32'`)."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
