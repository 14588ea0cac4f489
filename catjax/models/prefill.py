"""Prefill: right-padded prompts into an empty KV cache, a chunk of positions at a time.

Every chunk runs through all layers before the next one starts, attending over the chunks
before it in the cache (`hidden_cached(prefill=True, start=...)`). Two things follow:
- Chunks that lie wholly in every row's padding are skipped (`lax.cond` on the longest
  prompt), so a prompt padded to its length bucket costs its own length rounded up to a chunk,
  not the bucket: the anchor's 813-token synthesis prompts in a 1024 bucket run 7 chunks of 128.
- Activations exist for one chunk at a time: the MLP's [B, chunk, F] instead of [B, P, F]
  (0.85 GiB per question for Qwen 3 4B's 13k-token synthesis prompt in bfloat16; XLA's TPU
  compiler puts that call's temporaries 0.83 GiB lower, bench/RESULTS.md).
- The last layer runs whole only at each row's last prompt token, where the first token is
  drawn: elsewhere it just writes its keys and values (`hidden_cached(kv_only_last=True)`,
  then `last_layer_at`).
The causal attention work is the same as one pass whose queries attend in blocks of `chunk`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from catjax.models.config import ModelConfig
from catjax.models.decoder import KVCache, Params, hidden_cached, last_layer_at


def prefill(cfg: ModelConfig, params: Params, tokens_bp: jax.Array, prompt_len_b: jax.Array,
            cache: KVCache, *, chunk: int, whole_last_layer: bool = False,
            mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """Write prompts [B, P] (row b's first prompt_len_b[b] tokens are real) from slot 0.

    Returns each row's hidden state at its last prompt token [B, D] (before the final norm) and
    the cache. Slots of skipped chunks keep the cache's zeros: they are past every row's prompt,
    where decoding writes or masks, as for the padding tokens of the chunks that do run.
    `whole_last_layer`: run the last layer at every position too (the same results, slower;
    kept for benchmarks that compare the two). `mesh`: rows split over its data-parallel axes
    (`hidden_cached`).
    """
    b, p = tokens_bp.shape
    if chunk < 1:
        raise ValueError(f"prefill chunk={chunk} must be >= 1")
    longest = jnp.max(prompt_len_b)
    last_bd = jnp.zeros((b, cfg.hidden_size), cfg.jnp_dtype)

    def run(lo: int, hi: int, carry):
        last_bd, cache = carry
        positions = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (b, hi - lo))
        x_btd, cache = hidden_cached(cfg, params, tokens_bp[:, lo:hi], positions, cache,
                                     q_chunk=hi - lo, prefill=True, start=lo,
                                     kv_only_last=not whole_last_layer, mesh=mesh)
        idx_b = prompt_len_b - 1 - lo  # the last prompt token's index in this chunk
        here_b = (idx_b >= 0) & (idx_b < hi - lo)
        x_bd = jnp.take_along_axis(x_btd, jnp.clip(idx_b, 0, hi - lo - 1)[:, None, None],
                                   axis=1)[:, 0]
        return jnp.where(here_b[:, None], x_bd, last_bd), cache

    carry = (last_bd, cache)
    for lo in range(0, p, chunk):
        hi = min(lo + chunk, p)
        if lo == 0:  # every prompt has a first token
            carry = run(lo, hi, carry)
        else:
            carry = jax.lax.cond(lo < longest, lambda c, lo=lo, hi=hi: run(lo, hi, c),
                                 lambda c: c, carry)
    last_bd, cache = carry
    if whole_last_layer:
        return last_bd, cache
    return last_layer_at(cfg, params, last_bd, prompt_len_b - 1, cache, num_slots=p), cache
