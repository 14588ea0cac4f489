"""Hugging Face checkpoints: `config.json` <-> `ModelConfig`, tensor names <-> our parameter tree.

One table (`_LAYER_TENSORS`) drives both import and export, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np

from catjax.models import safetensors_io
from catjax.models.config import ModelConfig, RopeConfig, gemma3_pattern
from catjax.models.decoder import Params, param_shapes

_FAMILY_OF_MODEL_TYPE = {
    "llama": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3", "gemma3": "gemma3",
}


# --- config.json ----------------------------------------------------------------------------

_REQUIRED = object()


def _number(d: dict[str, Any], key: str, where: str, default: Any = _REQUIRED, kind: type = int,
            minimum: float | None = 1, label: str = "") -> Any:
    """d[key] as an int (whole floats too: 4096.0) or float, at least `minimum`; missing or
    null gives `default`. Anything else is one line naming the file and the field."""
    label = label or key
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{where}: missing field {label!r}")
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not whole):
        raise ValueError(f"{where}: field {label!r} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
    value = kind(value)
    if minimum is not None and not value >= minimum:  # NaN too
        raise ValueError(f"{where}: field {label!r} is {value}, must be >= {minimum}")
    return value


def _object(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """d[key] as a dict ({} when missing or null); anything else is one line."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: field {key!r} must be an object, got {type(value).__name__}")
    return value


def _rope_from_dict(d: dict[str, Any], default_theta: float, where: str) -> RopeConfig:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: rope parameters must be an object, got {type(d).__name__}")
    kind = d.get("rope_type", d.get("type", "default")) or "default"
    theta = _number(d, "rope_theta", where, default_theta, float, minimum=1e-30)

    def num(key: str, kind_: type = float) -> Any:
        return _number(d, key, where, kind=kind_, minimum=None, label=f"rope {key}")

    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=num("factor"))
    if kind == "llama3":
        return RopeConfig(
            theta=theta, scaling="llama3", factor=num("factor"),
            low_freq_factor=num("low_freq_factor"), high_freq_factor=num("high_freq_factor"),
            original_max_position=num("original_max_position_embeddings", int),
        )
    raise ValueError(f"{where}: rope type {kind!r} is not supported (default, linear, llama3)")


def config_from_hf(hf: dict[str, Any], where: str = "config.json",
                   dtype: str | None = None) -> ModelConfig:
    """Translate a transformers `config.json` (old `rope_theta`/`rope_scaling` or v5
    `rope_parameters`) into a `ModelConfig`."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        hf = {**_object(hf, "text_config", where), "model_type": "gemma3_text",
              "torch_dtype": hf.get("torch_dtype", hf.get("dtype"))}
        model_type = "gemma3_text"
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {sorted(_FAMILY_OF_MODEL_TYPE)})"
        )
    family = _FAMILY_OF_MODEL_TYPE[model_type]

    def num(key: str, default: Any = _REQUIRED, kind: type = int, minimum: float | None = 1) -> Any:
        return _number(hf, key, where, default, kind, minimum)

    d, n, layers = num("hidden_size"), num("num_attention_heads"), num("num_hidden_layers")
    kw: dict[str, Any] = dict(
        family=family, vocab_size=num("vocab_size"), hidden_size=d, num_layers=layers,
        num_heads=n, num_kv_heads=num("num_key_value_heads", n),
        head_dim=num("head_dim", d // n), mlp_dim=num("intermediate_size"),
        norm_eps=num("rms_norm_eps", 1e-6, float, minimum=0),
        attention_bias=bool(hf.get("attention_bias", False)),
        max_position=num("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma3")),
        dtype=dtype or _dtype_name(hf.get("torch_dtype", hf.get("dtype")) or "float32"),
    )
    rope_params = _object(hf, "rope_parameters", where)
    rope_scaling = _object(hf, "rope_scaling", where)
    if family == "gemma3":
        rp = rope_params
        if "full_attention" not in rp:  # old form: rope_theta, rope_local_base_freq, rope_scaling
            rp = {"full_attention": {**rope_scaling,
                                     "rope_theta": hf.get("rope_theta", 1e6)},
                  "sliding_attention": {"rope_theta": hf.get("rope_local_base_freq", 1e4)}}
        layer_types = hf.get("layer_types") or [
            "full_attention" if p == 0 else "sliding_attention"
            for p in gemma3_pattern(layers, num("sliding_window_pattern", 6))
        ]
        if len(layer_types) != layers:
            raise ValueError(f"{where}: layer_types has {len(layer_types)} entries for {layers} layers")
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{where}: use_bidirectional_attention is not supported")
        act = hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{where}: hidden_activation {act!r} is not supported for Gemma 3")
        kw.update(
            activation="gelu_tanh", norm_style="gemma", qk_norm=True, sandwich_norms=True,
            rope=_rope_from_dict(rp.get("full_attention") or {}, 1e6, where),
            rope_local=_rope_from_dict(rp.get("sliding_attention") or {}, 1e4, where),
            sliding_window=num("sliding_window", 4096),
            sliding_pattern=tuple(int(t == "sliding_attention") for t in layer_types),
            query_pre_attn_scalar=num("query_pre_attn_scalar", 256, float, minimum=1e-30),
            embed_scale=True,
            # transformers' Gemma 3 never applies attn_logit_softcapping; neither do we.
            attn_logit_softcap=None,
            final_logit_softcap=num("final_logit_softcapping", None, float, minimum=1e-30),
        )
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported for {model_type}")
        if not rope_params:
            rope_params = {**rope_scaling, "rope_theta": hf.get("rope_theta", 1e4)}
        kw.update(rope=_rope_from_dict(rope_params, 1e4, where), qk_norm=family == "qwen3")
    return ModelConfig(**kw)


def _dtype_name(d: Any) -> str:
    name = str(d).replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` for `cfg` (v5 `rope_parameters` form)."""
    def rope_dict(r: RopeConfig) -> dict[str, Any]:
        if r.scaling == "linear":
            return {"rope_type": "linear", "factor": r.factor, "rope_theta": r.theta}
        if r.scaling == "llama3":
            return {"rope_type": "llama3", "factor": r.factor, "rope_theta": r.theta,
                    "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                    "original_max_position_embeddings": r.original_max_position}
        return {"rope_type": "default", "rope_theta": r.theta}

    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias, "dtype": cfg.dtype,
    }
    if cfg.family == "gemma3":
        out.update(
            architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
            sliding_window=cfg.sliding_window,
            layer_types=["sliding_attention" if s else "full_attention"
                         for s in cfg.layer_is_sliding()],
            rope_parameters={"full_attention": rope_dict(cfg.rope),
                             "sliding_attention": rope_dict(cfg.rope_local or cfg.rope)},
            final_logit_softcapping=cfg.final_logit_softcap,
        )
    else:
        arch = "Qwen3ForCausalLM" if cfg.family == "qwen3" else "LlamaForCausalLM"
        out.update(architectures=[arch], model_type=cfg.family, hidden_act="silu",
                   rope_parameters=rope_dict(cfg.rope))
    return out


