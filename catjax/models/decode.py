"""One decode step with the weights as the left operand of every layer matmul.

A decode step multiplies a few dozen rows by every weight. At those shapes XLA:CPU runs
W [out, in] @ h [in, rows] markedly faster than h [rows, in] @ W [in, out] (SmolLM2-135M, 32
rows: the layers' matmuls 150 -> 110 ms a step, bench/RESULTS.md). XLA's simplifier turns a
transposed product back into the slow form, so the hidden state itself stays feature-major,
[D, rows], from the embedding to the final layer. q/k/v and gate/up are one matmul each.

`decode_layout` builds the per-layer weights once per sampler call (one copy of the layers, as
`decoder.unstack_layers` makes); `decode_step` is `decoder.hidden_cached` for one token per row
over a per-layer cache, with the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from catjax.models import decoder
from catjax.models.config import ModelConfig
from catjax.models.decoder import KVCache, Params
from catjax.models.mlp import activation_fn

_MATMULS = ("q", "k", "v", "o", "gate", "up", "down")


def decode_layout(cfg: ModelConfig, params: Params) -> Params:
    """`params` with "layers" as a tuple of per-layer dicts holding the weights output-major:
    qkv_t [(N + 2K) * H, D], o_t [D, N * H], gate_up_t [2F, D], down_t [D, F]; norms and biases
    unchanged. The embedding, final norm and head stay as they are."""
    d = cfg.hidden_size
    layers = decoder.unstack_layers(params)["layers"]

    def one(p: Params) -> Params:
        out = {name: w for name, w in p.items() if name not in _MATMULS}
        out["qkv_t"] = jnp.concatenate(
            [p[name].reshape(d, -1) for name in ("q", "k", "v")], axis=1).T
        out["o_t"] = p["o"].reshape(-1, d).T
        out["gate_up_t"] = jnp.concatenate([p["gate"], p["up"]], axis=1).T
        out["down_t"] = p["down"].T
        return out

    return {**params, "layers": tuple(one(p) for p in layers)}


def is_decode_layout(params: Params) -> bool:
    layers = params["layers"]
    return isinstance(layers, tuple | list) and bool(layers) and "qkv_t" in layers[0]


def decode_step(cfg: ModelConfig, params: Params, tokens_b: jax.Array, positions_b: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Write one token per row (`tokens_b` [R] at slots `positions_b` [R]) and attend over the
    cache. `params` from `decode_layout`, `cache` per layer (`KVCache.unstacked`, the form it is
    returned in). Returns the last hidden states [R, 1, D] (before the final norm)."""
    r = tokens_b.shape[0]
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    positions_b1 = positions_b[:, None]
    rope_g, rope_l = decoder._rope_tables(cfg, positions_b1)
    s = cache.num_slots
    slot_pos_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (r, s))
    all_valid = jnp.ones((r, s), bool)
    masks = (decoder._attention_mask(cfg, positions_b1, slot_pos_bs, all_valid, False),
             decoder._attention_mask(cfg, positions_b1, slot_pos_bs, all_valid, True))
    rows_b = jnp.arange(r)
    act = activation_fn(cfg.activation)
    cache = cache.unstacked()
    ks, vs = list(cache.k_lbksh), list(cache.v_lbksh)

    x_dr = decoder.embed(cfg, params, tokens_b[:, None])[:, 0].T
    for i, (p, sliding) in enumerate(zip(params["layers"], cfg.layer_is_sliding(), strict=True)):
        qkv_er = p["qkv_t"] @ decoder.rms_norm(cfg, x_dr, p["attn_norm"], axis=0)
        # The barrier keeps the product [E, rows]: transposed right after it, XLA would
        # rewrite it as rows @ W^T, the slow form.
        qkv_re = jax.lax.optimization_barrier(qkv_er).T
        q, kk, v = jnp.split(qkv_re, (n * h, (n + k) * h), axis=1)
        rope_cs = (rope_l if sliding else rope_g)
        q, kk, v = decoder._qkv_post(cfg, p, q.reshape(r, 1, n, h), kk.reshape(r, 1, k, h),
                                     v.reshape(r, 1, k, h), rope_cs)
        ks[i] = ks[i].at[rows_b, :, positions_b].set(kk[:, 0].astype(ks[i].dtype), mode="drop")
        vs[i] = vs[i].at[rows_b, :, positions_b].set(v[:, 0].astype(vs[i].dtype), mode="drop")
        attn = decoder._attend(cfg, q, ks[i].astype(q.dtype), vs[i].astype(q.dtype),
                               masks[1] if sliding else masks[0])
        attn_dr = p["o_t"] @ attn.reshape(r, n * h).T
        if cfg.attention_bias:
            attn_dr = attn_dr + p["o_bias"][:, None]
        if cfg.sandwich_norms:
            attn_dr = decoder.rms_norm(cfg, attn_dr, p["post_attn_norm"], axis=0)
        x_dr = x_dr + attn_dr
        gate_up = p["gate_up_t"] @ decoder.rms_norm(cfg, x_dr, p["mlp_norm"], axis=0)
        gate, up = jnp.split(gate_up, 2, axis=0)
        mlp_dr = p["down_t"] @ (act(gate) * up)
        if cfg.sandwich_norms:
            mlp_dr = decoder.rms_norm(cfg, mlp_dr, p["post_mlp_norm"], axis=0)
        x_dr = x_dr + mlp_dr
    return x_dr.T[:, None], KVCache(tuple(ks), tuple(vs))
