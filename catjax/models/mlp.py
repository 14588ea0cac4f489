"""The gated feed-forward block, down(act(x @ gate) * (x @ up)), with a hand-written gradient.

The values are those of the plain einsums. The backward pass is written out because of what
autodiff gives XLA:CPU: the activation's derivative is fused into a copy that writes each
[tokens, F] activation gradient transposed, to feed the weight gradients, and XLA:CPU's loop
emitter writes transposed slowly (on SmolLM2 the MLP's transposing copies were 13% of the
training step, bench/RESULTS.md). Here the two activation gradients are computed in their own
layout, behind an optimisation barrier on the CPU, and the dots read them from there: the MLP's
forward and backward pass ran 8-14% faster (bench/RESULTS.md). Other backends keep the barrier
out, so that their fusions stay free.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation of a gated MLP: 'silu' or 'gelu_tanh'."""
    if name == "gelu_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "silu":
        return jax.nn.silu
    # ModelConfig checks this too; a name added there but not here must not fall back silently.
    raise ValueError(f"model.activation={name!r}: the gated MLP knows 'silu' and 'gelu_tanh'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_mlp(activation: str, x_btd: jax.Array, w_gate_df: jax.Array, w_up_df: jax.Array,
              w_down_fd: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]: down(act(x @ gate) * (x @ up))."""
    return _forward(activation, x_btd, w_gate_df, w_up_df, w_down_fd)[0]


def _forward(activation, x_btd, w_gate_df, w_up_df, w_down_fd):
    gate = jnp.einsum("btd,df->btf", x_btd, w_gate_df)
    up = jnp.einsum("btd,df->btf", x_btd, w_up_df)
    out = jnp.einsum("btf,fd->btd", activation_fn(activation)(gate) * up, w_down_fd)
    return out, gate, up


def _fwd(activation, x_btd, w_gate_df, w_up_df, w_down_fd):
    out, gate, up = _forward(activation, x_btd, w_gate_df, w_up_df, w_down_fd)
    return out, (x_btd, w_gate_df, w_up_df, w_down_fd, gate, up)


def _bwd(activation, res, d_out_btd):
    x_btd, w_gate_df, w_up_df, w_down_fd, gate, up = res
    act, act_vjp = jax.vjp(activation_fn(activation), gate)  # elementwise: recomputed, not kept
    d_hidden = jnp.einsum("btd,fd->btf", d_out_btd, w_down_fd)
    d_w_down = jnp.einsum("btf,btd->fd", act * up, d_out_btd)
    d_up = d_hidden * act
    (d_gate,) = act_vjp(d_hidden * up)
    if jax.default_backend() == "cpu":
        d_gate, d_up = jax.lax.optimization_barrier((d_gate, d_up))
    d_x = (jnp.einsum("btf,df->btd", d_gate, w_gate_df)
           + jnp.einsum("btf,df->btd", d_up, w_up_df))
    d_w_gate = jnp.einsum("btd,btf->df", x_btd, d_gate)
    d_w_up = jnp.einsum("btd,btf->df", x_btd, d_up)
    return tuple(g.astype(p.dtype) for g, p in zip(
        (d_x, d_w_gate, d_w_up, d_w_down), (x_btd, w_gate_df, w_up_df, w_down_fd), strict=True))


gated_mlp.defvjp(_fwd, _bwd)
