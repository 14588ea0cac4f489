"""One decode step with the weights as the left operand of every layer matmul.

A decode step multiplies a few dozen rows by every weight. At those shapes XLA:CPU runs
W [out, in] @ h [in, rows] markedly faster than h [rows, in] @ W [in, out] (SmolLM2-135M, 32
rows: the layers' matmuls 150 -> 110 ms a step, bench/RESULTS.md). XLA's simplifier turns a
transposed product back into the slow form, so the hidden state itself stays feature-major,
[D, rows], from the embedding to the final layer. q/k/v and gate/up are one matmul each.

The G rows that continue one prompt share its keys and values (`SharedPromptCache`): each step
attends the prompt once per prompt, its G rows' queries as one matmul, and only the generated
part per row. Attention over a per-row cache was the largest cost of a SmolLM2 decode step (85 of
~300 ms at 32 rows, 128-slot prompts, bench/RESULTS.md), most of it rereading the same prompt.

`decode_layout` builds the per-layer weights once per sampler call (one copy of the layers, as
`decoder.unstack_layers` makes); `decode_step` gives the values of `decoder.hidden_cached` for one
token per row over the equivalent per-row cache.
"""

from __future__ import annotations

import flax.struct
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


@flax.struct.dataclass
class SharedPromptCache:
    """The decode loop's cache when rows [i*G, (i+1)*G) all continue prompt i.

    The prompt's keys/values once per prompt, per layer: keys transposed, [B, K, H, P], so that
    the step's score matmul reads them as its right operand lies (XLA:CPU otherwise repacks them
    every step: 5-12% of a step over a 1024-slot prompt, bench/RESULTS.md); values [B, K, P, H].
    Slot s holds position s; slots from `prompt_len_b` on are padding, never attended.
    `generated`: each row's own, per layer [R, K, N, H], where slot j holds generated token j
    (position prompt_len + j).
    """

    prompt_k_lbkhs: tuple[jax.Array, ...]
    prompt_v_lbksh: tuple[jax.Array, ...]
    generated: KVCache
    prompt_len_b: jax.Array  # [B] int32

    @property
    def group(self) -> int:
        return self.generated.k_lbksh[0].shape[0] // self.prompt_len_b.shape[0]

    @property
    def prompt_slots(self) -> int:
        return self.prompt_v_lbksh[0].shape[2]


def init_shared_cache(cfg: ModelConfig, prompt_cache: KVCache, prompt_len_b: jax.Array,
                      num_samples: int, max_new_tokens: int, dtype=None) -> SharedPromptCache:
    """Empty generated slots for `num_samples` rows per prompt behind a prefilled prompt cache."""
    rows = prompt_len_b.shape[0] * num_samples
    prompt = prompt_cache.unstacked()
    gen = decoder.init_cache(cfg, rows, max_new_tokens, dtype or prompt.k_lbksh[0].dtype)
    return SharedPromptCache(tuple(k.swapaxes(2, 3) for k in prompt.k_lbksh), prompt.v_lbksh,
                             gen.unstacked(), prompt_len_b)


def _attend_shared(cfg: ModelConfig, q_r1nh, kp_bkhs, vp_bksh, kg_rksh, vg_rksh, mask_p_bs,
                   mask_g_bs) -> jax.Array:
    """Grouped-query attention of one query per row over its prompt's keys (shared by the G
    rows of a prompt) and its own generated keys; one softmax over both, in float32."""
    r, _, n, h = q_r1nh.shape
    b, kv, _, p = kp_bkhs.shape
    g, rep, ng = r // b, n // kv, kg_rksh.shape[2]

    def to_prompt_rows(x_rk_):  # [R, K, rep, X] -> [B, K, G * rep, X]
        x = x_rk_.reshape(b, g, kv, rep, -1).transpose(0, 2, 1, 3, 4)
        return x.reshape(b, kv, g * rep, -1)

    def to_rows(x_bk_):  # the inverse
        x = x_bk_.reshape(b, kv, g, rep, -1).transpose(0, 2, 1, 3, 4)
        return x.reshape(r, kv, rep, -1)

    q_rkqh = q_r1nh.reshape(r, kv, rep, h)
    s_p = jnp.einsum("bkmh,bkhs->bkms", to_prompt_rows(q_rkqh), kp_bkhs,
                     preferred_element_type=jnp.float32)
    s_g = to_prompt_rows(jnp.einsum("rkqh,rksh->rkqs", q_rkqh, kg_rksh,
                                    preferred_element_type=jnp.float32))
    scores = jnp.concatenate([s_p, s_g], axis=-1) * cfg.attn_scale
    if cfg.attn_logit_softcap:
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    mask = jnp.concatenate([mask_p_bs, mask_g_bs], axis=-1)[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, decoder._NEG_INF), axis=-1)
    probs = probs.astype(vp_bksh.dtype)
    out_p = jnp.einsum("bkms,bksh->bkmh", probs[..., :p], vp_bksh,
                       preferred_element_type=jnp.float32)
    out_g = jnp.einsum("rkqs,rksh->rkqh", to_rows(probs[..., p:]).reshape(r, kv, rep, ng),
                       vg_rksh, preferred_element_type=jnp.float32)
    out = to_rows(out_p) + out_g
    return out.reshape(r, 1, n, h).astype(q_r1nh.dtype)


