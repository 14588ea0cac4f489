"""Teacher-forced scoring: log-probs of given continuations, and next-token logits of prompts.

Used by the selection baselines (mutual predictability), the local judge (yes vs no in one
forward pass) and, later, the policy-gradient loss. Log-probs are float32; the vocabulary-sized
logits are only formed at the positions that are scored.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catjax import models, parallel
from catjax.models import ModelConfig, Params
from catjax.sampling import bucket_length


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_logits(cfg: ModelConfig, params: Params, tokens_bt, lengths_b):
    hidden = models.hidden_states(cfg, params, tokens_bt)
    last = jnp.take_along_axis(hidden, (lengths_b - 1)[:, None, None], axis=1)
    return models.logits_from_hidden(cfg, params, last)[:, 0]


def last_token_logits(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                      pad_id: int = 0, batch_size: int = 16) -> np.ndarray:
    """float32 logits [B, V] of the token that would follow each prompt.

    Multi-process, with global params (see `is_collective`): every process calls it with its own
    prompts (maybe none) and gets its own rows.
    """
    if is_collective(params):
        return _last_token_logits_multiprocess(cfg, params, prompts, pad_id, batch_size)
    out = []
    rows = _batch_rows(len(prompts), batch_size)
    for start in range(0, len(prompts), rows):
        chunk = list(prompts[start:start + rows])
        toks = _pad(chunk, rows, bucket_length(max(len(p) for p in chunk)), pad_id)
        lens = np.asarray([len(p) for p in chunk] + [1] * (rows - len(chunk)), np.int32)
        logits = _last_logits(cfg, params, jnp.asarray(toks), jnp.asarray(lens))
        out.append(np.asarray(logits)[:len(chunk)])
    return np.concatenate(out, 0)


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
    logp = jax.nn.log_softmax(models.logits_from_hidden(cfg, params, hidden), axis=-1)
    return jnp.take_along_axis(logp, targets_bc[..., None], axis=-1)[..., 0]


def continuation_logprobs(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], pad_id: int = 0,
                          batch_size: int = 8) -> list[np.ndarray]:
    """Per-token log-probs of each continuation given its prompt (teacher forcing)."""
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
