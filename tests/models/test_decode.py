"""models.decode: the weights-first decode step over a shared-prompt cache gives the hidden states
of `hidden_cached` over the equivalent per-row cache."""

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
    ("tiny_gemma3", {"sliding_window": 6}),  # sandwich norms, gelu, local RoPE, a short window
])
def test_decode_steps_equal_hidden_cached_over_per_row_caches(preset, overrides):
    cfg = models.get_preset(preset, **overrides)
    params = _noisy(models.init_params(cfg, jax.random.key(0)), jax.random.key(1))
    b, g, p, n = 2, 3, 8, 5
    prompt_len = jnp.asarray([8, 3])  # the second prompt is padded: its slots 3..7 are stale
    prompt = jax.random.randint(jax.random.key(2), (b, p), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    _, filled = models.hidden_cached(cfg, params, prompt, positions, models.init_cache(cfg, b, p),
                                     prefill=True)
    # The reference: every row its own copy of its prompt's cache, N more slots.
    ref_cache = jax.tree.map(lambda c: jnp.repeat(jnp.pad(c, ((0, 0),) * 3 + ((0, n), (0, 0))),
                                                  g, axis=1), filled)
    shared = models.init_shared_cache(cfg, filled, prompt_len, g, n)
    assert shared.group == g
    layout = models.decode_layout(cfg, params)
    assert decode.is_decode_layout(layout) and not decode.is_decode_layout(params)
    step_fn = jax.jit(models.decode_step, static_argnums=0)
    tokens = jax.random.randint(jax.random.key(3), (n, b * g), 0, cfg.vocab_size)
    for step in range(n):
        pos = (jnp.repeat(prompt_len, g) + step)[:, None]
        want, ref_cache = models.hidden_cached(cfg, params, tokens[step][:, None], pos, ref_cache)
        got, shared = step_fn(cfg, layout, tokens[step], jnp.int32(step), shared)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-5, atol=3e-5,
                                   err_msg=f"step {step}")


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
