"""GRPO-family policy-optimisation maths: advantages, KL estimators, the clipped loss, metrics.

Pure `jax.numpy` on float32 arrays: no models, no optimizer, no host syncs, so every function can
sit inside a jitted update. Configuration (method names, group size, epsilons as Python floats)
is static: pass it as plain Python values, or mark it static when jitting these functions
directly. Shapes are in the names: `r` = rollout rows (B prompts x G rollouts, the G rollouts of
one prompt adjacent), `t` = completion tokens, `b`/`g` = the [B, G] view of `r`.

Pieces are small functions registered by name (as in Tunix's `algo_core`), so a new advantage
estimator, KL estimator or loss aggregation is one decorated function:

    ADVANTAGES         "grpo" (the paper), "dr_grpo", "rloo"
    KL_ESTIMATORS      "k1", "k2", "k3", "low_var_kl"
    LOSS_AGGREGATIONS  "token_mean" (DAPO), "seq_mean_token_mean" (the paper), "seq_mean_token_sum_norm"
                       (Dr. GRPO)

The paper's update (PAPER.md, "Update"): A_i = (R_i - mean_G) / std_G, the same for every token of
rollout i; PPO clipped ratio loss, token-averaged per sequence, then averaged over sequences; KL to
the frozen reference with coefficient 1e-3, subtracted from the reward ("reward-level KL", verl
style: `kl_penalized_rewards`) or added to the per-token loss ("loss-level KL": `policy_loss`
with `ref_logprobs_rt` and `kl_coef`).

Rollout reuse (`num_iterations` > 1 PPO epochs over one batch of rollouts) needs nothing special
here: `old_logprobs_rt` are the behaviour log-probs (the policy's before the update, at the
sampling temperature; `trainer.train_step` recomputes them), and stay fixed while the policy
moves. With a single iteration and `old_logprobs_rt == stop_gradient(logprobs_rt)` the ratio is
exactly 1, nothing is clipped, and the gradient is the plain policy gradient -A * d logprob
(scaled by the aggregation); the clip only bites on later iterations.

Metrics are `(sum, count)` pairs of float32 scalars, so micro-batches and devices aggregate
exactly: add pairs with `sum_metrics` (under jit), divide once with `combine_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

Metrics = dict[str, tuple[jax.Array, jax.Array]]

ADVANTAGES: dict[str, Callable[..., jax.Array]] = {}
KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {}

SCALES = ("group", "batch", "none")


def _registrar(registry: dict, kind: str):
    def register(name: str):
        def deco(fn):
            if name in registry:
                raise ValueError(f"{kind} {name!r} is already registered")
            registry[name] = fn
            return fn

        return deco

    return register


register_advantage = _registrar(ADVANTAGES, "advantage")
"""`@register_advantage(name)`: fn(rewards_r, group_size, *, scale, eps) -> adv_r."""
register_kl_estimator = _registrar(KL_ESTIMATORS, "KL estimator")
"""`@register_kl_estimator(name)`: fn(logprobs_rt, ref_logprobs_rt) -> kl_rt (any shape)."""
register_loss_aggregation = _registrar(LOSS_AGGREGATIONS, "loss aggregation")
"""`@register_loss_aggregation(name)`: fn(loss_rt, mask_rt, max_tokens) -> (numerator, denominator)."""


def _get(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}: choose from {sorted(registry)}")
    return registry[name]


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# --- advantages ------------------------------------------------------------------------------
#
# A method centres the rewards; `scale` picks the divisor (std + eps):
#
#   scale    divisor                                       TRL's `scale_rewards`
#   "group"  std of the prompt's G rewards (ddof=1)        "group" (default)
#   "batch"  std of all r rewards of the batch (ddof=1)    "batch"
#   "none"   1 (no eps added either)                       "none"
#
#   method     centred value                              scale
#   "grpo"     R_i - mean_g                               honoured; "group" = the paper's z-score
#   "dr_grpo"  R_i - mean_g                               ignored: Dr. GRPO is by definition unscaled,
#                                                         so "dr_grpo" == "grpo" with scale="none"
#   "rloo"     R_i - mean of the other G-1 (G=1: 0)       honoured; classic RLOO is scale="none"
#
# std is the unbiased sample std (ddof=1, as torch.std in TRL and verl); with one value it is 0.
# The batch std is that of the raw rewards (as TRL), not of the centred values. A group whose
# rewards are all equal gets an advantage of exactly 0 (never NaN), whatever the method and scale.


def _grouped(rewards_r: jax.Array, group_size: int) -> jax.Array:
    rewards_r = _f32(rewards_r)
    if rewards_r.ndim != 1:
        raise ValueError(f"rewards must be 1-D [r], got shape {rewards_r.shape}")
    if group_size < 1 or rewards_r.shape[0] % group_size:
        raise ValueError(f"{rewards_r.shape[0]} rewards do not split into groups of {group_size}")
    return rewards_r.reshape(-1, group_size)


def _std(x: jax.Array, axis) -> jax.Array:
    """Unbiased sample std (ddof=1); 0 for a single value."""
    n = x.size if axis is None else x.shape[axis]
    dev = x - jnp.mean(x, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(dev * dev, axis=axis, keepdims=axis is not None) / max(n - 1, 1))


def _constant_groups(rewards_bg: jax.Array) -> jax.Array:
    """[B, 1] True where all G rewards are equal (their centred value must be exactly 0)."""
    return jnp.max(rewards_bg, -1, keepdims=True) == jnp.min(rewards_bg, -1, keepdims=True)


def _scaled(centred_bg: jax.Array, rewards_bg: jax.Array, scale: str, eps: float) -> jax.Array:
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}: choose from {list(SCALES)}")
    centred_bg = jnp.where(_constant_groups(rewards_bg), 0.0, centred_bg)
    if scale == "none":
        return centred_bg
    std = _std(rewards_bg, -1) if scale == "group" else _std(rewards_bg, None)
    return centred_bg / (std + eps)


@register_advantage("grpo")
def grpo_advantages(rewards_r, group_size: int, *, scale: str = "group", eps: float = 1e-6):
    """(R_i - mean_g) / (std + eps): the paper's group z-score with scale="group"."""
    r_bg = _grouped(rewards_r, group_size)
    return _scaled(r_bg - jnp.mean(r_bg, -1, keepdims=True), r_bg, scale, eps).reshape(-1)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards_r, group_size: int, *, scale: str = "none", eps: float = 1e-6):
    """R_i - mean_g, never divided (Dr. GRPO): `scale` is accepted and ignored."""
    del scale
    return grpo_advantages(rewards_r, group_size, scale="none", eps=eps)