# --- tensors ---------------------------------------------------------------------------------

# (our layer name, HF name within the layer, HF->ours on the numpy array, ours->HF)
_Conv = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _proj_in(heads_attr: str) -> tuple[_Conv, _Conv]:
    """[heads*h, d] (out, in) <-> [d, heads, h]."""
    def to_ours(w, cfg):
        return w.reshape(getattr(cfg, heads_attr), cfg.head_dim, cfg.hidden_size).transpose(2, 0, 1)

    def to_hf(w, cfg):
        return w.transpose(1, 2, 0).reshape(-1, cfg.hidden_size)

    return to_ours, to_hf


def _bias(heads_attr: str) -> tuple[_Conv, _Conv]:
    return (lambda w, cfg: w.reshape(getattr(cfg, heads_attr), cfg.head_dim),
            lambda w, cfg: w.reshape(-1))


_T: tuple[_Conv, _Conv] = (lambda w, cfg: w.T, lambda w, cfg: w.T)
_ID: tuple[_Conv, _Conv] = (lambda w, cfg: w, lambda w, cfg: w)
_O: tuple[_Conv, _Conv] = (
    lambda w, cfg: w.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim).transpose(1, 2, 0),
    lambda w, cfg: w.transpose(2, 0, 1).reshape(cfg.hidden_size, -1),
)


def _layer_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[_Conv, _Conv]]]:
    table = {
        "attn_norm": ("input_layernorm.weight", _ID),
        "q": ("self_attn.q_proj.weight", _proj_in("num_heads")),
        "k": ("self_attn.k_proj.weight", _proj_in("num_kv_heads")),
        "v": ("self_attn.v_proj.weight", _proj_in("num_kv_heads")),
        "o": ("self_attn.o_proj.weight", _O),
        "q_bias": ("self_attn.q_proj.bias", _bias("num_heads")),
        "k_bias": ("self_attn.k_proj.bias", _bias("num_kv_heads")),
        "v_bias": ("self_attn.v_proj.bias", _bias("num_kv_heads")),
        "o_bias": ("self_attn.o_proj.bias", _ID),
        "q_norm": ("self_attn.q_norm.weight", _ID),
        "k_norm": ("self_attn.k_norm.weight", _ID),
        "gate": ("mlp.gate_proj.weight", _T),
        "up": ("mlp.up_proj.weight", _T),
        "down": ("mlp.down_proj.weight", _T),
    }
    if cfg.sandwich_norms:  # Gemma 3 names its four norms differently
        table.update(post_attn_norm=("post_attention_layernorm.weight", _ID),
                     mlp_norm=("pre_feedforward_layernorm.weight", _ID),
                     post_mlp_norm=("post_feedforward_layernorm.weight", _ID))
    else:
        table["mlp_norm"] = ("post_attention_layernorm.weight", _ID)
    return table