def decode_step(cfg: ModelConfig, params: Params, tokens_r: jax.Array, step: jax.Array,
                cache: SharedPromptCache) -> tuple[jax.Array, SharedPromptCache]:
    """Generated token `step` of every row (`tokens_r` [R]): write its keys/values and attend
    over its prompt and the tokens before it. `params` from `decode_layout`. Returns the last
    hidden states [R, 1, D] (before the final norm) and the cache."""
    r = tokens_r.shape[0]
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = cache.group
    p, slots = cache.prompt_slots, cache.generated.num_slots
    positions_r1 = (jnp.repeat(cache.prompt_len_b, g) + step)[:, None]
    rope_g, rope_l = decoder._rope_tables(cfg, positions_r1)
    # Query position minus key position, per prompt for the prompt part (the G rows of a prompt
    # sit at the same position) and alike for all rows in the generated part.
    diff_p_bs = (cache.prompt_len_b + step)[:, None] - jnp.arange(p)
    diff_g_bs = jnp.broadcast_to(step - jnp.arange(slots), (cache.prompt_len_b.shape[0], slots))

    def masks(sliding: bool):
        mp = jnp.arange(p) < cache.prompt_len_b[:, None]
        mg = diff_g_bs >= 0
        if sliding and cfg.sliding_window:
            mp, mg = mp & (diff_p_bs < cfg.sliding_window), mg & (diff_g_bs < cfg.sliding_window)
        return mp, mg

    mask_sets = {False: masks(False), True: masks(True)}
    act = activation_fn(cfg.activation)
    kg, vg = list(cache.generated.k_lbksh), list(cache.generated.v_lbksh)
    kp, vp = cache.prompt_k_lbkhs, cache.prompt_v_lbksh

    x_dr = decoder.embed(cfg, params, tokens_r[:, None])[:, 0].T
    for i, (lp, sliding) in enumerate(zip(params["layers"], cfg.layer_is_sliding(), strict=True)):
        qkv_er = lp["qkv_t"] @ decoder.rms_norm(cfg, x_dr, lp["attn_norm"], axis=0)
        # The barrier keeps the product [E, rows]: transposed right after it, XLA would
        # rewrite it as rows @ W^T, the slow form.
        qkv_re = jax.lax.optimization_barrier(qkv_er).T
        q, kk, v = jnp.split(qkv_re, (n * h, (n + k) * h), axis=1)
        rope_cs = rope_l if sliding else rope_g
        q, kk, v = decoder._qkv_post(cfg, lp, q.reshape(r, 1, n, h), kk.reshape(r, 1, k, h),
                                     v.reshape(r, 1, k, h), rope_cs)
        at = (0, 0, step, 0)
        kg[i] = jax.lax.dynamic_update_slice(kg[i], kk.transpose(0, 2, 1, 3).astype(kg[i].dtype), at)
        vg[i] = jax.lax.dynamic_update_slice(vg[i], v.transpose(0, 2, 1, 3).astype(vg[i].dtype), at)
        attn = _attend_shared(cfg, q, kp[i].astype(q.dtype), vp[i].astype(q.dtype),
                              kg[i].astype(q.dtype), vg[i].astype(q.dtype),
                              *mask_sets[bool(sliding)])
        attn_dr = lp["o_t"] @ attn.reshape(r, n * h).T
        if cfg.attention_bias:
            attn_dr = attn_dr + lp["o_bias"][:, None]
        if cfg.sandwich_norms:
            attn_dr = decoder.rms_norm(cfg, attn_dr, lp["post_attn_norm"], axis=0)
        x_dr = x_dr + attn_dr
        gate_up = lp["gate_up_t"] @ decoder.rms_norm(cfg, x_dr, lp["mlp_norm"], axis=0)
        gate, up = jnp.split(gate_up, 2, axis=0)
        mlp_dr = lp["down_t"] @ (act(gate) * up)
        if cfg.sandwich_norms:
            mlp_dr = decoder.rms_norm(cfg, mlp_dr, lp["post_mlp_norm"], axis=0)
        x_dr = x_dr + mlp_dr
    return x_dr.T[:, None], cache.replace(generated=KVCache(tuple(kg), tuple(vg)))
