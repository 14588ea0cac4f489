"""Log-probabilities of given tokens and the entropies of the distributions they come from.

`token_logprobs` equals `log_softmax(logits_from_hidden(...))` read at the targets (and the
entropy of that softmax), but its gradient is written by hand. Autodiff of the log-softmax and
the gather builds, per scored position, a full-vocabulary zero tensor that the gather's transpose
scatters into, a separate exp pass, and on XLA:CPU a transposed copy of the [T, V] logit gradient
for the head's weight gradient: on the tiny benchmark model those cost more than the head's three
matmuls (bench/RESULTS.md). Here the logit gradient is one elementwise expression,

    d logp[target] / dz = onehot(target) - p,    d entropy / dz = -p * (log p + entropy),

and the head weight's gradient contracts the hidden states first, so it reads that gradient as it
lies. Between the passes it keeps the float32 logits (`keep_logits=True`, as autodiff does) or
only [B, T] statistics, and then the backward pass recomputes the logits: one more head matmul
for [B, T, V] less memory, what a caller scoring in chunks wants.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from catjax.models.config import ModelConfig
from catjax.models.decoder import Params, head_logits, head_weight, rms_norm


def token_logprobs(cfg: ModelConfig, params: Params, x_btd: jax.Array, targets_bt: jax.Array,
                   *, keep_logits: bool = True,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """float32 (log p(target), entropy), each [B, T], of the next-token distributions at the
    hidden states `x_btd` (before the final norm: `hidden_states`' output).

    keep_logits: hold the [B, T, V] float32 logits for the backward pass (False: recompute them).
    temperature: of the distribution scored, softmax(logits / temperature) (after any soft cap),
    as the sampler draws at it; 1 is the model's own.
    """
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature={temperature} must be > 0")
    x_btd = rms_norm(cfg, x_btd, params["final_norm"])
    softcap, inv_temp = float(cfg.final_logit_softcap or 0.0), 1.0 / float(temperature)
    if not softcap and inv_temp != 1.0:
        # Linear logits: (x / T) W = (x W) / T, and scaling [B, T, D] rather than [B, T, V]
        # costs no second logits-sized buffer (the planner saw one: 25% more update memory).
        x_btd, inv_temp = x_btd * jnp.asarray(inv_temp, x_btd.dtype), 1.0
    return _head_logprobs(x_btd, head_weight(cfg, params), targets_bt, cfg.tie_embeddings,
                          softcap, keep_logits, inv_temp)


def _logits(x_btd, w, tied, softcap, inv_temp):
    z = head_logits(x_btd, w, tied, softcap)
    return z if inv_temp == 1.0 else z * inv_temp  # (at 1: the very same program as before)


def _statistics(x_btd, w, targets_bt, tied, softcap, inv_temp):
    """The logits and their log-normaliser, target log-prob and entropy, in two passes over V."""
    z = _logits(x_btd, w, tied, softcap, inv_temp)
    m = jnp.max(z, axis=-1, keepdims=True)  # for the exp's range only (the VJP is hand-written)
    e = jnp.exp(z - m)
    s0, s1 = vocab_sums(e, e * z)
    lse = m[..., 0] + jnp.log(s0)
    z_target = target_logits(z, targets_bt)
    # entropy = -sum p (z - lse) = lse - sum p z
    return z, lse, z_target - lse, lse - s1 / s0


def target_logits(z_btv: jax.Array, targets_bt: jax.Array, masked: bool | None = None) -> jax.Array:
    """`z[b, t, targets[b, t]]`. `masked` (default: off CPUs) as a sum of the logits masked to
    the target, which a vocabulary split over devices (a tensor axis) sums where it lies: GSPMD
    all-gathered every chunk's float32 logits for the gather (Qwen 3 4B update, v5p, tensor=2:
    15 GB per step, bench/RESULTS.md). The same value: one term and zeros. On CPUs the gather
    reads one entry where the mask would read them all."""
    if masked is None:
        masked = jax.default_backend() != "cpu"
    if not masked:
        return jnp.take_along_axis(z_btv, targets_bt[..., None], axis=-1)[..., 0]
    is_target = jax.lax.broadcasted_iota(jnp.int32, z_btv.shape, z_btv.ndim - 1) == targets_bt[..., None]
    return jnp.sum(jnp.where(is_target, z_btv, 0.0), axis=-1)


def vocab_sums(a: jax.Array, b: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """(sum a, sum b) over the last (vocabulary) axis: the log-normaliser's and the entropy's.

    On CPUs, one variadic reduce over blocks of `block` entries, then a sum of the blocks' sums.
    XLA:CPU runs the variadic reduce in its own loop, one pass over both inputs with the exp
    fused in: 207 ms of the tiny model's update, where two plain sums went to a YNNPACK reduce
    of 469 ms and the exp took 188 ms more (bench/RESULTS.md). The blocks keep the float32 rounding near a
    pairwise sum's (one sequential pass over 49k terms put the entropy 1e-4 off). Accelerators
    keep the plain sums, which their compilers fuse (the variadic form is not measured there).
    Not for a few rows: over [32, 49k] (a decode step's draw) it took 9.4 ms against 6.4 ms
    for two plain log-sum-exps.
    """
    if jax.default_backend() != "cpu":
        return jnp.sum(a, axis=-1), jnp.sum(b, axis=-1)
    v = a.shape[-1]
    c = next(c for c in (block, 64, 32, 16, 8, 4, 2, 1) if v % c == 0)
    a, b = (x.reshape(*x.shape[:-1], v // c, c) for x in (a, b))
    zero = jnp.zeros((), a.dtype)
    sa, sb = jax.lax.reduce((a, b), (zero, zero), lambda x, y: (x[0] + y[0], x[1] + y[1]),
                            (a.ndim - 1,))
    return jnp.sum(sa, axis=-1), jnp.sum(sb, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _head_logprobs(x_btd, w, targets_bt, tied: bool, softcap: float, keep_logits: bool,
                   inv_temp: float):
    _, _, logp, ent = _statistics(x_btd, w, targets_bt, tied, softcap, inv_temp)
    return logp, ent


def _fwd(x_btd, w, targets_bt, tied, softcap, keep_logits, inv_temp):
    z, lse, logp, ent = _statistics(x_btd, w, targets_bt, tied, softcap, inv_temp)
    return (logp, ent), (x_btd, w, targets_bt, lse, ent, z if keep_logits else None)


def _bwd(tied, softcap, keep_logits, inv_temp, res, cotangents):
    x_btd, w, targets_bt, lse, ent, z = res
    g_logp, g_ent = (c[..., None] for c in cotangents)
    if z is None:
        z = _logits(x_btd, w, tied, softcap, inv_temp)
    logp_v = z - lse[..., None]
    p = jnp.exp(logp_v)
    is_target = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == targets_bt[..., None]
    dz = jnp.where(is_target, g_logp, 0.0) - p * (g_logp + g_ent * (logp_v + ent[..., None]))
    if inv_temp != 1.0:  # z = y / T: dz/dy = 1 / T
        dz = dz * inv_temp
        z = z / inv_temp  # the head's (soft-capped) logits again, for the cap's derivative
    if softcap:  # z = c tanh(u / c): dz/du = 1 - (z / c)^2
        dz = dz * (1.0 - jnp.square(z / softcap))
    dz = dz.astype(x_btd.dtype)  # the matmuls run in the compute dtype, as autodiff's do
    dx = jnp.einsum("btv,vd->btd" if tied else "btv,dv->btd", dz, w)
    # Hidden states first: the contraction over positions then reads dz as it lies ([B, T, V]),
    # where "btv,btd->vd" made XLA:CPU write a transposed copy of it.
    dw_dv = jnp.einsum("btd,btv->dv", x_btd, dz)
    return dx, (dw_dv.T if tied else dw_dv), np.zeros(targets_bt.shape, jax.dtypes.float0)


_head_logprobs.defvjp(_fwd, _bwd)
