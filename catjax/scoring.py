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
from jax.sharding import Mesh

from catjax import models, parallel
from catjax.models import ModelConfig, Params
from catjax.sampling import bucket_length, check_token_ids, default_prefill_chunk


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

    Each prompt is split into a prefix, prefilled into a cache, and a suffix (at least its last
    token) run over that cache and scored at its last token, the only place the last layer
    runs whole. `groups` (one key per prompt) marks prompts that share a long start, e.g. one
    response judged on several criteria: a group's common prefix runs once and its keys and
    values are read by every row of the group. Without groups each prompt is its own.

    With params on several devices the rows are split over the mesh's data-parallel axes, each
    group's rows on one device with its prefix. Multi-process (global params, see
    `is_collective`): every process calls it with its own prompts (maybe none) and gets its own
    rows; the processes agree on shapes in two small all-gathers.
    """
    if groups is not None and len(groups) != len(prompts):
        raise ValueError(f"last_token_logits: {len(groups)} groups for {len(prompts)} prompts")
    _check_inputs(cfg, prompts, pad_id, "last_token_logits")
    parts = _split_groups(prompts, range(len(prompts)) if groups is None else groups)
    collective = is_collective(params)
    mesh = parallel.mesh_of(params)
    if mesh is not None and mesh.devices.size == 1 and not collective:
        mesh = None
    procs = jax.process_count() if collective else 1
    shards = 1 if mesh is None else parallel.data_parallel_size(mesh) // procs
    if mesh is not None and shards * procs != parallel.data_parallel_size(mesh):
        raise ValueError(f"last_token_logits: the mesh's {parallel.data_parallel_size(mesh)} "
                         f"data-parallel devices do not split over {procs} processes")
    bins = _pack(parts, max(1, batch_size // shards))
    chunks = -(-len(bins) // shards)
    if collective:
        chunks = parallel.process_max([chunks])[0]
    # Per chunk: the most prefixes and rows a bin holds, the longest prefix and suffix.
    dims = []
    for chunk in range(chunks):
        held = bins[chunk * shards:(chunk + 1) * shards]
        dims += [max((len(b) for b in held), default=1),
                 max((sum(len(parts[k][1]) for k in b) for b in held), default=1),
                 max((len(parts[k][0]) for b in held for k in b), default=0),
                 max((len(s) for b in held for k in b for _, s in parts[k][1]), default=1)]
    if collective and dims:
        dims = parallel.process_max(dims)
    out = np.zeros((len(prompts), cfg.vocab_size), np.float32)

    def put(x: np.ndarray) -> jax.Array:
        return parallel.put_rows(x, mesh, collective)

    for chunk in range(chunks):
        # Powers of two (rows) and length buckets: a handful of shapes compile, not one per call.
        most_g, most_r, longest_p, longest_s = dims[4 * chunk:4 * chunk + 4]
        g, r = _batch_rows(most_g, 1 << 30), _batch_rows(most_r, 1 << 30)
        # A suffix is often one token (a prompt alone in its group): no 16-wide minimum there.
        width_p, width_s = bucket_length(longest_p), bucket_length(longest_s, minimum=1)
        prefix = np.full((shards * g, width_p), pad_id, np.int32)
        prefix_len = np.zeros(shards * g, np.int32)
        suffix = np.full((shards * r, width_s), pad_id, np.int32)
        suffix_len = np.ones(shards * r, np.int32)
        group = np.zeros(shards * r, np.int32)  # the prefix a row reads, within its shard
        scored = []  # (row of `suffix`, prompt index)
        for shard, b in enumerate(bins[chunk * shards:(chunk + 1) * shards]):
            row = shard * r
            for j, k in enumerate(b):
                pre, items = parts[k]
                prefix[shard * g + j, :len(pre)] = pre
                prefix_len[shard * g + j] = len(pre)
                for i, suf in items:
                    suffix[row, :len(suf)], suffix_len[row], group[row] = suf, len(suf), j
                    scored.append((row, i))
                    row += 1
        logits = _shared_prefix_logits(cfg, params, put(prefix), put(prefix_len), put(suffix),
                                       put(suffix_len), put(group), mesh=mesh,
                                       shards=shards * procs)
        if collective:  # row-split (the compiler may have split the vocabulary) to read ours
            logits = parallel.local_rows(jax.device_put(logits, parallel.batch_sharding(mesh, 2)))
        logits = np.asarray(logits)
        for row, i in scored:
            out[i] = logits[row]
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "shards"))
def _shared_prefix_logits(cfg: ModelConfig, params: Params, prefix_gp, prefix_len_g, suffix_rs,
                          suffix_len_r, group_r, *, mesh: Mesh | None, shards: int):
    """Next-token logits [R, V] of prefix[group[r]] + suffix[r]: each prefix runs once.

    Rows lie in `shards` blocks (the mesh's data-parallel devices, in order): suffix row r of
    block d reads prefix `group[r]` of block d, so rows never leave their device. Prefixes are
    prefilled into a cache from slot 0 (slot = position), its rows gathered per suffix, and
    each suffix written after its prefix's real length: the padding slots in between are
    overwritten or causally hidden, as in the sampler's ragged prompts.
    """
    g, p = prefix_gp.shape
    r, s = suffix_rs.shape

    def on_rows(x, axis: int, heads_axis: int | None = None):
        return parallel.keep_rows_split(x, mesh, axis, heads_axis)

    # Cache arrays [L, rows, kv heads, S, H]: kv heads split over a tensor axis, as the sampler's.
    cache = jax.tree.map(lambda c: on_rows(c, 1, 2), models.init_cache(cfg, g, p + s))
    _, cache = models.prefill(cfg, params, prefix_gp, prefix_len_g, cache, mesh=mesh,
                              chunk=default_prefill_chunk())  # only its keys/values are read
    group_dr = group_r.reshape(shards, r // shards)

    def per_row(x, axis: int, heads: int | None = None):  # [.., G, ..] -> [.., R, ..]: each
        # row's prefix, on its shard
        x = on_rows(x.reshape(*x.shape[:axis], shards, g // shards, *x.shape[axis + 1:]), axis,
                    None if heads is None else heads + 1)
        x = jax.vmap(lambda xs, idx: jnp.take(xs, idx, axis=axis), in_axes=(axis, 0),
                     out_axes=axis)(x, group_dr)
        return on_rows(x.reshape(*x.shape[:axis], r, *x.shape[axis + 2:]), axis, heads)

    cache = jax.tree.map(lambda c: per_row(c, 1, 2), cache)
    positions = per_row(prefix_len_g, 0)[:, None] + jnp.arange(s, dtype=jnp.int32)
    # The last layer runs whole only at each suffix's last token, the one scored.
    x, cache = models.hidden_cached(cfg, params, suffix_rs, positions, cache, kv_only_last=True,
                                    mesh=mesh)
    x_rd = jnp.take_along_axis(x, (suffix_len_r - 1)[:, None, None], axis=1)[:, 0]
    last = models.last_layer_at(cfg, params, x_rd, positions[:, 0] + suffix_len_r - 1, cache)
    return models.logits_from_hidden(cfg, params, last[:, None])[:, 0]


def _split_groups(prompts: Sequence[Sequence[int]], groups: Sequence[Hashable]
                  ) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """(common prefix, [(prompt index, suffix)]) per group; every suffix keeps at least its
    prompt's last token, the one scored."""
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    parts = []
    for rows in members.values():
        seqs = [list(prompts[i]) for i in rows]
        n = min(len(q) for q in seqs) - 1
        for q in seqs[1:]:
            n = next((j for j in range(n) if q[j] != seqs[0][j]), n)
        parts.append((seqs[0][:n], [(i, q[n:]) for i, q in zip(rows, seqs, strict=True)]))
    return parts


def _pack(parts: Sequence[tuple[list[int], list]], rows: int) -> list[list[int]]:
    """Consecutive whole groups (indices into `parts`) with at most `rows` suffixes per bin; a
    larger group has a bin of its own."""
    bins: list[list[int]] = []
    used = 0
    for k, (_, items) in enumerate(parts):
        if bins and used + len(items) <= rows:
            bins[-1].append(k)
            used += len(items)
        else:
            bins.append([k])
            used = len(items)
    return bins


def is_collective(params: Params) -> bool:
    """Whether a forward over `params` is one program over several processes (they must all call)."""
    return jax.process_count() > 1 and parallel.is_global(params)


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows per forward pass: a power of two up to batch_size, so few shapes compile."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def _pad(seqs: Sequence[Sequence[int]], rows: int, width: int, pad_id: int) -> np.ndarray:
    toks = np.full((rows, width), pad_id, np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s
    return toks


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def _gathered_logprobs(cfg: ModelConfig, params: Params, tokens_bt, pred_index_bc, targets_bc,
                       mesh: Mesh | None = None):
    """log p(targets | prefix) read only at `pred_index` positions: the vocabulary-sized logits
    are formed for the scored tokens, not for the whole (mostly context) sequence."""
    hidden = models.hidden_states(cfg, params, tokens_bt, mesh=mesh)
    hidden = jnp.take_along_axis(hidden, pred_index_bc[..., None], axis=1)
    params = models.decoder.head_gathered(cfg, params, mesh)
    return models.token_logprobs(cfg, params, hidden, targets_bc)[0]


def continuation_logprobs(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], pad_id: int = 0,
                          batch_size: int = 8) -> list[np.ndarray]:
    """Per-token log-probs of each continuation given its prompt (teacher forcing).

    With params on several devices of this process the rows are split over the mesh's
    data-parallel axes (`batch_size` rows per device at most)."""
    _check_inputs(cfg, prompts, pad_id, "continuation_logprobs")
    check_token_ids(cfg, continuations, pad_id, "continuation_logprobs")
    if is_collective(params):
        raise ValueError("continuation_logprobs: params span several processes; score on one "
                         "host's devices")
    mesh = parallel.mesh_of(params)
    dp = 1 if mesh is None else parallel.data_parallel_size(mesh)
    mesh = mesh if dp > 1 else None
    put = functools.partial(parallel.put_rows, mesh=mesh)
    results: list[np.ndarray] = []
    rows = _batch_rows(len(prompts), batch_size * dp)
    rows = -(-rows // dp) * dp
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
        lp = np.asarray(_gathered_logprobs(cfg, params, put(toks), put(pred), put(targets),
                                           mesh=mesh))
        results.extend(lp[i, :len(c)] for i, c in enumerate(cs))
    return results
