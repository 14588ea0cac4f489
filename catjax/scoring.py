"""Teacher-forced scoring: log-probs of given continuations, and next-token logits of prompts.

Used by the selection baselines (mutual predictability), the local judge (yes vs no in one
forward pass) and, later, the policy-gradient loss. Log-probs are float32; the vocabulary-sized
logits are only formed at the positions that are scored.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catjax import models, parallel
from catjax.models import ModelConfig, Params
from catjax.sampling import bucket_length, check_token_ids


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_logits(cfg: ModelConfig, params: Params, tokens_bt, lengths_b):
    hidden = models.hidden_states(cfg, params, tokens_bt)
    last = jnp.take_along_axis(hidden, (lengths_b - 1)[:, None, None], axis=1)
    return models.logits_from_hidden(cfg, params, last)[:, 0]


def _check_inputs(cfg: ModelConfig, prompts: Sequence[Sequence[int]], pad_id: int,
                  where: str) -> None:
    """An empty prompt has no last token (index -1 would read the padding); ids in range."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"{where}: an empty prompt")
    check_token_ids(cfg, prompts, pad_id, where)


def last_token_logits(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                      pad_id: int = 0, batch_size: int = 16,
                      groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """float32 logits [B, V] of the token that would follow each prompt.

    `groups` (one key per prompt) marks prompts that share a long start, e.g. one response
    judged on several criteria: each group's common token prefix is run once and its keys and
    values are shared by the group's rows (`_shared_prefix_logits`); same logits.

    Multi-process, with global params (see `is_collective`): every process calls it with its own
    prompts (maybe none) and gets its own rows; `groups` is not used there.
    """
    if groups is not None and len(groups) != len(prompts):
        raise ValueError(f"last_token_logits: {len(groups)} groups for {len(prompts)} prompts")
    _check_inputs(cfg, prompts, pad_id, "last_token_logits")
    if is_collective(params):
        return _last_token_logits_multiprocess(cfg, params, prompts, pad_id, batch_size)
    if groups is not None:
        return _grouped_last_token_logits(cfg, params, prompts, groups, pad_id, batch_size)
    out = []
    rows = _batch_rows(len(prompts), batch_size)
    for start in range(0, len(prompts), rows):
        chunk = list(prompts[start:start + rows])
        toks = _pad(chunk, rows, bucket_length(max(len(p) for p in chunk)), pad_id)
        lens = np.asarray([len(p) for p in chunk] + [1] * (rows - len(chunk)), np.int32)
        logits = _last_logits(cfg, params, jnp.asarray(toks), jnp.asarray(lens))
        out.append(np.asarray(logits)[:len(chunk)])
    return np.concatenate(out, 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _shared_prefix_logits(cfg: ModelConfig, params: Params, prefix_gp, prefix_len_g, suffix_rs,
                          suffix_len_r, group_r):
    """Next-token logits [R, V] of prefix[group[r]] + suffix[r]: each prefix runs once.

    Prefixes are written into a cache from slot 0 (slot = position), the cache rows are then
    gathered per suffix, and each suffix is written after its prefix's real length: the padding
    slots in between are overwritten or causally hidden, as in the sampler's ragged prompts.
    """
    g, p = prefix_gp.shape
    r, s = suffix_rs.shape
    cache = models.init_cache(cfg, g, p + s)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (g, p))
    _, cache = models.hidden_cached(cfg, params, prefix_gp, positions, cache, prefill=True,
                                    kv_only_last=True)  # only the keys/values are read
    cache = jax.tree.map(lambda c: jnp.take(c, group_r, axis=1), cache)
    positions = prefix_len_g[group_r][:, None] + jnp.arange(s, dtype=jnp.int32)
    # The last layer runs whole only at each suffix's last token, the one scored.
    x, cache = models.hidden_cached(cfg, params, suffix_rs, positions, cache, kv_only_last=True)
    x_rd = jnp.take_along_axis(x, (suffix_len_r - 1)[:, None, None], axis=1)[:, 0]
    last = models.last_layer_at(cfg, params, x_rd, positions[:, 0] + suffix_len_r - 1, cache)
    return models.logits_from_hidden(cfg, params, last[:, None])[:, 0]


def _grouped_last_token_logits(cfg: ModelConfig, params: Params,
                               prompts: Sequence[Sequence[int]], groups: Sequence[Hashable],
                               pad_id: int, batch_size: int) -> np.ndarray:
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    parts = []  # (prefix, [(row, suffix)]): every suffix keeps at least its last token
    for rows in members.values():
        seqs = [list(prompts[i]) for i in rows]
        if not all(seqs):
            raise ValueError("last_token_logits: an empty prompt")
        n = min(len(q) for q in seqs) - 1
        for q in seqs[1:]:
            n = next((j for j in range(n) if q[j] != seqs[0][j]), n)
        parts.append((seqs[0][:n], [(i, q[n:]) for i, q in zip(rows, seqs, strict=True)]))
    out = np.zeros((len(prompts), cfg.vocab_size), np.float32)
    start = 0
    while start < len(parts):  # as many whole groups as fit in batch_size rows (at least one)
        end, rows = start + 1, len(parts[start][1])
        while end < len(parts) and rows + len(parts[end][1]) <= batch_size:
            rows += len(parts[end][1])
            end += 1
        chunk = parts[start:end]
        prefixes = [pre for pre, _ in chunk]
        suffixes = [(k, i, suf) for k, (_, items) in enumerate(chunk) for i, suf in items]
        # Powers of two (rows) and length buckets: a handful of shapes compile, not one per call.
        g, r = _batch_rows(len(prefixes), 1 << 30), _batch_rows(len(suffixes), 1 << 30)
        prefix = _pad(prefixes, g, bucket_length(max(map(len, prefixes))), pad_id)
        prefix_len = np.asarray([len(q) for q in prefixes] + [0] * (g - len(prefixes)), np.int32)
        suffix = _pad([q for _, _, q in suffixes], r,
                      bucket_length(max(len(q) for _, _, q in suffixes)), pad_id)
        suffix_len = np.ones(r, np.int32)
        group = np.zeros(r, np.int32)
        for j, (k, _, q) in enumerate(suffixes):
            suffix_len[j], group[j] = len(q), k
        logits = np.asarray(_shared_prefix_logits(
            cfg, params, jnp.asarray(prefix), jnp.asarray(prefix_len), jnp.asarray(suffix),
            jnp.asarray(suffix_len), jnp.asarray(group)))
        for j, (_, i, _) in enumerate(suffixes):
            out[i] = logits[j]
        start = end
    return out


def is_collective(params: Params) -> bool:
    """Whether a forward over `params` is one program over several processes (they must all call)."""
    return jax.process_count() > 1 and parallel.is_global(params)


def _last_token_logits_multiprocess(cfg: ModelConfig, params: Params,
                                    prompts: Sequence[Sequence[int]], pad_id: int,
                                    batch_size: int) -> np.ndarray:
    """`last_token_logits` as one program on every process: they agree on the number of chunks,
    rows per chunk and width (one all-gather); process p's prompts are rows [p*L, (p+1)*L)."""
    mesh = parallel.mesh_of(params)
    local_dp = max(1, parallel.data_parallel_size(mesh) // jax.process_count())
    count, longest = parallel.process_max([len(prompts), max((len(p) for p in prompts), default=1)])
    rows = -(-_batch_rows(max(count, 1), batch_size) // local_dp) * local_dp
    width, out = bucket_length(longest), []
    for start in range(0, max(count, 1), rows):
        chunk = list(prompts[start:start + rows])
        toks = _pad(chunk, rows, width, pad_id)
        lens = np.asarray([len(p) for p in chunk] + [1] * (rows - len(chunk)), np.int32)
        logits = _last_logits(cfg, params, parallel.host_to_global(toks, parallel.batch_sharding(mesh, 2)),
                              parallel.host_to_global(lens, parallel.batch_sharding(mesh, 1)))
        # Row-split (the compiler may have split the vocabulary instead) to read our rows.
        logits = jax.device_put(logits, parallel.batch_sharding(mesh, 2))
        out.append(parallel.local_rows(logits)[:len(chunk)])
    return np.concatenate(out, 0)


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows per forward pass: a power of two up to batch_size, so few shapes compile."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def _pad(seqs: Sequence[Sequence[int]], rows: int, width: int, pad_id: int) -> np.ndarray:
    toks = np.full((rows, width), pad_id, np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s
    return toks


@functools.partial(jax.jit, static_argnames=("cfg",))
def _gathered_logprobs(cfg: ModelConfig, params: Params, tokens_bt, pred_index_bc, targets_bc):
    """log p(targets | prefix) read only at `pred_index` positions: the vocabulary-sized logits
    are formed for the scored tokens, not for the whole (mostly context) sequence."""
    hidden = models.hidden_states(cfg, params, tokens_bt)
    hidden = jnp.take_along_axis(hidden, pred_index_bc[..., None], axis=1)
    return models.token_logprobs(cfg, params, hidden, targets_bc)[0]


def continuation_logprobs(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], pad_id: int = 0,
                          batch_size: int = 8) -> list[np.ndarray]:
    """Per-token log-probs of each continuation given its prompt (teacher forcing)."""
    _check_inputs(cfg, prompts, pad_id, "continuation_logprobs")
    check_token_ids(cfg, continuations, pad_id, "continuation_logprobs")
    results: list[np.ndarray] = []
    rows = _batch_rows(len(prompts), batch_size)
    for start in range(0, len(prompts), rows):
        ps, cs = prompts[start:start + rows], continuations[start:start + rows]
        seqs = [list(p) + list(c) for p, c in zip(ps, cs, strict=True)]
        toks = _pad(seqs, rows, bucket_length(max(len(s) for s in seqs)), pad_id)
        width = bucket_length(max(len(c) for c in cs), minimum=8)
        pred = np.zeros((rows, width), np.int32)
        targets = np.full((rows, width), pad_id, np.int32)
        for i, (p, c) in enumerate(zip(ps, cs, strict=True)):
            pred[i, :len(c)] = len(p) - 1 + np.arange(len(c))
            targets[i, :len(c)] = c
        lp = np.asarray(_gathered_logprobs(cfg, params, jnp.asarray(toks), jnp.asarray(pred),
                                           jnp.asarray(targets)))
        results.extend(lp[i, :len(c)] for i, c in enumerate(cs))
    return results
