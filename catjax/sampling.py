"""Batched rollout sampler: prefill each prompt once, repeat its KV cache G times, decode.

    out = sample(cfg, params, prompts, num_samples=8, max_new_tokens=512, rng=key,
                 temperature=0.7, top_k=20, top_p=0.8, stop_ids=tok.eos_ids)
    out.tokens [B*G, N]   row i*G + j is the j-th sample of prompt i; padding after a stop
    out.logprobs [B*G, N] log-prob under the distribution sampled from (temperature, top-k/p)
    out.model_logprobs    log-prob under the plain model (temperature 1, no truncation)

Decoding runs in `jax.lax.while_loop` and stops when every row has emitted a stop token or the
budget is spent. Prompt lengths are padded to a few buckets so a run compiles a handful of
programs. Nothing sorts the vocabulary: top-k uses `lax.top_k` (k is small) and top-p without
top-k bisects on the probability threshold.
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

from catjax import models
from catjax.models import ModelConfig, Params


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one token is drawn. Hashable: a static argument of the jitted sampler."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1: no nucleus truncation

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [R, N] int32; pad_id after the stop token
    lengths: jax.Array  # [R] int32 generated tokens, the stop token included
    logprobs: jax.Array  # [R, N] float32 under the sampling distribution; 0 past the end
    model_logprobs: jax.Array  # [R, N] float32 under the plain model; 0 past the end
    stopped: jax.Array  # [R] bool: ended with a stop token (False: hit the budget)
    prompt_lengths: jax.Array  # [R] int32


def bucket_length(n: int, minimum: int = 16) -> int:
    """Pad lengths to powers of two up to 1024, then to multiples of 512."""
    n = max(n, minimum)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 512) * 512


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged prompts to a bucketed length: tokens [B, P] int32, lengths [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    width = length or bucket_length(int(lengths.max()))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


# --- drawing one token -----------------------------------------------------------------------

def _nucleus_threshold(probs_bv: jax.Array, top_p: float, iters: int = 24) -> jax.Array:
    """Largest t with sum(p[p >= t]) >= top_p, by bisection: no sort of the vocabulary."""
    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        mass = jnp.sum(jnp.where(probs_bv >= mid[:, None], probs_bv, 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(probs_bv.shape[:1], jnp.float32)
    hi = jnp.max(probs_bv, axis=-1)
    lo, _ = jax.lax.fori_loop(0, iters, body, (lo, hi))
    # Never drop the most likely token, whatever the rounding.
    return jnp.minimum(lo, hi)


def draw(logits_bv: jax.Array, key: jax.Array,
         sp: SamplingParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw tokens [B]; their log-probs under the sampling distribution and the plain model."""
    logits_bv = logits_bv.astype(jnp.float32)
    model_lp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    if sp.temperature == 0:
        tok = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        return tok, jnp.zeros(tok.shape, jnp.float32), _take(model_lp_bv, tok)
    scaled = logits_bv / sp.temperature
    if sp.top_k > 0:
        vals_bk, idx_bk = jax.lax.top_k(scaled, min(sp.top_k, scaled.shape[-1]))
        if sp.top_p < 1:
            # vals are sorted: keep a token while the mass before it is below top_p.
            probs = jax.nn.softmax(vals_bk, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            vals_bk = jnp.where(before < sp.top_p, vals_bk, -jnp.inf)
        choice = jax.random.categorical(key, vals_bk, axis=-1)
        tok = jnp.take_along_axis(idx_bk, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        lp = _take(jax.nn.log_softmax(vals_bk, axis=-1), choice)
        return tok, lp, _take(model_lp_bv, tok)
    if sp.top_p < 1:
        probs = jax.nn.softmax(scaled, axis=-1)
        keep = probs >= _nucleus_threshold(probs, sp.top_p)[:, None]
        scaled = jnp.where(keep, scaled, -jnp.inf)
    tok = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return tok, _take(jax.nn.log_softmax(scaled, axis=-1), tok), _take(model_lp_bv, tok)


def _take(x_bv: jax.Array, idx_b: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_bv, idx_b[:, None], axis=-1)[:, 0]


# --- the jitted sampler ----------------------------------------------------------------------

@functools.partial(
    jax.jit,
    static_argnames=("cfg", "sp", "num_samples", "max_new_tokens", "stop_ids", "pad_id",
                     "cache_dtype"),
)
def _sample(cfg: ModelConfig, params: Params, prompt_bp: jax.Array, prompt_len_b: jax.Array,
            rng: jax.Array, *, sp: SamplingParams, num_samples: int, max_new_tokens: int,
            stop_ids: tuple[int, ...], pad_id: int, cache_dtype: str) -> SampleOutput:
    b, p = prompt_bp.shape
    g, n = num_samples, max_new_tokens
    r = b * g

    # Prefill once per prompt; logits only at each prompt's last token.
    cache = models.init_cache(cfg, b, p + n, jnp.dtype(cache_dtype))
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    hidden, cache = models.hidden_cached(cfg, params, prompt_bp, positions, cache)
    last = jnp.take_along_axis(hidden, (prompt_len_b - 1)[:, None, None], axis=1)
    logits_rv = jnp.repeat(models.logits_from_hidden(cfg, params, last)[:, 0], g, axis=0)
    cache = jax.tree.map(lambda c: jnp.repeat(c, g, axis=1), cache)
    pos_r = jnp.repeat(prompt_len_b, g)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def cond(state):
        step, done = state[0], state[3]
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, cache, logits, done, pos, lengths, toks, lps, mlps = state
        tok, lp, mlp = draw(logits, jax.random.fold_in(rng, step), sp)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        toks = toks.at[:, step].set(tok)
        lps = lps.at[:, step].set(jnp.where(live, lp, 0.0))
        mlps = mlps.at[:, step].set(jnp.where(live, mlp, 0.0))
        lengths = lengths + live
        done = done | jnp.isin(tok, stops)
        hidden, cache = models.hidden_cached(cfg, params, tok[:, None], pos[:, None], cache)
        logits = models.logits_from_hidden(cfg, params, hidden)[:, 0]
        pos = jnp.minimum(pos + live, p + n - 1)
        return step + 1, cache, logits, done, pos, lengths, toks, lps, mlps

    state = (
        jnp.int32(0), cache, logits_rv, jnp.zeros(r, bool), pos_r, jnp.zeros(r, jnp.int32),
        jnp.full((r, n), pad_id, jnp.int32), jnp.zeros((r, n), jnp.float32),
        jnp.zeros((r, n), jnp.float32),
    )
    _, _, _, done, _, lengths, toks, lps, mlps = jax.lax.while_loop(cond, body, state)
    stopped = jnp.isin(jnp.take_along_axis(toks, jnp.maximum(lengths - 1, 0)[:, None], 1)[:, 0],
                       stops) & (lengths > 0)
    return SampleOutput(toks, lengths, lps, mlps, stopped, jnp.repeat(prompt_len_b, g))


def default_cache_dtype(cfg: ModelConfig) -> str:
    """bfloat16 on accelerators (halves the cache); the model dtype on CPU, where XLA computes
    bfloat16 in float32 anyway."""
    return cfg.dtype if jax.default_backend() == "cpu" else "bfloat16"


def sample(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], *,
           num_samples: int = 1, max_new_tokens: int, rng: jax.Array,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_ids: Sequence[int] = (), pad_id: int = 0, cache_dtype: Any = None,
           prompt_length: int | None = None) -> SampleOutput:
    """Sample `num_samples` continuations of each prompt (ragged lists of token ids).

    `prompt_length` fixes the padded prompt width (default: the next bucket), so that callers
    with fixed shapes compile once.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    tokens, lengths = pad_prompts(prompts, pad_id, prompt_length)
    if tokens.shape[1] + max_new_tokens > cfg.max_position:
        raise ValueError(
            f"prompt ({tokens.shape[1]} padded tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {cfg.max_position}")
    sp = SamplingParams(float(temperature), int(top_k), float(top_p))
    return _sample(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), rng, sp=sp,
                   num_samples=num_samples, max_new_tokens=max_new_tokens,
                   stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id),
                   cache_dtype=jnp.dtype(cache_dtype or default_cache_dtype(cfg)).name)


def completions(out: SampleOutput, strip_stop: bool = True) -> list[list[int]]:
    """The generated ids of each row as Python lists (without the stop token by default)."""
    tokens, lengths, stopped = jax.device_get((out.tokens, out.lengths, out.stopped))
    rows = []
    for row, n, st in zip(tokens, lengths, stopped, strict=True):
        end = int(n) - (1 if (strip_stop and st) else 0)
        rows.append(row[:end].tolist())
    return rows


def sample_text(cfg: ModelConfig, params: Params, tokenizer: Any,
                conversations: Sequence[Sequence[dict[str, str]]], *, num_samples: int = 1,
                max_new_tokens: int, rng: jax.Array, chat_kwargs: dict | None = None,
                **sampling_kwargs: Any) -> tuple[list[list[str]], SampleOutput]:
    """Chat messages in, decoded strings out: texts[i][j] is sample j of conversation i."""
    prompts = [tokenizer.chat(list(c), add_generation_prompt=True, **(chat_kwargs or {}))
               for c in conversations]
    sampling_kwargs.setdefault("stop_ids", tokenizer.eos_ids)
    sampling_kwargs.setdefault("pad_id", tokenizer.pad_id)
    out = sample(cfg, params, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                 rng=rng, **sampling_kwargs)
    flat = [tokenizer.decode(ids) for ids in completions(out)]
    return [flat[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))], out
