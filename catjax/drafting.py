"""Greedy decoding with drafts looked up in each row's own context (prompt-lookup decoding).

The anchor's synthesis restates its rollouts: its answers, equations and phrases are already in
its prompt. Each step, the row's last tokens are looked up earlier in its context (prompt and
text so far) and the `k` tokens that followed them there are proposed as a draft; one forward
pass over the step's token and the draft ([R, k+1] tokens, one read of the weights) checks them
all, and every draft token the model's own argmax agrees with is kept. The output is the plain
greedy output: a draft only decides how many of the model's tokens one pass yields (1 to k+1).

Used by `sampling.sample(draft_tokens=k)` at temperature 0; CaT turns it on for the anchor
(`RoundConfig.anchor_draft_tokens`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from catjax import models, parallel, sampling
from catjax.models import ModelConfig, Params

MAX_NGRAM = 2  # the longest run of last tokens looked up; shorter ones where it is not found


def ngram_draft(context_rl: jax.Array, length_r: jax.Array, k: int,
                max_ngram: int = MAX_NGRAM) -> jax.Array:
    """Draft [R, k] int32 for each row of `context_rl` ([R, L], row r's first `length_r[r]`
    tokens are its context), -1 where no token is proposed.

    The key is the context's last n tokens; among their earlier occurrences the longest n wins
    (n = max_ngram .. 1), then the one followed by the most tokens (up to k), then the latest.
    The draft is what followed it, never reaching past the context's end."""
    r, length = context_rl.shape
    idx_l = jnp.arange(length, dtype=jnp.int32)
    end_r = length_r.astype(jnp.int32)[:, None]  # [R, 1]
    best_r = jnp.full((r,), -1, jnp.int32)
    for n in range(1, max_ngram + 1):  # a later (longer) n outranks every shorter one
        key_rn = jnp.take_along_axis(context_rl, jnp.clip(end_r - 1 - jnp.arange(n), 0), axis=1)
        # j: the last token of an earlier occurrence (j + 1 < end: something follows it).
        ok_rl = (idx_l >= n - 1) & (idx_l + 1 < end_r)
        for i in range(n):  # context[j - i] == key[i]
            ok_rl &= jnp.roll(context_rl, i, axis=1) == key_rn[:, i:i + 1]
        follow_rl = jnp.minimum(end_r - 1 - idx_l, k)
        score_rl = ((n - 1) * (k + 1) + follow_rl) * length + idx_l
        best_r = jnp.maximum(best_r, jnp.max(jnp.where(ok_rl, score_rl, -1), axis=1))
    j_r = jnp.where(best_r >= 0, best_r % length, -1)
    at_rk = j_r[:, None] + 1 + jnp.arange(k, dtype=jnp.int32)
    draft_rk = jnp.take_along_axis(context_rl, jnp.clip(at_rk, 0, length - 1), axis=1)
    return jnp.where((j_r[:, None] >= 0) & (at_rk < end_r), draft_rk, -1).astype(jnp.int32)


def _first_true(x_rk: jax.Array) -> jax.Array:
    """Index of each row's first True, k where none."""
    k = x_rk.shape[1]
    return jnp.min(jnp.where(x_rk, jnp.arange(k), k), axis=1)


_STATIC_ARGNAMES = ("cfg", "num_samples", "max_new_tokens", "draft_tokens", "stop_ids", "pad_id",
                    "cache_dtype", "mesh", "unrolled", "logprobs")


