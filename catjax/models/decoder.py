"""The decoder: pure functions of `(ModelConfig, params, tokens[, cache])`.

Parameters are a plain pytree; every per-layer array is stacked on a leading layer axis and the
layers run under `jax.lax.scan`, so a 36-layer model compiles as fast as a 1-layer one. Gemma 3's
mix of sliding-window and global layers is a per-layer flag scanned alongside the weights.

Shapes in names: b batch, t query positions, s key positions (cache slots), d hidden, n query heads,
k kv heads, g query heads per kv head, h head_dim, f MLP width, v vocabulary, l layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from catjax import parallel
from catjax.models.config import ModelConfig
from catjax.models.mlp import gated_mlp

Params = dict[str, Any]
_NEG_INF = -1e30  # finite, so fully masked rows (padding queries) stay NaN-free
# Query rows per attention block of a cached prefill: float32 scores [B, N, 1024, S] per layer
# (1.75 GiB a row for Qwen 3 4B's 32 heads at S ~ 14k) instead of [B, N, P, S] (~22 GiB).
DEFAULT_Q_CHUNK = 1024


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer; slot s holds the token at position s.

    Layout [L, B, K, S, H]: (batch, kv head) lead so that both attention matmuls read the cache
    as it lies, with no per-step transpose of the whole cache.
    """

    k_lbksh: Any  # [L, B, K, S, H], or a tuple of L [B, K, S, H] arrays (see `unstacked`)
    v_lbksh: Any

    @property
    def is_stacked(self) -> bool:
        return not isinstance(self.k_lbksh, tuple | list)

    @property
    def num_slots(self) -> int:
        return self.k_lbksh.shape[3] if self.is_stacked else self.k_lbksh[0].shape[2]

    def unstacked(self) -> KVCache:
        """One array per layer: what `hidden_cached` with per-layer params reads and writes."""
        if not self.is_stacked:
            return self
        n = self.k_lbksh.shape[0]
        return KVCache(tuple(self.k_lbksh[i] for i in range(n)),
                       tuple(self.v_lbksh[i] for i in range(n)))

    def stacked(self) -> KVCache:
        if self.is_stacked:
            return self
        return KVCache(jnp.stack(self.k_lbksh), jnp.stack(self.v_lbksh))


def init_cache(cfg: ModelConfig, batch: int, num_slots: int, dtype: Any = None) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, num_slots, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# --- parameters ------------------------------------------------------------------------------

def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree as shapes. The single source of truth for names and layouts."""
    d, n, k, h, f, v, nl = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.mlp_dim, cfg.vocab_size, cfg.num_layers)
    layer: Params = {
        "attn_norm": (nl, d),
        "q": (nl, d, n, h), "k": (nl, d, k, h), "v": (nl, d, k, h), "o": (nl, n, h, d),
        "mlp_norm": (nl, d),
        "gate": (nl, d, f), "up": (nl, d, f), "down": (nl, f, d),
    }
    if cfg.attention_bias:
        layer.update(q_bias=(nl, n, h), k_bias=(nl, k, h), v_bias=(nl, k, h), o_bias=(nl, d))
    if cfg.qk_norm:
        layer.update(q_norm=(nl, h), k_norm=(nl, h))
    if cfg.sandwich_norms:
        layer.update(post_attn_norm=(nl, d), post_mlp_norm=(nl, d))
    tree: Params = {"embed": (v, d), "layers": layer, "final_norm": (d,)}
    if not cfg.tie_embeddings:
        tree["lm_head"] = (d, v)
    return tree


def logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (mapped to mesh axes by `catjax.parallel`)."""
    names = {
        "embed": ("vocab", "embed"), "final_norm": ("norm",), "lm_head": ("embed", "vocab"),
        "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
        "post_attn_norm": ("layers", "norm"), "post_mlp_norm": ("layers", "norm"),
        "q": ("layers", "embed", "heads", "head_dim"), "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"), "o": ("layers", "heads", "head_dim", "embed"),
        "q_bias": ("layers", "heads", "head_dim"), "k_bias": ("layers", "kv_heads", "head_dim"),
        "v_bias": ("layers", "kv_heads", "head_dim"), "o_bias": ("layers", "embed"),
        "q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim"),
        "gate": ("layers", "embed", "mlp"), "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    shapes = param_shapes(cfg)
    out: Params = {key: names[key] for key in shapes if key != "layers"}
    out["layers"] = {key: names[key] for key in shapes["layers"]}
    return out


