"""Batched rollout sampler: prefill each prompt once, share (or repeat) its KV cache for its G
rows, decode.

    out = sample(cfg, params, prompts, num_samples=8, max_new_tokens=512, rng=key,
                 temperature=0.7, top_k=20, top_p=0.8, stop_ids=tok.eos_ids)
    out.tokens [B*G, N]   row i*G + j is the j-th sample of prompt i; padding after a stop
    out.logprobs [B*G, N] log-prob under the distribution sampled from (temperature, top-k/p)
    out.model_logprobs    log-prob under the plain model (temperature 1, no truncation)
                          (both None with `logprobs=False`, which makes the draw cheaper)

Decoding runs in `jax.lax.while_loop` (one per attention window, `decode_window`) and stops
when every row has emitted a stop token or the budget is spent. Prompt lengths are padded to a
few buckets so a run compiles a handful of programs. Nothing sorts the vocabulary: top-k is a
partial sort (on accelerators, of the best blocks only); top-p without top-k cuts among 256
such candidates and searches the probability threshold when they are not enough.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from catjax import models, parallel
from catjax.models import ModelConfig, Params
from catjax.models.decode import window_blocks


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one token is drawn. Hashable: a static argument of the jitted sampler."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1: no nucleus truncation

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # NaN and inf too
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int | np.integer) \
                or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [R, N] int32; pad_id after the stop token
    lengths: jax.Array  # [R] int32 generated tokens, the stop token included
    # [R, N] float32, 0 past the end; None from `sample(logprobs=False)`.
    logprobs: jax.Array | None  # under the sampling distribution
    model_logprobs: jax.Array | None  # under the plain model
    stopped: jax.Array  # [R] bool: ended with a stop token (False: hit the budget)
    prompt_lengths: jax.Array  # [R] int32


def bucket_length(n: int, minimum: int = 16) -> int:
    """Pad lengths to powers of two up to 1024, then to multiples of 512."""
    n = max(n, minimum)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 512) * 512


def check_token_ids(cfg: ModelConfig, seqs: Sequence[Sequence[int]], pad_id: int,
                    where: str) -> None:
    """Every id in [0, vocab): one outside embeds as NaN (`jnp.take`'s fill), which the
    attention spreads to every row of the batch, silently. One line naming it instead."""
    v = cfg.vocab_size
    if not 0 <= int(pad_id) < v:
        raise ValueError(f"{where}: pad_id={pad_id} is outside the vocabulary [0, {v})")
    for i, s in enumerate(seqs):
        if len(s) and not (int(min(s)) >= 0 and int(max(s)) < v):
            bad = next(int(t) for t in s if not 0 <= int(t) < v)
            raise ValueError(f"{where}: sequence {i} holds token id {bad}, outside the "
                             f"vocabulary [0, {v})")


def _check_context(cfg: ModelConfig, longest: int, max_new_tokens: int) -> None:
    # Real lengths, not the bucket's: positions only reach prompt_len + N - 1.
    if longest + max_new_tokens > cfg.max_position:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's context of {cfg.max_position}")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged prompts to a bucketed length: tokens [B, P] int32, lengths [B]."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    width = length or bucket_length(int(lengths.max()))
    if width < int(lengths.max()):
        raise ValueError(f"sample: prompt_length={width} is shorter than the longest prompt "
                         f"({int(lengths.max())} tokens)")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


# --- drawing one token -----------------------------------------------------------------------

def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _nucleus_threshold(probs_bv: jax.Array, top_p: float, ways: int | None = None,
                       passes: int | None = None) -> jax.Array:
    """Largest t with sum(p[p >= t]) >= top_p, to 1 / (ways + 1)**passes of max(p); no sort.

    Each pass tests `ways` evenly spaced thresholds inside [lo, hi) in one fused reduction and
    keeps the interval around the cut. One way is a bisection, the CPU's choice (24 passes);
    accelerators test 16 at once (6 passes), as each pass costs a read of the whole row.
    """
    if ways is None:
        ways, passes = (1, 24) if _on_cpu() else (16, 6)
    frac = jnp.arange(1, ways + 1, dtype=jnp.float32) / (ways + 1)

    def body(_, lo_hi):
        lo, hi = lo_hi
        ts_bw = lo[:, None] + (hi - lo)[:, None] * frac
        if ways == 1:
            mass_bw = jnp.sum(jnp.where(probs_bv >= ts_bw, probs_bv, 0.0), axis=-1, keepdims=True)
        else:
            mass_bw = jnp.sum(jnp.where(probs_bv[:, :, None] >= ts_bw[:, None, :],
                                        probs_bv[:, :, None], 0.0), axis=1)
        # Thresholds that keep >= top_p of the mass form a prefix; the cut lies past its end.
        n_ok = jnp.sum(jnp.cumprod(mass_bw >= top_p, axis=-1), axis=-1)
        new_lo = jnp.where(n_ok > 0, _take(ts_bw, jnp.maximum(n_ok - 1, 0)), lo)
        new_hi = jnp.where(n_ok < ways, _take(ts_bw, jnp.minimum(n_ok, ways - 1)), hi)
        return new_lo, new_hi

    lo = jnp.zeros(probs_bv.shape[:1], jnp.float32)
    hi = jnp.max(probs_bv, axis=-1)
    lo, _ = jax.lax.fori_loop(0, passes, body, (lo, hi))
    # Never drop the most likely token, whatever the rounding.
    return jnp.minimum(lo, hi)


def _top_k(x_bv: jax.Array, k: int,
           block: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k largest entries of each row: values (descending) and indices, exact; and a bound
    [B] that every entry left out is <= (-inf when nothing is left out unseen).

    `lax.top_k` with k > 16 over a whole vocabulary is a full sort on GPUs (0.9-1.2 ms at
    64 x 152k on an H200). On accelerators the row is cut into blocks of `block` entries:
    the k + 1 largest block maxima are found first, and the top k of the k best blocks is the
    top k of the row (each of its entries lies in a block whose maximum is at least the k-th
    value). Two small sorts instead of one long one. The CPU's partial sort needs no help
    (blocks of 128 at 32 x 152k, k=20: 7.6 against 7.3 ms).
    """
    b, v = x_bv.shape
    k = min(k, v)  # (a vocabulary below k: every entry; the block size below needs v / k >= 1)
    if block is None:
        # About sqrt(V / k) balances the two sorts (V / block maxima, k * block entries); the
        # power of two above it measured best on an H200 (k=256: 32, 175 us against 228 us
        # at 16; k=20: 128, 38 us; one top_k over the row: 895 and 1199 us).
        block = 0 if _on_cpu() else max(16, 1 << int(np.ceil(np.log2(np.sqrt(v / k)))))
    nb = -(-v // block) if block else 0
    if nb <= k + 1:
        vals, idx = jax.lax.top_k(x_bv, min(k, v))
        return vals, idx, jnp.full((b,), -jnp.inf, x_bv.dtype)
    x_bnk = jnp.pad(x_bv, ((0, 0), (0, nb * block - v)),
                    constant_values=-jnp.inf).reshape(b, nb, block)
    best_max, best = jax.lax.top_k(jnp.max(x_bnk, axis=-1), k + 1)
    picked = jnp.take_along_axis(x_bnk, best[:, :k, None], axis=1).reshape(b, k * block)
    vals, pos = jax.lax.top_k(picked, k)
    idx = jnp.take_along_axis(best[:, :k], pos // block, axis=1) * block + pos % block
    return vals, idx, best_max[:, k]


def _row_top_k(x_bv: jax.Array, k: int, mesh: Mesh | None,
               block: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_top_k` with each device taking its own rows of a batch split over `mesh`: left to
    GSPMD, `lax.top_k` gathered every row's input (the [B, V] logits, or the block maxima and
    picked blocks) to every device, each decode step."""
    return parallel.per_device_rows(lambda x: _top_k(x, k, block), mesh, in_axes=(0,))(x_bv)


def _nucleus_mask(scaled_bv: jax.Array, top_p: float, candidates: int = 256,
                  block: int | None = None, mesh: Mesh | None = None) -> jax.Array:
    """Tokens of the nucleus (smallest set of mass >= top_p), without sorting the vocabulary.

    Usually the nucleus lies within the top `candidates` tokens (`_top_k`) and the cut is
    exact there. Only when some row's candidates hold less than `top_p` of the mass (a very
    flat distribution), or the cut falls to where unseen tokens may lie, does the threshold
    search over the whole vocabulary decide.
    """
    probs = jax.nn.softmax(scaled_bv, axis=-1)
    top, _, bound = _row_top_k(probs, candidates, mesh, block)
    before = jnp.cumsum(top, axis=-1) - top
    t_fast = jnp.min(jnp.where(before < top_p, top, jnp.inf), axis=-1)
    # Exact when the candidates reach top_p and every token above the cut is a candidate.
    exact = jnp.all((jnp.sum(top, axis=-1) >= top_p) & (t_fast >= bound))
    t = jax.lax.cond(exact, lambda: t_fast, lambda: _nucleus_threshold(probs, top_p))
    return probs >= t[:, None]


def _row_block(v: int, preferred: int = 256) -> int:
    """Entries per block for `argmax` over a row of `v`: the largest power of two up to
    `preferred` that divides `v` (down to a quarter of it), else `preferred` and the row padded,
    which is a copy (Qwen's 151,936 = 1187 x 128)."""
    block = preferred
    while block > preferred // 4 and v % block:
        block //= 2
    return block if v % block == 0 else preferred


def categorical(key: jax.Array, logits_bv: jax.Array, block: int = 256) -> jax.Array:
    """Exact draw from softmax(logits) by inverting the CDF with one uniform per row.

    `jax.random.categorical` draws a Gumbel variate for every vocabulary entry, which dominates a
    CPU decode step at 50k vocabularies. Here the CDF is inverted in two levels (sums of blocks
    of `block` entries, then within the chosen block), so the work is one pass over the row.
    Blocks of 256 whatever the vocabulary: another split rounds the CDF's sums differently and
    changes rare draws of earlier runs (`argmax`, exact, picks its blocks).
    """
    return _categorical(key, logits_bv, block)[0]


def _categorical(key: jax.Array, logits_bv: jax.Array,
                 block: int = 256) -> tuple[jax.Array, jax.Array]:
    """`categorical`, and each row's logsumexp [B] from the same pass (max + log of the sum)."""
    b, v = logits_bv.shape
    nb = -(-v // block)
    logits = jnp.pad(logits_bv, ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf)
    top_b = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - top_b[:, None]).reshape(b, nb, block)
    cum_blocks = jnp.cumsum(p.sum(-1), axis=-1)  # [B, nb]
    u = jax.random.uniform(key, (b,), jnp.float32) * cum_blocks[:, -1]
    blk = jnp.minimum(jnp.sum(cum_blocks <= u[:, None], axis=-1), nb - 1)
    base = jnp.where(blk > 0, jnp.take_along_axis(cum_blocks, (blk - 1)[:, None], 1)[:, 0], 0.0)
    inner = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]  # [B, block]
    cum_inner = jnp.cumsum(inner, axis=-1)
    j = jnp.sum(cum_inner <= (u - base)[:, None], axis=-1)
    # Rounding can push j past the block's last positive entry: clamp onto it.
    last_pos = block - 1 - jnp.argmax(jnp.flip(inner > 0, axis=-1), axis=-1)
    tok = (blk * block + jnp.minimum(j, last_pos)).astype(jnp.int32)
    return tok, top_b + jnp.log(cum_blocks[:, -1])


def argmax(x_bv: jax.Array, block: int | None = None) -> jax.Array:
    """`jnp.argmax(x, -1)` (the first maximum; with NaNs, some index in range), in two levels: the
    block holding the first maximum of the block maxima, then its first maximum. XLA:CPU runs
    a plain argmax as one variadic (value, index) reduction: 3.7 against 0.4 ms at 32 x 49k,
    11.1 against 1.9 ms at 32 x 152k; most of a greedy draw."""
    b, v = x_bv.shape
    block = block or _row_block(v)
    nb = -(-v // block)
    if nb < 2:
        return jnp.argmax(x_bv, axis=-1).astype(jnp.int32)
    x = jnp.pad(x_bv.astype(jnp.float32), ((0, 0), (0, nb * block - v)),
                constant_values=-jnp.inf).reshape(b, nb, block)
    blk = jnp.argmax(jnp.max(x, axis=-1), axis=-1)
    inner = jnp.take_along_axis(x, blk[:, None, None], axis=1)[:, 0]
    return (blk * block + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


def draw(logits_bv: jax.Array, key: jax.Array, sp: SamplingParams, logprobs: bool = True,
         mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Draw tokens [B]; with `logprobs`, their log-probs under the sampling distribution and
    under the plain model (else None, None: at 32 x 49k, T 0.7, a 0.75 against 1.45 ms draw).

    A log-prob is `logit[token] - logsumexp(logits)`, never a full [B, V] log-softmax (at 32
    rows x 150k that is most of a small model's decode step on a CPU); the sampling law's
    logsumexp comes out of the draw's own pass, the plain model's costs one more unless the
    two laws are the same (temperature 1, no truncation). `mesh`: the rows are split over its
    data-parallel axes.
    """
    logits_bv = logits_bv.astype(jnp.float32)

    def model_lp(tok):
        if not logprobs:
            return None
        return _take(logits_bv, tok) - jax.nn.logsumexp(logits_bv, axis=-1)

    if sp.temperature == 0:
        tok = argmax(logits_bv)
        return tok, (jnp.zeros(tok.shape, jnp.float32) if logprobs else None), model_lp(tok)
    scaled = logits_bv / sp.temperature
    if sp.top_k > 0:
        vals_bk, idx_bk, _ = _row_top_k(scaled, min(sp.top_k, scaled.shape[-1]), mesh)
        if sp.top_p < 1:
            # vals are sorted: keep a token while the mass before it is below top_p.
            probs = jax.nn.softmax(vals_bk, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            vals_bk = jnp.where(before < sp.top_p, vals_bk, -jnp.inf)
        choice, lse_b = _categorical(key, vals_bk, block=min(256, vals_bk.shape[-1]))
        tok = jnp.take_along_axis(idx_bk, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        lp = _take(vals_bk, choice) - lse_b if logprobs else None
        return tok, lp, model_lp(tok)
    if sp.top_p < 1:
        scaled = jnp.where(_nucleus_mask(scaled, sp.top_p, mesh=mesh), scaled, -jnp.inf)
    tok, lse_b = _categorical(key, scaled)
    if not logprobs:
        return tok, None, None
    lp = _take(scaled, tok) - lse_b
    # Temperature 1 and no truncation: the sampling law is the model's.
    return tok, lp, (lp if sp.temperature == 1 and sp.top_p == 1 else model_lp(tok))


def _take(x_bv: jax.Array, idx_b: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_bv, idx_b[:, None], axis=-1)[:, 0]


# --- the jitted sampler ----------------------------------------------------------------------

_STATIC_ARGNAMES = ("cfg", "sp", "num_samples", "max_new_tokens", "stop_ids", "pad_id",
                    "cache_dtype", "mesh", "decode_layout", "decode_window", "logprobs",
                    "decode_attention")


def cache_split(c: jax.Array, mesh: Mesh | None, axis: int = 0) -> jax.Array:
    """Inside jit: a KV cache array [..., rows, kv heads, ...] kept split by rows (`axis`) and,
    on a tensor axis, by kv head (`parallel.keep_rows_split`)."""
    return parallel.keep_rows_split(c, mesh, axis, heads_axis=axis + 1)


def prefill_rows(cfg: ModelConfig, params: Params, prompt_bp: jax.Array, prompt_len_b: jax.Array,
                 *, num_samples: int, num_slots: int, copy_per_row: bool, cache_dtype: str,
                 mesh: Mesh | None) -> tuple[jax.Array, models.KVCache]:
    """Inside jit: each prompt [B, P] prefilled once into a cache of `num_slots` slots, and the
    logits [B * num_samples, V] its rows draw their first token from (the head runs at each
    prompt's last token only). The cache is per prompt, or with `copy_per_row` one copy per row
    ([L, B * num_samples, ...])."""
    cache = jax.tree.map(lambda c: cache_split(c, mesh, 1), models.init_cache(
        cfg, prompt_bp.shape[0], num_slots, jnp.dtype(cache_dtype)))
    last_bd, cache = models.prefill(cfg, params, prompt_bp, prompt_len_b, cache,
                                    chunk=default_prefill_chunk(), mesh=mesh)
    logits_rv = jnp.repeat(models.logits_from_hidden(cfg, params, last_bd[:, None])[:, 0],
                           num_samples, axis=0)
    if copy_per_row:
        cache = jax.tree.map(lambda c: cache_split(jnp.repeat(c, num_samples, axis=1), mesh, 1),
                             cache)
    return parallel.keep_rows_split(logits_rv, mesh), cache


@functools.partial(jax.jit, static_argnames=_STATIC_ARGNAMES)
def _sample(cfg: ModelConfig, params: Params, prompt_bp: jax.Array, prompt_len_b: jax.Array,
            rng: jax.Array, *, sp: SamplingParams, num_samples: int, max_new_tokens: int,
            stop_ids: tuple[int, ...], pad_id: int, cache_dtype: str,
            mesh: jax.sharding.Mesh | None, decode_layout: str = "scan",
            decode_window: int | None = None, logprobs: bool = True,
            decode_attention: str = "xla") -> SampleOutput:
    b, p = prompt_bp.shape
    g, n = num_samples, max_new_tokens
    r = b * g

    def on_batch(x, axis: int = 0):
        return parallel.keep_rows_split(x, mesh, axis)

    # Rows or weights first, the prompt's keys/values stay once per prompt
    # (`models.SharedPromptCache`); otherwise every row gets a copy with room for its N tokens.
    shared = decode_layout in _SHARED_PROMPT_LAYOUTS
    logits_rv, cache = prefill_rows(cfg, params, prompt_bp, prompt_len_b, num_samples=g,
                                    num_slots=p if shared else p + n, copy_per_row=not shared,
                                    cache_dtype=cache_dtype, mesh=mesh)
    if shared:
        cache = jax.tree.map(lambda c: cache_split(c, mesh), models.init_shared_cache(
            cfg, cache, prompt_len_b, g, n, window=decode_window))
    pos_r = jnp.repeat(prompt_len_b, g)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    # Per-layer weights and cache, sliced (and, weights first, transposed) once here, not in
    # every step. The output head keeps reading the stacked params, gathered over an fsdp axis
    # once here: left to GSPMD, every step gathered the whole head (778 MB for Qwen 3 4B).
    head_params = models.decoder.head_gathered(cfg, params, mesh)
    layer_params = params
    if decode_layout == "unrolled":
        layer_params, cache = models.unstack_layers(params), cache.unstacked()
    elif shared:
        layer_params = models.decode_layout(cfg, params, decode_layout == "weights_first")

    def cond(state, end: int):
        step, done = state[0], state[3]
        return (step < end) & ~jnp.all(done)

    def emit(step, logits, done, lengths, toks, lps, mlps):
        """Draw and record token `step` of every row from its logits."""
        # One key per step for all R rows: with jax_threefry_partitionable (the default since
        # JAX 0.5) each row's bits depend only on (key, R, row), however the rows are split
        # over devices and processes.
        tok, lp, mlp = draw(logits, jax.random.fold_in(rng, step), sp, logprobs, mesh)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        toks = toks.at[:, step].set(tok)
        if logprobs:
            lps = lps.at[:, step].set(jnp.where(live, lp, 0.0))
            mlps = mlps.at[:, step].set(jnp.where(live, mlp, 0.0))
        return tok, done | jnp.isin(tok, stops), lengths + live, toks, lps, mlps

    def body(state, block: int):
        step, cache, logits, done, lengths, toks, lps, mlps = state
        tok, done, lengths, toks, lps, mlps = emit(step, logits, done, lengths, toks, lps, mlps)
        if shared:
            hidden, cache = models.decode_step(cfg, layer_params, tok, step, cache, block,
                                               mesh=mesh)
        else:
            # Every row writes generated token `step` at slot prompt_len + step (< P + N);
            # finished rows write pad tokens that nothing reads.
            hidden, cache = models.hidden_cached(cfg, layer_params, tok[:, None],
                                                 (pos_r + step)[:, None], cache, mesh=mesh,
                                                 decode_attention=decode_attention)
        axis = 1 if decode_layout == "scan" else 0  # the batch axis of [L,] B, K, S, H
        cache = jax.tree.map(lambda c: cache_split(c, mesh, axis), cache)
        head = models.decoder.head_gathered(cfg, head_params, mesh, from_shards=False)
        logits = models.logits_from_hidden(cfg, head, hidden)[:, 0]
        logits = on_batch(parallel.rows_and_vocab_split(logits, mesh))
        return step + 1, cache, logits, done, lengths, toks, lps, mlps

    state = (
        jnp.int32(0), cache, logits_rv, jnp.zeros(r, bool), jnp.zeros(r, jnp.int32),
        jnp.full((r, n), pad_id, jnp.int32),
        *(2 * [jnp.zeros((r, n), jnp.float32) if logprobs else None]),
    )
    # One loop per block of the shared cache's generated part (`models.decode.window_blocks`): a
    # step attends only the blocks up to its own, a static window, not all the loop will fill.
    # The last token is drawn after the loops: nothing reads the forward pass that would follow
    # it (one decode step of N saved). If every row stopped earlier, this draw records nothing.
    ends = np.cumsum(window_blocks(n, decode_window)).tolist() if shared else [n]
    ends[-1] -= 1
    for block, end in enumerate(ends):
        state = jax.lax.while_loop(functools.partial(cond, end=end),
                                   functools.partial(body, block=block), state)
    step, _, logits, done, lengths, toks, lps, mlps = state
    _, done, lengths, toks, lps, mlps = emit(step, logits, done, lengths, toks, lps, mlps)
    # `done` is set only by a stop token: rows that ran out of budget stay False. Outputs stay
    # split by rows, so each process can read its own rows back.
    return jax.tree.map(on_batch, SampleOutput(toks, lengths, lps, mlps, done,
                                               jnp.repeat(prompt_len_b, g)))


def _sample_drafted(cfg: ModelConfig, params: Params, prompt_bp: jax.Array,
                    prompt_len_b: jax.Array, rng: jax.Array, *, sp: SamplingParams,
                    draft_tokens: int, unrolled: bool, **kw) -> SampleOutput:
    """`_sample`'s signature over `drafting.sample_drafted` (greedy: `rng`, `sp` unused)."""
    from catjax import drafting  # imports this module

    return drafting.sample_drafted(cfg, params, prompt_bp, prompt_len_b,
                                   draft_tokens=draft_tokens, unrolled=unrolled, **kw)[0]


DECODE_LAYOUTS = ("scan", "unrolled", "rows_first", "weights_first")
DECODE_ATTENTIONS = ("xla", "pallas")


_SHARED_PROMPT_LAYOUTS = ("rows_first", "weights_first")


def default_decode_layout() -> str:
    """How the decode loop runs the layers, by backend, each where it was measured fastest:
    CPUs "weights_first" (`models.decode`: the layers unrolled, weights as the left matmul
    operand), GPUs "unrolled" (per-row cache, one layer at a time, with the Pallas attention of
    `default_decode_attention`: 8% faster a step than "rows_first" with its windows at 256 new
    tokens on an H200, 22% at 1024, bench/RESULTS.md), TPUs "scan", whose fusions take the layer
    slice into the matmul (not measured here) and where HBM for a second copy of the weights is
    scarcer."""
    return {"cpu": "weights_first", "tpu": "scan"}.get(jax.default_backend(), "unrolled")


def default_decode_window(decode_layout: str) -> int:
    """The first window of the shared-prompt layouts' generated cache (`models.decode.
    window_blocks`; 0: one block, the only choice for the other layouts). GPUs 128 (an H200,
    1024 new tokens: 9% faster than one block; 64 and 32 windows less so, bench/RESULTS.md);
    CPUs one block: each window is one more copy of the loop to compile, and CPU workloads
    generate <= 128 tokens; TPUs not measured."""
    if decode_layout not in _SHARED_PROMPT_LAYOUTS or jax.default_backend() != "gpu":
        return 0
    return 128


def default_decode_attention(cfg: ModelConfig, decode_layout: str, draft_tokens: int = 0,
                             backend: str | None = None) -> str:
    """How `decode_layout`'s steps attend by default: "pallas" (`models.decode_kernel`, one
    Triton kernel a layer that reads only each row's live slots) where it runs, the "unrolled"
    layout on GPUs, one token a row (no drafts), a power-of-two head_dim; on an H200 it took a
    sampled step from 2.07 to 1.89 ms (bench/RESULTS.md). "xla" (its ops, over every slot)
    elsewhere: CPUs only interpret the kernel, TPUs have no lowering for it. `backend`: default
    JAX's."""
    if (backend or jax.default_backend()) != "gpu" or decode_layout != "unrolled" or draft_tokens:
        return "xla"
    from catjax.models import decode_kernel  # Pallas: imported only where it can run

    return "pallas" if decode_kernel.head_dim_fits(cfg.head_dim) else "xla"


def default_prefill_chunk() -> int:
    """Prompt positions per prefill chunk (`models.prefill`). 128 on CPUs: smaller chunks skip
    more of the causal triangle and of a bucket's padding, and keep each chunk's scores in cache
    (SmolLM2, 4 prompts of 813 tokens in the 1024 bucket: 12.2 s in one pass with 256-row
    attention blocks, 9.0 s in chunks of 128; bench/RESULTS.md). The decoder's 1024 elsewhere
    (not measured on accelerators, where a chunk of 128 rows would underfill the matmuls)."""
    return 128 if jax.default_backend() == "cpu" else models.decoder.DEFAULT_Q_CHUNK


def default_cache_dtype(cfg: ModelConfig) -> str:
    """bfloat16 on accelerators (halves the cache); the model dtype on CPU, where XLA computes
    bfloat16 in float32 anyway."""
    return cfg.dtype if jax.default_backend() == "cpu" else "bfloat16"


def sample(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], *,
           num_samples: int = 1, max_new_tokens: int, rng: jax.Array,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_ids: Sequence[int] = (), pad_id: int = 0, cache_dtype: Any = None,
           prompt_length: int | None = None, mesh: jax.sharding.Mesh | None = None,
           decode_layout: str | None = None, decode_window: int | None = None,
           logprobs: bool = True, draft_tokens: int = 0,
           decode_attention: str | None = None) -> SampleOutput:
    """Sample `num_samples` continuations of each prompt (ragged lists of token ids).

    `prompt_length` fixes the padded prompt width (default: the next bucket), so that callers
    with fixed shapes compile once. With a `mesh`, prompts, cache and rollouts are split over its
    data-parallel axes (the prompt count is padded to a multiple of their size); by default the
    mesh of `params` when they span several devices (the trainer's), so that one process and
    several processes run the same partitioned program.

    `decode_layout`: "scan" over stacked layers, "unrolled" (per-layer weights and cache sliced
    once before the loop: one more copy of the weights in memory), or one of the two layouts
    of `models.decode` (unrolled, merged matmuls, each prompt's keys/values once for its G rows):
    "rows_first" or "weights_first" (weights the left matmul operand). Default:
    `default_decode_layout()`. `decode_window`, for those two: the generated tokens' cache lies
    in blocks that double from this size, one loop each, and a step attends only the blocks up
    to its own, not all the loop will fill (0: one block; default `default_decode_window`). All
    give the same samples.

    `decode_attention`: how a decode step of the "unrolled" layout attends: "xla" (its ops,
    over every slot) or "pallas" (`models.decode_kernel`: one Triton kernel a layer that reads
    only each row's live slots; GPUs, or interpreted on CPUs for tests). Default:
    `default_decode_attention` ("pallas" on GPUs). The samples are the same up to float rounding.

    `logprobs`: also return each token's log-prob under the sampling law and the plain model
    (`SampleOutput.logprobs`, `.model_logprobs`); False: None, and a cheaper step (the plain
    model's log-probs cost one more pass over the vocabulary, `draw`). CaT's rollouts and
    syntheses pass False: they read tokens only, and the update scores its own.

    `draft_tokens` (temperature 0 only): each decoding pass checks up to this many tokens
    drafted from the row's own context (`catjax.drafting`, prompt-lookup decoding); the tokens
    are the plain greedy ones, the passes fewer where the text repeats its prompt. Those passes
    run the "scan" or "unrolled" layout (`decode_layout`; the others are taken as "unrolled").

    Multi-process (params are global arrays, or `mesh` spans other processes): every process
    calls `sample` at the same point with its own prompts and gets back its own rows, as host
    numpy arrays; the mesh defaults to the params'. See `_sample_multiprocess`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if isinstance(stop_ids, int | np.integer):
        raise ValueError(f"stop_ids={stop_ids}: a sequence of token ids (e.g. tok.eos_ids), not one id")
    check_token_ids(cfg, prompts, pad_id, "sample")
    decode_layout = decode_layout or default_decode_layout()
    if decode_layout not in DECODE_LAYOUTS:
        raise ValueError(f"decode_layout={decode_layout!r}: expected one of {DECODE_LAYOUTS}")
    if decode_window is None:
        decode_window = default_decode_window(decode_layout)
    if isinstance(decode_window, bool) or not isinstance(decode_window, int | np.integer):
        raise ValueError(f"decode_window={decode_window!r} must be an integer (0: one window)")
    decode_window = int(decode_window)
    if decode_window < 0:
        raise ValueError(f"decode_window={decode_window} must be >= 0 (0: one window)")
    if decode_window and decode_layout not in _SHARED_PROMPT_LAYOUTS:
        raise ValueError(f"decode_window={decode_window}: windows need decode_layout in "
                         f"{_SHARED_PROMPT_LAYOUTS}, not {decode_layout!r}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int | np.integer) \
            or draft_tokens < 0:
        raise ValueError(f"draft_tokens={draft_tokens!r} must be an integer >= 0 (0: no drafts)")
    if draft_tokens and temperature != 0:
        raise ValueError(f"draft_tokens={draft_tokens} needs temperature=0 (greedy), not "
                         f"{temperature}: drafts are checked against the model's argmax")
    decode_attention = decode_attention or default_decode_attention(cfg, decode_layout, draft_tokens)
    if decode_attention not in DECODE_ATTENTIONS:
        raise ValueError(f"decode_attention={decode_attention!r}: expected one of "
                         f"{DECODE_ATTENTIONS}")
    if decode_attention == "pallas":
        if decode_layout != "unrolled":
            raise ValueError(f"decode_attention='pallas' runs in decode_layout='unrolled' (the "
                             f"per-row cache, a layer at a time), not {decode_layout!r}")
        if draft_tokens:
            raise ValueError(f"decode_attention='pallas' attends one token a row; "
                             f"draft_tokens={draft_tokens} checks several: use 'xla'")
        from catjax.models import decode_kernel

        decode_kernel.check(cfg.head_dim)
    run = functools.partial(_sample, decode_layout=decode_layout, decode_window=decode_window,
                            decode_attention=decode_attention)
    if draft_tokens and max_new_tokens > 1:  # one token is the prefill's alone: nothing to check
        run = functools.partial(_sample_drafted, draft_tokens=int(draft_tokens),
                                unrolled=decode_layout != "scan")
    if jax.process_count() > 1 and (parallel.is_global(params) or (
            mesh is not None and mesh.devices.size > jax.local_device_count())):
        return _sample_multiprocess(
            cfg, params, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
            rng=rng, sp=SamplingParams(float(temperature), int(top_k), float(top_p)),
            stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id),
            cache_dtype=jnp.dtype(cache_dtype or default_cache_dtype(cfg)).name,
            prompt_length=prompt_length, mesh=mesh or parallel.mesh_of(params),
            logprobs=bool(logprobs), run=run)
    if mesh is None:  # params laid out on several devices: split the batch over them too
        mesh = parallel.mesh_of(params)
        mesh = mesh if mesh is not None and mesh.devices.size > 1 else None
    num_prompts = len(prompts)
    if mesh is not None:
        dp = parallel.data_parallel_size(mesh)
        prompts = list(prompts) + [prompts[-1]] * (-len(prompts) % dp)
    tokens, lengths = pad_prompts(prompts, pad_id, prompt_length)
    _check_context(cfg, int(lengths.max()), max_new_tokens)
    sp = SamplingParams(float(temperature), int(top_k), float(top_p))
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    if mesh is not None:
        tokens = jax.device_put(tokens, parallel.batch_sharding(mesh, 2))
        lengths = jax.device_put(lengths, parallel.batch_sharding(mesh, 1))
    out = run(cfg, params, tokens, lengths, rng, sp=sp, num_samples=num_samples,
              max_new_tokens=max_new_tokens, stop_ids=tuple(int(s) for s in stop_ids),
              pad_id=int(pad_id),
              cache_dtype=jnp.dtype(cache_dtype or default_cache_dtype(cfg)).name, mesh=mesh,
              logprobs=bool(logprobs))
    rows = num_prompts * num_samples
    if out.tokens.shape[0] != rows:  # drop the rows of padding prompts
        out = jax.tree.map(lambda x: x[:rows], out)
    return out


def _sample_multiprocess(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], *,
                         num_samples: int, max_new_tokens: int, rng: jax.Array,
                         sp: SamplingParams, stop_ids: tuple[int, ...], pad_id: int,
                         cache_dtype: str, prompt_length: int | None,
                         mesh: jax.sharding.Mesh | None, logprobs: bool,
                         run: Any = _sample) -> SampleOutput:
    """`sample` over global (multi-process) params: this process's prompts in, its rows out.

    Every process must run the same program, so they first agree on the prompt count per
    process and the padded width (one all-gather). Process p's prompts are global rows
    [p*L, (p+1)*L): the same global batch as one process holding all prompts in process order,
    and the random draws, a function of (rng, global shape) only, are the same too.
    """
    if mesh is None:
        raise ValueError("sample: multi-process sampling needs params on a mesh (NamedSharding)")
    dp, procs = parallel.data_parallel_size(mesh), jax.process_count()
    if dp % procs:
        raise ValueError(f"sample: the mesh's {dp} data-parallel devices do not split over "
                         f"{procs} processes")
    local_dp = dp // procs
    count, longest = parallel.process_max([len(prompts), max((len(p) for p in prompts), default=1)])
    per_process = max(1, -(-count // local_dp)) * local_dp
    # Pad this process's prompts (a process may have none) to the agreed count.
    filler = list(prompts[-1]) if prompts else [pad_id]
    padded = list(prompts) + [filler] * (per_process - len(prompts))
    tokens, lengths = pad_prompts(padded, pad_id, prompt_length or bucket_length(longest))
    _check_context(cfg, longest, max_new_tokens)
    out = run(cfg, params, parallel.host_to_global(tokens, parallel.batch_sharding(mesh, 2)),
              parallel.host_to_global(lengths, parallel.batch_sharding(mesh, 1)), rng, sp=sp,
              num_samples=num_samples, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
              pad_id=pad_id, cache_dtype=cache_dtype, mesh=mesh, logprobs=logprobs)
    rows = len(prompts) * num_samples
    return jax.tree.map(lambda x: parallel.local_rows(x)[:rows], out)


def completions(out: SampleOutput, strip_stop: bool = True) -> list[list[int]]:
    """The generated ids of each row as Python lists (without the stop token by default)."""
    tokens, lengths, stopped = jax.device_get((out.tokens, out.lengths, out.stopped))
    rows = []
    for row, n, st in zip(tokens, lengths, stopped, strict=True):
        end = int(n) - (1 if (strip_stop and st) else 0)
        rows.append(row[:end].tolist())
    return rows