@functools.partial(jax.jit, static_argnames=_STATIC_ARGNAMES)
def sample_drafted(cfg: ModelConfig, params: Params, prompt_bp: jax.Array,
                   prompt_len_b: jax.Array, *, num_samples: int, max_new_tokens: int,
                   draft_tokens: int, stop_ids: tuple[int, ...], pad_id: int, cache_dtype: str,
                   mesh: Mesh | None, unrolled: bool, logprobs: bool = False):
    """Greedy continuations of right-padded prompts [B, P], `num_samples` rows each.

    Returns `(SampleOutput, passes)`: the output `sampling.sample(temperature=0)` gives (to
    rounding: a pass over k+1 tokens sums in another order than k+1 passes over one) and the
    number of decoding passes run. `unrolled`: per-layer weights and cache, sliced once
    before the loop (`decode_layout="unrolled"`), else a scan over the stacked layers. The loop
    runs until every row is done; finished rows ride along, as in the plain sampler."""
    b, p = prompt_bp.shape
    g, n, k = num_samples, max_new_tokens, draft_tokens
    if k < 1:
        raise ValueError(f"draft_tokens={k} must be >= 1 here (0: `sampling.sample` without drafts)")
    r = b * g
    # Room for a whole draft past the budget: rejected drafts write slots nobody reads.
    slots = p + n + k

    def on_rows(x, axis: int = 0):
        return parallel.keep_rows_split(x, mesh, axis)

    logits_rv, cache = sampling.prefill_rows(cfg, params, prompt_bp, prompt_len_b,
                                             num_samples=g, num_slots=slots, copy_per_row=True,
                                             cache_dtype=cache_dtype, mesh=mesh)
    prompt_len_r = jnp.repeat(prompt_len_b, g)
    # Each row's context: its prompt, then its tokens as they are decided.
    context_rl = on_rows(jnp.pad(jnp.repeat(prompt_bp, g, axis=0), ((0, 0), (0, n + k)),
                                 constant_values=pad_id))
    head_params = models.decoder.head_gathered(cfg, params, mesh)
    layer_params = params
    if unrolled:
        layer_params, cache = models.unstack_layers(params), cache.unstacked()
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def put(x_rl, at_rt, values_rt):  # x[r, at[r, t]] = values[r, t]; indices past the end: none
        return x_rl.at[jnp.arange(x_rl.shape[0])[:, None], at_rt].set(values_rt, mode="drop")

    # Each device writes its own rows (left to GSPMD, the indices went to every device).
    put_rows = parallel.per_device_rows(put, mesh, in_axes=(0, 0, 0))
    ahead_k1 = jnp.arange(k + 1, dtype=jnp.int32)  # [k+1]

    def cond(state):
        return ~jnp.all(state[4])

    def body(state):
        passes, cache, logits_rv, context_rl, done, made, toks, mlps = state
        first_r = sampling.argmax(logits_rv)  # the model's next token: always kept
        pos_r = prompt_len_r + made
        context_rl = put_rows(context_rl, pos_r[:, None], first_r[:, None])
        draft_rk = ngram_draft(context_rl, pos_r + 1, k)
        tokens_rt = jnp.concatenate([first_r[:, None], jnp.where(draft_rk >= 0, draft_rk, pad_id)],
                                    axis=1)
        hidden, cache = models.hidden_cached(cfg, layer_params, tokens_rt,
                                             pos_r[:, None] + ahead_k1, cache, q_chunk=None,
                                             mesh=mesh, weights_in_place=True)
        cache = jax.tree.map(lambda c: sampling.cache_split(c, mesh, 0 if unrolled else 1), cache)
        head = models.decoder.head_gathered(cfg, head_params, mesh, from_shards=False)
        # float32 [R, k+1, V]; on a tensor axis pinned vocabulary-split, as the head makes them
        # (left to GSPMD, the plain sampler gathered the head every step).
        logits_rtv = parallel.rows_and_vocab_split(models.logits_from_hidden(cfg, head, hidden),
                                                   mesh)
        choice_rt = sampling.argmax(logits_rtv.reshape(r * (k + 1), -1)).reshape(r, k + 1)
        # Draft token i is the model's own choice when every token before it was.
        agreed = _first_true(draft_rk != choice_rt[:, :k])  # drafts kept, 0..k
        count = jnp.minimum(agreed + 1, n - made)  # the budget
        stop_at = _first_true(jnp.isin(tokens_rt, stops))  # k + 1: none
        hit_stop = stop_at < count
        count = jnp.where(done, 0, jnp.minimum(count, stop_at + 1))
        keep_rt = ahead_k1 < count[:, None]
        # Kept tokens go to their places; the others to an index past the end, dropped.
        at_rt = jnp.where(keep_rt, made[:, None] + ahead_k1, n)
        toks = put_rows(toks, at_rt, tokens_rt)
        context_rl = put_rows(context_rl, jnp.where(keep_rt, pos_r[:, None] + ahead_k1,
                                                    context_rl.shape[1]), tokens_rt)
        if logprobs:
            # Token t of the pass was chosen from the logits before it: the carried ones for
            # the first, the pass's own (t - 1) for the drafts.
            before_rtv = jnp.concatenate([logits_rv[:, None], logits_rtv[:, :k]], axis=1)
            lp_rt = (jnp.take_along_axis(before_rtv, tokens_rt[..., None], axis=-1)[..., 0]
                     - jax.nn.logsumexp(before_rtv, axis=-1))
            mlps = put_rows(mlps, at_rt, lp_rt)
        # The next token follows the last one kept.
        last = jnp.maximum(count - 1, 0)
        logits_rv = on_rows(jnp.take_along_axis(logits_rtv, last[:, None, None], axis=1)[:, 0])
        made = made + count
        done = done | hit_stop | (made >= n)
        return passes + 1, cache, logits_rv, on_rows(context_rl), done, made, toks, mlps

    state = (jnp.int32(0), cache, logits_rv, context_rl, jnp.zeros(r, bool),
             jnp.zeros(r, jnp.int32), jnp.full((r, n), pad_id, jnp.int32),
             jnp.zeros((r, n), jnp.float32) if logprobs else None)
    passes, _, _, _, _, made, toks, mlps = jax.lax.while_loop(cond, body, state)
    stopped = jnp.isin(jnp.take_along_axis(toks, jnp.maximum(made - 1, 0)[:, None], axis=1)[:, 0],
                       stops) & (made > 0)
    out = sampling.SampleOutput(toks, made, jnp.zeros_like(mlps) if logprobs else None, mlps,
                                stopped, prompt_len_r)
    return jax.tree.map(on_rows, out), passes
