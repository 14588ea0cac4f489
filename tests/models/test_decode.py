"""models.decode: the weights-first decode step equals `hidden_cached` for one token per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models
from catjax.models import decode


def _noisy(params, rng):
    """Random norms and biases, so that a weight read from the wrong place shows."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("preset,overrides", [
    ("tiny_llama", {}),
    ("tiny_qwen3", {"attention_bias": True}),  # biases and q/k norms
    ("tiny_gemma3", {"sliding_window": 4}),  # sandwich norms, gelu, local RoPE, a short window
])
def test_decode_step_equals_hidden_cached(preset, overrides):
    cfg = models.get_preset(preset, **overrides)
    params = _noisy(models.init_params(cfg, jax.random.key(0)), jax.random.key(1))
    b, p, slots = 3, 9, 16
    prompt = jax.random.randint(jax.random.key(2), (b, p), 0, cfg.vocab_size)
    cache = models.init_cache(cfg, b, slots)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    _, cache = models.hidden_cached(cfg, params, prompt, positions, cache, prefill=True)
    tokens = jnp.asarray([5, 17, 2])
    pos = jnp.asarray([9, 4, 7])  # ragged rows: each writes over its own stale slot

    want, want_cache = models.hidden_cached(cfg, params, tokens[:, None], pos[:, None], cache)
    layout = models.decode_layout(cfg, params)
    assert decode.is_decode_layout(layout) and not decode.is_decode_layout(params)
    got, got_cache = jax.jit(models.decode_step, static_argnums=0)(cfg, layout, tokens, pos,
                                                                   cache.unstacked())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    for a, w in zip(jax.tree.leaves(got_cache.stacked()), jax.tree.leaves(want_cache),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-5, atol=2e-5)


def test_decode_layout_holds_each_weight_output_major():
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    layer = models.decode_layout(cfg, params)["layers"][1]
    d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.mlp_dim)
    assert layer["qkv_t"].shape == ((n + 2 * k) * h, d)
    assert layer["o_t"].shape == (d, n * h) and layer["down_t"].shape == (d, f)
    np.testing.assert_array_equal(layer["gate_up_t"][f:], params["layers"]["up"][1].T)
    np.testing.assert_array_equal(layer["qkv_t"][n * h:(n + k) * h],
                                  params["layers"]["k"][1].reshape(d, -1).T)