# Where the decoder lives in the checkpoint: CausalLM models, then Gemma 3's multimodal
# checkpoints (old and new transformers layouts).
_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


def _np_dtype(dtype: Any) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def load_params(cfg: ModelConfig, tensors: Any, where: str,
                dtype: Any = None) -> Params:
    """Read HF tensors into our tree, converting one tensor at a time into `dtype`.

    `tensors` needs `keys()` and `get(name) -> np.ndarray`. Every expected tensor is checked for
    presence and shape before any conversion starts.
    """
    target = _np_dtype(dtype or cfg.dtype)
    keys = set(tensors.keys())
    prefix = next((p for p in _PREFIXES if f"{p}embed_tokens.weight" in keys), None)
    if prefix is None:
        raise ValueError(f"{where}: no embed_tokens.weight under any of {list(_PREFIXES)}")
    shapes = param_shapes(cfg)
    table = _layer_tensors(cfg)

    plan: list[tuple[tuple[str, ...], int | None, str, _Conv]] = []  # (path, layer, hf name, conv)
    plan.append((("embed",), None, f"{prefix}embed_tokens.weight", _ID[0]))
    plan.append((("final_norm",), None, f"{prefix}norm.weight", _ID[0]))
    if not cfg.tie_embeddings:
        head = next((h for h in _HEAD_NAMES if h in keys), _HEAD_NAMES[0])
        plan.append((("lm_head",), None, head, _T[0]))
    for name in shapes["layers"]:
        hf_name, (to_ours, _) = table[name]
        for i in range(cfg.num_layers):
            plan.append((("layers", name), i, f"{prefix}layers.{i}.{hf_name}", to_ours))

    for path, layer, hf_name, conv in plan:  # validate everything before the long part
        if hf_name not in keys:
            raise ValueError(f"{where}: missing tensor {hf_name!r}")
        want = shapes[path[0]] if len(path) == 1 else shapes[path[0]][path[1]]
        want = want if layer is None else want[1:]
        got = conv(np.empty(_shape_of(tensors, hf_name), np.int8), cfg).shape
        if tuple(got) != tuple(want):
            raise ValueError(
                f"{where}: tensor {hf_name!r} has shape {_shape_of(tensors, hf_name)}, "
                f"expected one that maps to {tuple(want)}"
            )

    out: Params = {"layers": {}}
    for key, shape in shapes.items():
        if key == "layers":
            out["layers"] = {k: np.empty(s, target) for k, s in shape.items()}
        else:
            out[key] = np.empty(shape, target)
    for path, layer, hf_name, conv in plan:
        dst = out[path[0]] if len(path) == 1 else out[path[0]][path[1]]
        src = conv(tensors.get(hf_name), cfg)
        if layer is None:
            dst[...] = src.astype(target)
        else:
            dst[layer] = src.astype(target)
    return jax.tree.map(_to_device, out)


def _to_device(a: np.ndarray) -> jax.Array:
    return jax.numpy.asarray(a)


def _shape_of(tensors: Any, name: str) -> tuple[int, ...]:
    if hasattr(tensors, "shape"):
        return tuple(tensors.shape(name))
    return tuple(tensors.get(name).shape)


def iter_hf_tensors(cfg: ModelConfig, params: Params,
                    dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Our tree as (HF name, numpy array) pairs, one tensor at a time."""
    def host(a) -> np.ndarray:
        arr = np.asarray(jax.device_get(a))
        return arr.astype(_np_dtype(dtype)) if dtype is not None else arr

    yield "model.embed_tokens.weight", host(params["embed"])
    table = _layer_tensors(cfg)
    for i in range(cfg.num_layers):
        for name, arr in params["layers"].items():
            hf_name, (_, to_hf) = table[name]
            yield f"model.layers.{i}.{hf_name}", np.ascontiguousarray(to_hf(host(arr[i]), cfg))
    yield "model.norm.weight", host(params["final_norm"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(host(params["lm_head"]).T)


def load_hf_dir(directory: str, dtype: Any = None) -> tuple[ModelConfig, Params]:
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not found (a Hugging Face model directory needs it)")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    dtype_name = _np_dtype(dtype).name if dtype is not None else None
    cfg = config_from_hf(hf, cfg_path, dtype=dtype_name)
    params = load_params(cfg, safetensors_io.SafetensorsDir(directory), directory)
    return cfg, params


def save_hf_dir(cfg: ModelConfig, params: Params, directory: str, dtype: Any = None,
                max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `config.json` + safetensors that `transformers` loads with the same logits."""
    os.makedirs(directory, exist_ok=True)
    hf = config_to_hf(cfg)
    if dtype is not None:
        hf["dtype"] = _np_dtype(dtype).name
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    safetensors_io.save_sharded(iter_hf_tensors(cfg, params, dtype), directory, max_shard_bytes)
