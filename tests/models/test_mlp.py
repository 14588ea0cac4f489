import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax.models.mlp import activation_fn, gated_mlp


def _plain(activation, x, wg, wu, wd):
    """The block as autodiff sees it: the reference."""
    gate = jnp.einsum("btd,df->btf", x, wg)
    up = jnp.einsum("btd,df->btf", x, wu)
    return jnp.einsum("btf,fd->btd", activation_fn(activation)(gate) * up, wd)


def _inputs(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 5)
    b, t, d, f = 2, 5, 8, 24
    x = jax.random.normal(k[0], (b, t, d))
    ws = [jax.random.normal(k[i], s) / np.sqrt(s[0]) for i, s in
          ((1, (d, f)), (2, (d, f)), (3, (f, d)))]
    dy = jax.random.normal(k[4], (b, t, d))
    return [a.astype(dtype) for a in (x, *ws)], dy.astype(dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("remat", [False, True])
def test_values_and_every_gradient_equal_autodiff(activation, remat):
    args, dy = _inputs()
    ours = functools.partial(gated_mlp, activation)
    if remat:  # as the trainer's layer scan wraps it
        ours = jax.checkpoint(ours, prevent_cse=False)
    out, vjp = jax.jit(lambda *a: jax.vjp(ours, *a))(*args)
    ref, vjp_ref = jax.vjp(functools.partial(_plain, activation), *args)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for g, g_ref, name in zip(vjp(dy), vjp_ref(dy), ("x", "gate", "up", "down"), strict=True):
        assert float(jnp.max(jnp.abs(g_ref))) > 1e-2, name  # a gradient worth comparing
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_keeps_dtypes_and_follows_float32():
    args16, dy16 = _inputs(jnp.bfloat16)
    grads16 = jax.grad(lambda *a: jnp.sum(gated_mlp("silu", *a).astype(jnp.float32)
                                          * dy16.astype(jnp.float32)),
                       argnums=(0, 1, 2, 3))(*args16)
    args32 = [a.astype(jnp.float32) for a in args16]
    grads32 = jax.vjp(functools.partial(_plain, "silu"), *args32)[1](dy16.astype(jnp.float32))
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(g32)))
        assert float(jnp.max(jnp.abs(g16.astype(jnp.float32) - g32))) < 0.03 * scale


def test_an_unknown_activation_is_one_clear_error():
    args, _ = _inputs()
    with pytest.raises(ValueError, match="model.activation='relu'"):
        gated_mlp("relu", *args)