def unstack_layers(params: Params) -> Params:
    """`params` with "layers" as a tuple of per-layer trees instead of stacked arrays.

    `hidden_cached` then runs the layers as straight-line code. On the CPU a decode step under
    `lax.scan` copies every layer's weights (a dynamic slice feeding a dot is materialised) and
    cache: 540 MB per step for SmolLM2-135M in float32, about a third of the step. On an H200
    the scanned step of a 1.1B model took 4.85 ms against 2.92 ms unrolled (bench/gpu.sh).
    Slicing once before the decode loop costs one copy of the weights in memory instead.
    """
    layers = params["layers"]
    if isinstance(layers, tuple | list):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n))}


def _is_norm(name: str) -> bool:
    return name.endswith("norm")


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal, std 0.02; norms at identity), in `cfg.dtype`.

    One compiled program fills one flat buffer with normal draws, a chunk per loop step, and
    cuts it into the leaves: XLA:CPU spends ~0.4 s compiling each distinct random draw, so a draw
    per leaf (a dozen for a 2-layer test model) took ~5 s to start a run; this takes under one,
    with the parameters' memory twice (the buffer and the leaves) at the peak."""
    return _init_params(cfg, rng)


_INIT_CHUNK = 1 << 20  # normal draws per loop step of `_init_params`