@register_advantage("rloo")
def rloo_advantages(rewards_r, group_size: int, *, scale: str = "none", eps: float = 1e-6):
    """R_i - mean_{j != i} R_j (leave-one-out baseline); 0 when G = 1; then `scale`'s divisor."""
    r_bg = _grouped(rewards_r, group_size)
    if group_size == 1:
        return jnp.zeros_like(r_bg).reshape(-1)
    others = (jnp.sum(r_bg, -1, keepdims=True) - r_bg) / (group_size - 1)
    return _scaled(r_bg - others, r_bg, scale, eps).reshape(-1)


def advantages(rewards_r, group_size: int, method: str = "grpo", scale: str = "group",
               eps: float = 1e-6, task_rewards_r=None) -> jax.Array:
    """Per-rollout advantages [r] from scalar rewards [r] (rows grouped G at a time).

    See the table above for how `method` and `scale` combine. `task_rewards_r`, the rewards
    before a reward-level KL penalty (`kl_penalized_rewards`), if given: a group whose task
    rewards are all equal gets advantage exactly 0. Without them (verl's way) such a group's
    penalised rewards differ only by their KL (~1e-5), which the group z-score turns into
    advantages of about +-1.5: a strong pull toward the reference, and mere round-off while the
    policy still is the reference. All arguments but the rewards are static.
    """
    adv_r = _get(ADVANTAGES, method, "advantage method")(rewards_r, group_size, scale=scale, eps=eps)
    if task_rewards_r is None:
        return adv_r
    constant_b1 = _constant_groups(_grouped(task_rewards_r, group_size))
    return jnp.where(constant_b1, 0.0, adv_r.reshape(-1, group_size)).reshape(-1)


# --- KL estimators (per token, policy vs reference; Schulman, "Approximating KL divergence") ---
# With d = ref - lp (log pi_ref/pi, sampled from pi): k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1 >= 0.


@register_kl_estimator("k1")
def kl_k1(logprobs, ref_logprobs):
    """lp - ref: unbiased, high variance, can be negative."""
    return _f32(logprobs) - _f32(ref_logprobs)


@register_kl_estimator("k2")
def kl_k2(logprobs, ref_logprobs):
    """(lp - ref)^2 / 2: biased, low variance, >= 0."""
    d = _f32(logprobs) - _f32(ref_logprobs)
    return 0.5 * d * d


