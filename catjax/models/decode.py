"""One decode step over a shared-prompt cache, the layer matmuls merged and unrolled.

The G rows that continue one prompt share its keys and values (`SharedPromptCache`): each step
attends the prompt once per prompt, its G rows' queries as one matmul, and only the generated
part per row. Attention over a per-row cache was the largest cost of a SmolLM2 decode step (85 of
~300 ms at 32 rows, 128-slot prompts, bench/RESULTS.md), most of it rereading the same prompt.

The generated part lies in blocks that double in size (`window_blocks`): while a row writes
block j, the step attends blocks 0..j only, not every slot the loop will ever fill. The sampler
runs one `lax.while_loop` per block, each with its static window.

Two orientations of the layer matmuls (`decode_layout(weights_first=...)`):
- weights first, for CPUs: at a few dozen rows XLA:CPU runs W [out, in] @ h [in, rows] markedly
  faster than h [rows, in] @ W [in, out] (SmolLM2-135M, 32 rows: the layers' matmuls 150 -> 110
  ms a step, bench/RESULTS.md). XLA's simplifier turns a transposed product back into the slow
  form, so the hidden state itself stays feature-major, [D, rows], from embedding to last layer.
- rows first, h @ W, for GPUs, whose GEMMs take either form (TPUs decode with the scan).
Either way q/k/v and gate/up are one matmul each.

`decode_layout` builds the per-layer weights once per sampler call (one copy of the layers, as
`decoder.unstack_layers` makes); `decode_step` gives the values of `decoder.hidden_cached` for one
token per row over the equivalent per-row cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from catjax import parallel
from catjax.models import decoder
from catjax.models.config import ModelConfig
from catjax.models.decoder import KVCache, Params
from catjax.models.mlp import activation_fn

_MATMULS = ("q", "k", "v", "o", "gate", "up", "down")


def decode_layout(cfg: ModelConfig, params: Params, weights_first: bool = True) -> Params:
    """`params` with "layers" as a tuple of per-layer dicts holding merged matmul weights.
    Weights first (output-major): qkv_t [(N + 2K) * H, D], o_t [D, N * H], gate_up_t [2F, D],
    down_t [D, F]. Rows first: qkv [D, (N + 2K) * H], o [N * H, D], gate_up [D, 2F], down [F, D].
    Norms and biases unchanged; the embedding, final norm and head stay as they are."""
    d = cfg.hidden_size
    layers = decoder.unstack_layers(params)["layers"]

    def one(p: Params) -> Params:
        out = {name: w for name, w in p.items() if name not in _MATMULS}
        merged = {
            "qkv": jnp.concatenate([p[name].reshape(d, -1) for name in ("q", "k", "v")], axis=1),
            "o": p["o"].reshape(-1, d),
            "gate_up": jnp.concatenate([p["gate"], p["up"]], axis=1),
            "down": p["down"],
        }
        if weights_first:
            return out | {f"{name}_t": w.T for name, w in merged.items()}
        return out | merged

    return {**params, "layers": tuple(one(p) for p in layers)}


def is_decode_layout(params: Params) -> bool:
    layers = params["layers"]
    return isinstance(layers, tuple | list) and bool(layers) and (
        "qkv_t" in layers[0] or "qkv" in layers[0])


def window_blocks(max_new_tokens: int, first: int | None = None) -> tuple[int, ...]:
    """Sizes of the generated cache's blocks: `first`, `first`, then doubling, the last cut to
    end at `max_new_tokens`. A step in block j attends blocks 0..j, at most twice the tokens
    before it (once past the first block). None, 0 or >= max_new_tokens: one block."""
    if first is not None and first < 0:
        raise ValueError(f"decode window {first} must be >= 0 (0: one block)")
    if not first or first >= max_new_tokens:
        return (max_new_tokens,)
    sizes, total = [first], first
    while total < max_new_tokens:
        sizes.append(min(total, max_new_tokens - total))
        total += sizes[-1]
    return tuple(sizes)


@flax.struct.dataclass
class SharedPromptCache:
    """The decode loop's cache when rows [i*G, (i+1)*G) all continue prompt i.

    The prompt's keys/values once per prompt, per layer: keys transposed, [B, K, H, P], so that
    the step's score matmul reads them as its right operand lies (XLA:CPU otherwise repacks them
    every step: 5-12% of a step over a 1024-slot prompt, bench/RESULTS.md); values [B, K, P, H].
    Slot s holds position s; slots from `prompt_len_b` on are padding, never attended.
    `generated`: each row's own, in blocks (`window_blocks`), per layer [R, K, S_j, H]; slot s of
    block j holds generated token start_j + s (position prompt_len + start_j + s).
    """

    prompt_k_lbkhs: tuple[jax.Array, ...]
    prompt_v_lbksh: tuple[jax.Array, ...]
    generated: tuple[KVCache, ...]
    prompt_len_b: jax.Array  # [B] int32

    @property
    def group(self) -> int:
        return self.generated[0].k_lbksh[0].shape[0] // self.prompt_len_b.shape[0]

    @property
    def prompt_slots(self) -> int:
        return self.prompt_v_lbksh[0].shape[2]

    @property
    def block_starts(self) -> tuple[int, ...]:
        """The generated token index each block starts at; the last entry is the total."""
        starts = [0]
        for blk in self.generated:
            starts.append(starts[-1] + blk.num_slots)
        return tuple(starts)


def init_shared_cache(cfg: ModelConfig, prompt_cache: KVCache, prompt_len_b: jax.Array,
                      num_samples: int, max_new_tokens: int, dtype=None,
                      window: int | None = None) -> SharedPromptCache:
    """Empty generated slots for `num_samples` rows per prompt behind a prefilled prompt cache,
    in `window_blocks(max_new_tokens, window)`."""
    rows = prompt_len_b.shape[0] * num_samples
    prompt = prompt_cache.unstacked()
    dtype = dtype or prompt.k_lbksh[0].dtype
    gen = tuple(decoder.init_cache(cfg, rows, size, dtype).unstacked()
                for size in window_blocks(max_new_tokens, window))
    return SharedPromptCache(tuple(k.swapaxes(2, 3) for k in prompt.k_lbksh), prompt.v_lbksh,
                             gen, prompt_len_b)


def _attend_shared(cfg: ModelConfig, q_r1nh, kp_bkhs, vp_bksh, kg_blocks, vg_blocks, mask_p_bs,
                   masks_g) -> jax.Array:
    """Grouped-query attention of one query per row over its prompt's keys (shared by the G
    rows of a prompt) and its own generated keys (a list of blocks [R, K, S_j, H]); one softmax
    over all of them, in float32."""
    r, _, n, h = q_r1nh.shape
    b, kv, _, p = kp_bkhs.shape
    g, rep = r // b, n // kv

    def to_prompt_rows(x_rk_):  # [R, K, rep, X] -> [B, K, G * rep, X]
        x = x_rk_.reshape(b, g, kv, rep, -1).transpose(0, 2, 1, 3, 4)
        return x.reshape(b, kv, g * rep, -1)

    def to_rows(x_bk_):  # the inverse
        x = x_bk_.reshape(b, kv, g, rep, -1).transpose(0, 2, 1, 3, 4)
        return x.reshape(r, kv, rep, -1)

    q_rkqh = q_r1nh.reshape(r, kv, rep, h)
    s_p = jnp.einsum("bkmh,bkhs->bkms", to_prompt_rows(q_rkqh), kp_bkhs,
                     preferred_element_type=jnp.float32)
    s_g = [to_prompt_rows(jnp.einsum("rkqh,rksh->rkqs", q_rkqh, k,
                                     preferred_element_type=jnp.float32)) for k in kg_blocks]
    scores = jnp.concatenate([s_p, *s_g], axis=-1) * cfg.attn_scale
    if cfg.attn_logit_softcap:
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    mask = jnp.concatenate([mask_p_bs, *masks_g], axis=-1)[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, decoder._NEG_INF), axis=-1)
    probs = probs.astype(vp_bksh.dtype)
    out = to_rows(jnp.einsum("bkms,bksh->bkmh", probs[..., :p], vp_bksh,
                             preferred_element_type=jnp.float32))
    start = p
    for v in vg_blocks:
        size = v.shape[2]
        probs_j = to_rows(probs[..., start:start + size]).reshape(r, kv, rep, size)
        out = out + jnp.einsum("rkqs,rksh->rkqh", probs_j, v, preferred_element_type=jnp.float32)
        start += size
    return out.reshape(r, 1, n, h).astype(q_r1nh.dtype)


def decode_step(cfg: ModelConfig, params: Params, tokens_r: jax.Array, step: jax.Array,
                cache: SharedPromptCache, block: int = 0,
                mesh: Mesh | None = None) -> tuple[jax.Array, SharedPromptCache]:
    """Generated token `step` of every row (`tokens_r` [R]): write its keys/values and attend
    over its prompt and the tokens before it. `step` must lie in generated block `block`
    (static), whose slots and those of the blocks before it are all the step reads. `params`
    from `decode_layout`, either orientation. Returns the last hidden states [R, 1, D] (before
    the final norm) and the cache. `mesh`: with an fsdp axis the weights stay in place and the
    hidden states' features split over it (`parallel.split_features`)."""
    r = tokens_r.shape[0]
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g, p, starts = cache.group, cache.prompt_slots, cache.block_starts
    if not 0 <= block < len(cache.generated):
        raise ValueError(f"block={block}: the cache has {len(cache.generated)} generated blocks")
    if not is_decode_layout(params):
        raise ValueError("decode_step: params must come from models.decode_layout (merged, "
                         "per-layer weights), not the stacked model params")
    wf = "qkv_t" in params["layers"][0]
    fa = 0 if wf else 1  # the feature axis of the hidden state: [D, R] weights first, else [R, D]

    def matmul(lp, name, x):
        return lp[f"{name}_t"] @ x if wf else x @ lp[name]

    def to_rows(x):  # [E, R] or [R, E] -> [R, E]
        # Weights first, the barrier keeps the product [E, rows]: transposed right after it, XLA
        # would rewrite it as rows @ W^T, the slow form on CPUs.
        return jax.lax.optimization_barrier(x).T if wf else x

    def bias(w):
        return w[:, None] if wf else w

    def residual(x):  # [D, R] weights first, else [R, D]
        return parallel.split_features(x, mesh, row_axis=1 - fa, feature_axis=fa)

    positions_r1 = (jnp.repeat(cache.prompt_len_b, g) + step)[:, None]
    rope_g, rope_l = decoder._rope_tables(cfg, positions_r1)
    num_b = cache.prompt_len_b.shape[0]
    # Query position minus key position, per prompt for the prompt part (the G rows of a prompt
    # sit at the same position) and alike for all rows in the generated part.
    diff_p_bs = (cache.prompt_len_b + step)[:, None] - jnp.arange(p)
    diffs_g = [jnp.broadcast_to(step - starts[j] - jnp.arange(starts[j + 1] - starts[j]),
                                (num_b, starts[j + 1] - starts[j])) for j in range(block + 1)]

    def masks(sliding: bool):
        mp = jnp.arange(p) < cache.prompt_len_b[:, None]
        mg = [d >= 0 for d in diffs_g]
        if sliding and cfg.sliding_window:
            mp = mp & (diff_p_bs < cfg.sliding_window)
            mg = [m & (d < cfg.sliding_window) for m, d in zip(mg, diffs_g, strict=True)]
        return mp, mg

    mask_sets = {False: masks(False), True: masks(True)}
    act = activation_fn(cfg.activation)
    gen = [(list(c.k_lbksh), list(c.v_lbksh)) for c in cache.generated]
    kw, vw = gen[block]  # the block this step writes
    kp, vp = cache.prompt_k_lbkhs, cache.prompt_v_lbksh

    x = decoder.embed(cfg, params, tokens_r[:, None])[:, 0]
    x = residual(x.T if wf else x)
    for i, (lp, sliding) in enumerate(zip(params["layers"], cfg.layer_is_sliding(), strict=True)):
        qkv_re = to_rows(matmul(lp, "qkv", decoder.rms_norm(cfg, x, lp["attn_norm"], axis=fa)))
        q, kk, v = jnp.split(qkv_re, (n * h, (n + k) * h), axis=1)
        rope_cs = rope_l if sliding else rope_g
        q, kk, v = decoder._qkv_post(cfg, lp, q.reshape(r, 1, n, h), kk.reshape(r, 1, k, h),
                                     v.reshape(r, 1, k, h), rope_cs)
        at = (0, 0, step - starts[block], 0)
        kw[i] = jax.lax.dynamic_update_slice(kw[i], kk.transpose(0, 2, 1, 3).astype(kw[i].dtype), at)
        vw[i] = jax.lax.dynamic_update_slice(vw[i], v.transpose(0, 2, 1, 3).astype(vw[i].dtype), at)
        attn = _attend_shared(cfg, q, kp[i].astype(q.dtype), vp[i].astype(q.dtype),
                              [gen[j][0][i].astype(q.dtype) for j in range(block + 1)],
                              [gen[j][1][i].astype(q.dtype) for j in range(block + 1)],
                              *mask_sets[bool(sliding)])
        attn_re = attn.reshape(r, n * h)
        attn_x = matmul(lp, "o", attn_re.T if wf else attn_re)
        if cfg.attention_bias:
            attn_x = attn_x + bias(lp["o_bias"])
        if cfg.sandwich_norms:
            attn_x = decoder.rms_norm(cfg, attn_x, lp["post_attn_norm"], axis=fa)
        x = x + attn_x
        gate, up = jnp.split(matmul(lp, "gate_up",
                                    decoder.rms_norm(cfg, x, lp["mlp_norm"], axis=fa)), 2, axis=fa)
        mlp_x = matmul(lp, "down", act(gate) * up)
        if cfg.sandwich_norms:
            mlp_x = decoder.rms_norm(cfg, mlp_x, lp["post_mlp_norm"], axis=fa)
        x = residual(x + mlp_x)
    generated = tuple(KVCache(tuple(kk_), tuple(vv_)) for kk_, vv_ in gen)
    return (x.T if wf else x)[:, None], cache.replace(generated=generated)