@functools.partial(jax.jit, static_argnums=0)
def _init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    names = [path[-1].key for path, _ in leaves]
    drawn = [not (_is_norm(n) or n.endswith("bias")) for n in names]
    sizes = [math.prod(shape) for _, shape in leaves]
    total = sum(s for s, d in zip(sizes, drawn, strict=True) if d)
    chunk = min(_INIT_CHUNK, total)
    steps = -(-total // chunk)

    def fill(i, buf):
        z = 0.02 * jax.random.normal(jax.random.fold_in(rng, i), (chunk,), jnp.float32)
        return jax.lax.dynamic_update_slice(buf, z.astype(buf.dtype), (i * chunk,))

    flat = jax.lax.fori_loop(0, steps, fill, jnp.zeros((steps * chunk,), cfg.jnp_dtype))
    out, offset = [], 0
    for name, (_, shape), size, d in zip(names, leaves, sizes, drawn, strict=True):
        if d:
            out.append(flat[offset:offset + size].reshape(shape))
            offset += size
        else:
            # Gemma stores w in x * (1 + w): identity is 0.
            fill_value = 0.0 if _is_norm(name) and cfg.norm_style == "gemma" else float(_is_norm(name))
            out.append(jnp.full(shape, fill_value, cfg.jnp_dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(cfg: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` tree: for compiling without materialising weights."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, cfg.jnp_dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


# --- building blocks -------------------------------------------------------------------------

def rms_norm(cfg: ModelConfig, x: jax.Array, w: jax.Array, axis: int = -1) -> jax.Array:
    """RMSNorm over `axis` in float32. Gemma scales by (1 + w) in float32; Llama casts back
    before * w. `axis=0`: a feature-major [D, rows] hidden state (`models.decode`)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + cfg.norm_eps)
    w = w.reshape(w.shape + (1,) * (x.ndim - 1 - axis % x.ndim))
    if cfg.norm_style == "gemma":
        return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * normed.astype(x.dtype)


def _rope(x_bthh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotary embedding, half-split layout (the Hugging Face convention), in float32."""
    x = x_bthh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthh.dtype)


def _rope_tables(cfg: ModelConfig, positions_bt: jax.Array):
    """cos/sin [B, T, head_dim/2] for the global and the local (sliding-layer) RoPE."""
    def table(rope):
        inv = jnp.asarray(rope.inv_freq(cfg.head_dim), jnp.float32)
        ang = positions_bt.astype(jnp.float32)[..., None] * inv
        return jnp.cos(ang), jnp.sin(ang)

    glob = table(cfg.rope)
    local = table(cfg.rope_local) if cfg.rope_local is not None else glob
    return glob, local


def _attention_mask(cfg: ModelConfig, q_pos_bt, k_pos_bs, k_valid_bs, sliding) -> jax.Array:
    """[B, T, S] bool: causal by position, valid keys, and the window on sliding layers."""
    diff = q_pos_bt[:, :, None] - k_pos_bs[:, None, :]
    mask = (diff >= 0) & k_valid_bs[:, None, :]
    if cfg.sliding_window:
        mask &= jnp.logical_not(sliding) | (diff < cfg.sliding_window)
    return mask


def _attend(cfg: ModelConfig, q_btnh, k_bksh, v_bksh, mask_bts) -> jax.Array:
    """Grouped-query attention over keys [B, K, S, H]; scores and softmax in float32."""
    b, t, n, h = q_btnh.shape
    kv = k_bksh.shape[1]
    # [B, K, G*T, H]: the query heads sharing a kv head become rows of one matmul.
    q_bkrh = q_btnh.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, h)
    scores = jnp.einsum("bkrh,bksh->bkrs", q_bkrh, k_bksh,
                        preferred_element_type=jnp.float32) * cfg.attn_scale
    if cfg.attn_logit_softcap:
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    mask = jnp.broadcast_to(mask_bts[:, None, None], (b, 1, n // kv, t, mask_bts.shape[-1]))
    scores = jnp.where(mask.reshape(b, 1, -1, mask_bts.shape[-1]), scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bksh.dtype)
    out = jnp.einsum("bkrs,bksh->bkrh", probs, v_bksh, preferred_element_type=jnp.float32)
    out = out.reshape(b, kv, n // kv, t, h).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def _attend_chunked(cfg: ModelConfig, q_btnh, k_bksh, v_bksh, q_pos_bt, k_pos_bs, k_valid_bs,
                    sliding, q_chunk: int, prefill: bool = False, start: int = 0) -> jax.Array:
    """`_attend` over query blocks of at most `q_chunk` rows, one block at a time.

    A long prefill (the anchor's ~13k-token synthesis prompt) would otherwise hold float32
    scores [B, N, T, S] at once (tens of GiB); per block they are [B, N, q_chunk, S]. Each query
    row's softmax runs over all keys, so the result equals the unchunked one. Masks are built
    per block for the same reason.

    `prefill`: query i sits at position start + i (a prompt written from slot 0, `start` tokens
    of it already in the cache), so block j only needs keys [0, start + end of block j): the
    blocks run one after another over growing key prefixes and the causal upper triangle, about
    half the work, is never computed.
    """
    b, t, n, h = q_btnh.shape
    nc = -(-t // q_chunk)
    # Even blocks, rounded up to a multiple of 8 (TPU sublanes) but never above q_chunk.
    c = -(-t // nc)
    c = min(q_chunk, -(-c // 8) * 8)
    pad = nc * c - t
    q = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    # Padding queries sit at position -1: causally masked from every key, dropped below.
    pos = jnp.pad(q_pos_bt, ((0, 0), (0, pad)), constant_values=-1)

    def block(args, end: int | None = None):
        q_bcnh, pos_bc = args
        mask = _attention_mask(cfg, pos_bc, k_pos_bs[:, :end], k_valid_bs[:, :end], sliding)
        return _attend(cfg, q_bcnh, k_bksh[:, :, :end], v_bksh[:, :, :end], mask)

    if prefill:
        outs = [block((q[:, j * c:(j + 1) * c], pos[:, j * c:(j + 1) * c]),
                      end=min(start + (j + 1) * c, k_bksh.shape[2])) for j in range(nc)]
        return jnp.concatenate(outs, axis=1)[:, :t]

    out = jax.lax.map(block, (q.reshape(b, nc, c, n, h).swapaxes(0, 1),
                              pos.reshape(b, nc, c).swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(b, nc * c, n, h)[:, :t]


def _attend_kernel(cfg: ModelConfig, q_b1nh, k_bksh, v_bksh, pos_b, start_b, mesh) -> jax.Array:
    """`_attend` of one query a row over slots [start_b, pos_b] by `decode_kernel`."""
    from catjax.models import decode_kernel  # Pallas, imported where a program asks for it

    b, _, n, h = q_b1nh.shape
    kv = k_bksh.shape[1]
    out = decode_kernel.decode_attention_sharded(
        q_b1nh.reshape(b, kv, n // kv, h), k_bksh, v_bksh, start_b, pos_b + 1, mesh,
        scale=cfg.attn_scale, softcap=cfg.attn_logit_softcap or 0.0)
    return out.reshape(b, 1, n, h).astype(q_b1nh.dtype)


def _mlp(cfg: ModelConfig, p: Params, x_btd: jax.Array) -> jax.Array:
    return gated_mlp(cfg.activation, x_btd, p["gate"], p["up"], p["down"])


def _qkv(cfg: ModelConfig, p: Params, x_btd, rope_cs):
    q = jnp.einsum("btd,dnh->btnh", x_btd, p["q"])
    k = jnp.einsum("btd,dkh->btkh", x_btd, p["k"])
    v = jnp.einsum("btd,dkh->btkh", x_btd, p["v"])
    return _qkv_post(cfg, p, q, k, v, rope_cs)


def _qkv_post(cfg: ModelConfig, p: Params, q, k, v, rope_cs):
    """Biases, q/k norms and RoPE on the projected [B, T, heads, H] queries and keys."""
    if cfg.attention_bias:
        q = q + p["q_bias"]
    if cfg.qk_norm:
        q = rms_norm(cfg, q, p["q_norm"])
    return (_rope(q, *rope_cs), *_kv_post(cfg, p, k, v, rope_cs))


def _kv_post(cfg: ModelConfig, p: Params, k, v, rope_cs):
    """`_qkv_post` for the keys and values alone (`_kv_only` shares it)."""
    if cfg.attention_bias:
        k, v = k + p["k_bias"], v + p["v_bias"]
    if cfg.qk_norm:
        k = rms_norm(cfg, k, p["k_norm"])
    return _rope(k, *rope_cs), v


def _kv_only(cfg: ModelConfig, p: Params, x_btd, rope_cs):
    """A layer's keys and values of `x_btd` (its input), as `_layer` computes them."""
    h = rms_norm(cfg, x_btd, p["attn_norm"])
    k = jnp.einsum("btd,dkh->btkh", h, p["k"])
    v = jnp.einsum("btd,dkh->btkh", h, p["v"])
    return _kv_post(cfg, p, k, v, rope_cs)


def _layer(cfg: ModelConfig, p: Params, x_btd, rope_cs, attend_fn):
    """One pre-norm transformer layer; `attend_fn(q, k, v) -> out` hides cache handling.

    `models.decode.decode_step` runs the same layer with merged matmuls: a change
    here must be made there too (tests/models/test_decode.py compares the two per family)."""
    h = rms_norm(cfg, x_btd, p["attn_norm"])
    q, k, v = _qkv(cfg, p, h, rope_cs)
    attn = jnp.einsum("btnh,nhd->btd", attend_fn(q, k, v), p["o"])
    if cfg.attention_bias:
        attn = attn + p["o_bias"]
    if cfg.sandwich_norms:
        attn = rms_norm(cfg, attn, p["post_attn_norm"])
    x_btd = x_btd + attn
    h = _mlp(cfg, p, rms_norm(cfg, x_btd, p["mlp_norm"]))
    if cfg.sandwich_norms:
        h = rms_norm(cfg, h, p["post_mlp_norm"])
    return x_btd + h


def embed(cfg: ModelConfig, params: Params, tokens_bt: jax.Array) -> jax.Array:
    x = jnp.take(params["embed"], tokens_bt, axis=0).astype(cfg.jnp_dtype)
    if cfg.embed_scale:
        # Hugging Face rounds the scale to the weights' dtype first; so do we.
        x = x * jnp.asarray(cfg.hidden_size**0.5, cfg.jnp_dtype)
    return x


def logits_from_hidden(cfg: ModelConfig, params: Params, x_btd: jax.Array) -> jax.Array:
    """Final norm and output head; float32 logits [B, T, V]."""
    x_btd = rms_norm(cfg, x_btd, params["final_norm"])
    return head_logits(x_btd, head_weight(cfg, params), cfg.tie_embeddings,
                       cfg.final_logit_softcap or 0.0)


def head_weight(cfg: ModelConfig, params: Params) -> jax.Array:
    """The output head: the embedding [V, D] when tied, else `lm_head` [D, V]."""
    return params["embed"] if cfg.tie_embeddings else params["lm_head"]


def head_gathered(cfg: ModelConfig, params: Params, mesh: Mesh | None,
                  from_shards: bool = True) -> Params:
    """`params` with the output head gathered over the mesh's fsdp axis (once, before a loop
    over chunks of positions or decode steps: otherwise GSPMD gathers every row's logits, or the
    head, inside it). `from_shards=False`: inside such a loop, on the copy gathered before it."""
    name = "embed" if cfg.tie_embeddings else "lm_head"
    w = parallel.gathered_over_fsdp(params[name], logical_axes(cfg)[name], mesh,
                                    from_shards=from_shards)
    return {**params, name: w}


def head_logits(x_btd: jax.Array, w: jax.Array, tied: bool, softcap: float) -> jax.Array:
    """float32 logits [B, T, V] of normed hidden states through the head weight `w`."""
    spec = "btd,vd->btv" if tied else "btd,dv->btv"
    logits = jnp.einsum(spec, x_btd, w, preferred_element_type=jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def _maybe_remat(cfg: ModelConfig, fn):
    return jax.checkpoint(fn, prevent_cse=False) if cfg.remat else fn


# --- full passes -----------------------------------------------------------------------------

def layer_logical_axes(cfg: ModelConfig) -> Params:
    """`logical_axes` of one layer's weights (a slice of the stacked "layers")."""
    return {k: names[1:] for k, names in logical_axes(cfg)["layers"].items()}


def hidden_states(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, *,
                  positions_bt: jax.Array | None = None,
                  mask_bt: jax.Array | None = None, mesh: Mesh | None = None) -> jax.Array:
    """Last hidden states [B, T, D] of a causal pass (before the final norm).

    `mesh`: the rows are split over its data-parallel axes and stay so; with an fsdp axis each
    layer's weights are gathered over it in turn (`parallel.gathered_over_fsdp`)."""
    b, t = tokens_bt.shape
    if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if mask_bt is None:
        mask_bt = jnp.ones((b, t), bool)
    rope_g, rope_l = _rope_tables(cfg, positions_bt)
    masks = (_attention_mask(cfg, positions_bt, positions_bt, mask_bt, False),
             _attention_mask(cfg, positions_bt, positions_bt, mask_bt, True))

    layer_axes = layer_logical_axes(cfg)

    def body(x, xs):
        p, sliding = xs
        p = parallel.gathered_over_fsdp(p, layer_axes, mesh)
        rope_cs = jax.tree.map(lambda g, loc: jnp.where(sliding, loc, g), rope_g, rope_l)
        mask = jnp.where(sliding, masks[1], masks[0])
        def attend(q, k, v):
            return _attend(cfg, q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)

        return parallel.keep_rows_split(_layer(cfg, p, x, rope_cs, attend), mesh), None

    x = parallel.keep_rows_split(embed(cfg, params, tokens_bt), mesh)
    x, _ = jax.lax.scan(_maybe_remat(cfg, body), x,
                        (params["layers"], jnp.asarray(cfg.layer_is_sliding())))
    return x


def forward(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, *,
            positions_bt: jax.Array | None = None, mask_bt: jax.Array | None = None) -> jax.Array:
    """Causal pass: tokens [B, T] int32 -> float32 logits [B, T, V].

    `positions_bt` (RoPE positions, default 0..T-1) and `mask_bt` (False marks padding keys) let
    one batch hold sequences with gaps, e.g. a right-padded prompt followed by its completion.
    """
    x = hidden_states(cfg, params, tokens_bt, positions_bt=positions_bt, mask_bt=mask_bt)
    return logits_from_hidden(cfg, params, x)


def hidden_cached(cfg: ModelConfig, params: Params, tokens_bt: jax.Array,
                  positions_bt: jax.Array, cache: KVCache, *,
                  q_chunk: int | None = DEFAULT_Q_CHUNK,
                  prefill: bool = False, start: int = 0,
                  kv_only_last: bool = False,
                  mesh: Mesh | None = None,
                  weights_in_place: bool | None = None,
                  decode_attention: str = "xla") -> tuple[jax.Array, KVCache]:
    """Write the keys/values of `tokens_bt` at slots `positions_bt` and attend over the cache.

    Slot s of a row holds the token at position s, so causality is `slot <= position` and stale
    slots beyond a row's current position (prompt padding) are never seen. Only the new entries
    are written (in place inside a loop or under donation): the cache is never copied. Returns
    the last hidden states [B, T, D] (before the final norm) and the updated cache.

    Params from `unstack_layers` run the layers unrolled over a per-layer cache (the form the
    cache is returned in); stacked params scan over a stacked cache.

    With more than `q_chunk` tokens (a prefill) the queries attend in blocks of `q_chunk` rows
    after the whole prompt's keys/values are written (`_attend_chunked`); None: one block.

    `prefill=True` promises that `positions_bt` is start..start+T-1 in every row (a prompt into
    an empty cache, or the next piece of one whose first `start` tokens are in it, see
    `models.prefill`): attention then reads only the first start+T slots, not the slots reserved
    for decoding, and chunked blocks skip the causal upper triangle.

    `kv_only_last`: the last layer writes its keys/values and computes nothing else; the hidden
    states returned are that layer's *input*. A prefill needs the last layer's output at one
    position per row (`last_layer_at`), and its queries, attention and MLP elsewhere are waste:
    nearly a quarter of the prefill of a 4-layer model.

    `mesh`: the rows are split over its data-parallel axes (`parallel.BATCH_AXES`), and each
    device writes the keys/values of its own rows. With an fsdp axis, several tokens per row
    gather each layer's weights over it (`parallel.gathered_over_fsdp`), as `hidden_states`
    does; one token per row (a decode step) leaves the weights in place and splits the hidden
    states' features over it (`parallel.split_features`); `weights_in_place=True` does that
    for a few tokens per row too (a drafted pass, `catjax.drafting`).

    `decode_attention="pallas"`: one token per row attends through `models.decode_kernel` (a
    Triton kernel that reads only each row's live slots) instead of XLA's ops over every slot.
    """
    b, t = tokens_bt.shape
    # The key slots attention reads.
    s = min(start + t, cache.num_slots) if prefill else cache.num_slots
    chunked = q_chunk is not None and t > q_chunk
    rope_g, rope_l = _rope_tables(cfg, positions_bt)
    slot_pos_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    all_valid = jnp.ones((b, s), bool)
    kernel = decode_attention == "pallas"
    if kernel and (t != 1 or prefill):
        raise ValueError(f"decode_attention='pallas' serves decode steps (one token a row), "
                         f"not {t} tokens{' of a prefill' if prefill else ''}")
    if kernel:  # the slots each row attends: [start, position]
        pos_b = positions_bt[:, 0]
        start_local_b = (jnp.maximum(pos_b - cfg.sliding_window + 1, 0) if cfg.sliding_window
                         else jnp.zeros_like(pos_b))
    elif not chunked:  # decode steps and short prompts: masks built once for all layers
        masks = (_attention_mask(cfg, positions_bt, slot_pos_bs, all_valid, False),
                 _attention_mask(cfg, positions_bt, slot_pos_bs, all_valid, True))

    def scatter(c, i, x_btkh, positions_bt):
        # Advanced indices around a slice: the update is laid out [B, T, K, H], as x is.
        rows_b1 = jnp.arange(x_btkh.shape[0])[:, None]
        return c.at[i, rows_b1, :, positions_bt].set(x_btkh.astype(c.dtype), mode="drop")

    # Each device writes its own rows: left to GSPMD, every device was sent every row's new keys
    # and values, each layer, each step (a vmapped scatter partitions, but XLA:CPU runs it
    # through two transposed copies of the cache).
    scatter = parallel.per_device_rows(scatter, mesh, in_axes=(1, None, 0, 0), out_axis=1)

    def write(c, i, x_btkh):
        return scatter(c, i, x_btkh, positions_bt)

    def rope_for(sliding):
        return jax.tree.map(lambda g, loc: jnp.where(sliding, loc, g), rope_g, rope_l)

    layer_axes = layer_logical_axes(cfg)

    # On an fsdp axis: a pass over many tokens per row gathers each layer's weights in turn
    # and keeps the rows split; a decode step (one token per row) keeps the weights in place
    # and splits its hidden states' features instead (`parallel.split_features`).
    many_tokens = (prefill or t > 1) if weights_in_place is None else not weights_in_place

    def weights(p):
        return parallel.gathered_over_fsdp(p, layer_axes, mesh) if many_tokens else p

    def residual(x):
        if many_tokens:
            return parallel.keep_rows_split(x, mesh)
        return parallel.split_features(x, mesh)

    def kv_only(carry, xs):
        x, ck, cv = carry
        p, sliding, i = xs
        k, v = _kv_only(cfg, weights(p), x, rope_for(sliding))
        return (x, write(ck, i, k), write(cv, i, v)), None

    def body(carry, xs):
        x, ck, cv = carry
        p, sliding, i = xs
        rope_cs = rope_for(sliding)
        new = {}

        def attend(q, k, v):
            new["k"], new["v"] = write(ck, i, k), write(cv, i, v)
            if kernel:
                return _attend_kernel(cfg, q, new["k"][i], new["v"][i], pos_b,
                                      jnp.where(sliding, start_local_b, 0), mesh)
            k_all, v_all = new["k"][i].astype(q.dtype), new["v"][i].astype(q.dtype)
            if s < k_all.shape[2]:
                k_all, v_all = k_all[:, :, :s], v_all[:, :, :s]
            if chunked:
                return _attend_chunked(cfg, q, k_all, v_all, positions_bt, slot_pos_bs, all_valid,
                                       sliding, q_chunk, prefill, start)
            return _attend(cfg, q, k_all, v_all, jnp.where(sliding, masks[1], masks[0]))

        x = residual(_layer(cfg, weights(p), x, rope_cs, attend))
        return (x, new["k"], new["v"]), None

    x = residual(embed(cfg, params, tokens_bt))
    last = cfg.num_layers - 1
    if isinstance(params["layers"], tuple | list):  # per-layer weights: straight-line layers
        cache = cache.unstacked()
        ks, vs = list(cache.k_lbksh), list(cache.v_lbksh)
        for i, (p, sliding) in enumerate(zip(params["layers"], cfg.layer_is_sliding(),
                                             strict=True)):
            step = kv_only if kv_only_last and i == last else body
            (x, k, v), _ = step((x, ks[i][None], vs[i][None]), (p, sliding, 0))
            ks[i], vs[i] = k[0], v[0]
        return x, KVCache(tuple(ks), tuple(vs))
    cache = cache.stacked()
    layers, sliding_l = params["layers"], jnp.asarray(cfg.layer_is_sliding())

    # Layers indexed inside the loop, as a scan over them would: slicing the first L-1 out of
    # the stacked weights would copy them. A kv-only last layer is sliced once, after the loop.
    def layer(i):
        return jax.tree.map(lambda a: a[i], layers), sliding_l[i], i

    carry = (x, cache.k_lbksh, cache.v_lbksh)
    carry, _ = jax.lax.scan(lambda c, i: body(c, layer(i)), carry,
                            jnp.arange(last if kv_only_last else cfg.num_layers))
    if kv_only_last:
        carry, _ = kv_only(carry, layer(last))
    x, ck, cv = carry
    return x, KVCache(ck, cv)


def last_layer_at(cfg: ModelConfig, params: Params, x_bd: jax.Array, pos_b: jax.Array,
                  cache: KVCache, num_slots: int | None = None) -> jax.Array:
    """The last layer's output [B, D] at one position per row, from its input `x_bd` there.

    Completes `hidden_cached(kv_only_last=True)`: the cache already holds the last layer's keys
    and values for every slot up to `pos_b`; only its first `num_slots` slots are read.
    """
    layers = params["layers"]
    p = layers[-1] if isinstance(layers, tuple | list) else jax.tree.map(lambda a: a[-1], layers)
    sliding = cfg.layer_is_sliding()[-1]
    k_bksh = cache.k_lbksh[-1][:, :, :num_slots]
    v_bksh = cache.v_lbksh[-1][:, :, :num_slots]
    b, s = x_bd.shape[0], k_bksh.shape[2]
    pos_b1 = pos_b[:, None].astype(jnp.int32)
    rope_g, rope_l = _rope_tables(cfg, pos_b1)
    mask = _attention_mask(cfg, pos_b1, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
                           jnp.ones((b, s), bool), sliding)

    def attend(q, k, v):  # the cached keys/values; the query's own k, v are dead code
        return _attend(cfg, q, k_bksh.astype(q.dtype), v_bksh.astype(q.dtype), mask)

    return _layer(cfg, p, x_bd[:, None], rope_l if sliding else rope_g, attend)[:, 0]


def forward_cached(cfg: ModelConfig, params: Params, tokens_bt: jax.Array,
                   positions_bt: jax.Array, cache: KVCache, *,
                   q_chunk: int | None = DEFAULT_Q_CHUNK,
                   prefill: bool = False) -> tuple[jax.Array, KVCache]:
    """`hidden_cached` followed by the output head: float32 logits [B, T, V] and the cache."""
    x, cache = hidden_cached(cfg, params, tokens_bt, positions_bt, cache, q_chunk=q_chunk,
                             prefill=prefill)
    return logits_from_hidden(cfg, params, x), cache


def num_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs per token: 2 per weight use plus attention over `context` keys."""
    # The embedding lookup is no matmul; a tied table is used again as the output head.
    matmul_params = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    return 2.0 * matmul_params + attn


def param_count(params: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