@register_kl_estimator("k3")
def kl_k3(logprobs, ref_logprobs):
    """exp(ref - lp) - (ref - lp) - 1: unbiased, low variance, >= 0."""
    d = _f32(ref_logprobs) - _f32(logprobs)
    return jnp.expm1(d) - d


@register_kl_estimator("low_var_kl")
def kl_low_var(logprobs, ref_logprobs):
    """verl's "low_var_kl": k3 with the log-ratio clamped to [-20, 20] and the result to [-10, 10]."""
    d = jnp.clip(_f32(ref_logprobs) - _f32(logprobs), -20.0, 20.0)
    return jnp.clip(jnp.expm1(d) - d, -10.0, 10.0)


def _masked_inputs(mask_rt, *logprobs_rt):
    """float32 mask and the log-probs with padding replaced by 0, so that garbage (inf, NaN) in
    padded slots reaches neither the values nor the gradients (x * 0 would not be enough)."""
    mask_rt = _f32(mask_rt)
    valid = mask_rt > 0
    return (mask_rt, valid, *(None if x is None else jnp.where(valid, _f32(x), 0.0) for x in logprobs_rt))


def kl_penalized_rewards(rewards_r, logprobs_rt, ref_logprobs_rt, mask_rt, kl_coef: float,
                         estimator: str = "k1") -> jax.Array:
    """Reward-level KL (the paper's table; verl's `use_kl_in_reward`): R - kl_coef * sum_t kl_t.

    The KL is summed over the valid completion tokens of each rollout and treated as a constant
    (stop_gradient): it shifts the rewards before the advantages, it is not differentiated.
    `logprobs_rt` are the behaviour (rollout) log-probs.
    """
    est = _get(KL_ESTIMATORS, estimator, "KL estimator")
    mask_rt, valid, lp, ref = _masked_inputs(mask_rt, logprobs_rt, ref_logprobs_rt)
    kl_r = jnp.sum(jnp.where(valid, est(lp, ref), 0.0) * mask_rt, -1)
    return _f32(rewards_r) - kl_coef * jax.lax.stop_gradient(kl_r)


# --- loss aggregation: (numerator, denominator), summed over micro-batches, divided once -------


@register_loss_aggregation("token_mean")
def agg_token_mean(loss_rt, mask_rt, max_tokens=None):
    """Sum over every valid token of the batch / number of valid tokens (DAPO; TRL's default)."""
    del max_tokens
    return jnp.sum(loss_rt * mask_rt), jnp.sum(mask_rt)


def _per_sequence(per_seq_r, mask_rt):
    has_tokens = jnp.sum(mask_rt, -1) > 0
    return jnp.sum(jnp.where(has_tokens, per_seq_r, 0.0)), jnp.sum(has_tokens.astype(jnp.float32))


@register_loss_aggregation("seq_mean_token_mean")
def agg_seq_mean_token_mean(loss_rt, mask_rt, max_tokens=None):
    """Mean over each sequence's valid tokens, then mean over sequences with >= 1 token (the paper)."""
    del max_tokens
    n_r = jnp.sum(mask_rt, -1)
    return _per_sequence(jnp.sum(loss_rt * mask_rt, -1) / jnp.maximum(n_r, 1.0), mask_rt)


@register_loss_aggregation("seq_mean_token_sum_norm")
def agg_seq_mean_token_sum_norm(loss_rt, mask_rt, max_tokens=None):
    """Sum over each sequence's tokens / max_tokens (a constant), then mean over sequences with
    >= 1 token (Dr. GRPO: no length bias)."""
    if max_tokens is None:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' needs max_tokens")
    return _per_sequence(jnp.sum(loss_rt * mask_rt, -1) / float(max_tokens), mask_rt)


# --- the clipped policy loss --------------------------------------------------------------------


def policy_loss_terms(logprobs_rt, old_logprobs_rt, advantages_r, mask_rt, *, epsilon: float = 0.2,
                      epsilon_high: float | None = None, loss_agg: str = "seq_mean_token_mean",
                      ref_logprobs_rt=None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                      max_tokens: int | None = None) -> tuple[jax.Array, jax.Array, Metrics]:
    """(numerator, denominator, metrics) of the clipped policy loss, for exact accumulation.

    Sum numerators and denominators over micro-batches, then loss = num / max(den, 1) (and the
    gradient likewise: sum the gradients of the numerators, divide by the summed denominator):
    "token_mean": num = sum of token losses, den = number of valid tokens; "seq_mean_*":
    num = sum over sequences of their per-sequence value, den = sequences with >= 1 valid token.

    Per token: ratio = exp(lp - old), loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
    (+ kl_coef * kl_estimator(lp, ref) when `ref_logprobs_rt` is given: loss-level KL, which is
    differentiated). `epsilon_high` defaults to `epsilon` (DAPO's clip-higher when larger). Padded
    tokens (mask 0) contribute nothing, whatever they hold. The metrics (no gradient) are
    `(sum, count)` pairs: loss (= num, den), clip_frac (valid tokens where the clipped term was
    the active one, i.e. strictly smaller than the unclipped), clip_frac_low (ratio < 1 - eps,
    A < 0), clip_frac_high (ratio > 1 + eps_high, A > 0), ratio_mean, kl (per-token k3 against the
    reference; (0, 0) without one) and adv_mean (over the rows).
    """
    aggregate = _get(LOSS_AGGREGATIONS, loss_agg, "loss aggregation")
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    mask_rt, valid, lp, old, ref = _masked_inputs(mask_rt, logprobs_rt, old_logprobs_rt, ref_logprobs_rt)
    adv_rt = _f32(advantages_r)[:, None]

    ratio = jnp.exp(lp - old)
    unclipped = ratio * adv_rt
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv_rt
    loss_rt = -jnp.minimum(unclipped, clipped)
    use_kl_loss = ref is not None and not (isinstance(kl_coef, int | float) and kl_coef == 0)
    if use_kl_loss:
        est = _get(KL_ESTIMATORS, kl_estimator, "KL estimator")
        loss_rt = loss_rt + kl_coef * est(lp, ref)
    loss_rt = jnp.where(valid, loss_rt, 0.0)
    num, den = aggregate(loss_rt, mask_rt, max_tokens)

    sg = jax.lax.stop_gradient
    n_tok = sg(jnp.sum(mask_rt))
    tok_sum = lambda x_rt: sg(jnp.sum(jnp.where(valid, x_rt, 0.0) * mask_rt))
    as_f = lambda b: b.astype(jnp.float32)
    zero = jnp.float32(0.0)
    metrics: Metrics = {
        "loss": (sg(num), sg(den)),
        "clip_frac": (tok_sum(as_f(clipped < unclipped)), n_tok),
        "clip_frac_low": (tok_sum(as_f((ratio < 1.0 - eps_low) & (adv_rt < 0))), n_tok),
        "clip_frac_high": (tok_sum(as_f((ratio > 1.0 + eps_high) & (adv_rt > 0))), n_tok),
        "ratio_mean": (tok_sum(ratio), n_tok),
        "kl": (tok_sum(kl_k3(lp, ref)), n_tok) if ref is not None else (zero, zero),
        "adv_mean": (sg(jnp.sum(adv_rt)), jnp.float32(adv_rt.shape[0])),
    }
    return num, den, metrics


def policy_loss(logprobs_rt, old_logprobs_rt, advantages_r, mask_rt, *, epsilon: float = 0.2,
                epsilon_high: float | None = None, loss_agg: str = "seq_mean_token_mean",
                ref_logprobs_rt=None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                max_tokens: int | None = None) -> tuple[jax.Array, Metrics]:
    """(loss, metrics): the clipped policy loss of one batch, num / max(den, 1) of
    `policy_loss_terms` (0, not NaN, when no token is valid)."""
    num, den, metrics = policy_loss_terms(
        logprobs_rt, old_logprobs_rt, advantages_r, mask_rt, epsilon=epsilon,
        epsilon_high=epsilon_high, loss_agg=loss_agg, ref_logprobs_rt=ref_logprobs_rt,
        kl_coef=kl_coef, kl_estimator=kl_estimator, max_tokens=max_tokens)
    return num / jnp.maximum(den, 1.0), metrics


# --- metrics ------------------------------------------------------------------------------------


def sum_metrics(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> Metrics:
    """Element-wise sum of two `(sum, count)` metric dicts with the same keys (jit-friendly)."""
    if set(a) != set(b):
        raise ValueError(f"metric keys differ: {sorted(set(a) ^ set(b))}")
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def combine_metrics(metrics: Mapping[str, tuple] | Iterable[Mapping[str, tuple]]) -> dict[str, float]:
    """Host-side means: for each key, (sum of sums) / (sum of counts); 0.0 where the count is 0.

    Accepts one metric dict or an iterable of them (keys may differ between dicts).
    """
    dicts = [metrics] if isinstance(metrics, Mapping) else list(metrics)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for d in dicts:
        for k, (s, c) in d.items():
            sums[k] = sums.get(k, 0.0) + float(s)
            counts[k] = counts.get(k, 0.0) + float(c)
    return {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
