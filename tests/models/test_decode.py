"""models.decode: the weights-first decode step over a shared-prompt cache gives the hidden states
of `hidden_cached` over the equivalent per-row cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models
from catjax.models import decode
from tests.tiny_model import noisy_params


@pytest.mark.parametrize("preset,overrides,weights_first,window", [
    ("tiny_llama", {}, True, 0),
    ("tiny_llama", {}, False, 2),  # generated blocks of 2, 2, 1
    ("tiny_qwen3", {"attention_bias": True}, True, 1),  # biases and q/k norms; blocks 1, 1, 2, 1
    ("tiny_qwen3", {"attention_bias": True}, False, 0),
    # sandwich norms, gelu, local RoPE, a window that slides over prompt and blocks
    ("tiny_gemma3", {"sliding_window": 6}, True, 2),
    ("tiny_gemma3", {"sliding_window": 6}, False, 1),
])
def test_decode_steps_equal_hidden_cached_over_per_row_caches(preset, overrides, weights_first,
                                                              window):
    cfg = models.get_preset(preset, **overrides)
    params = noisy_params(models.init_params(cfg, jax.random.key(0)), jax.random.key(1))
    b, g, p, n = 2, 3, 8, 5
    prompt_len = jnp.asarray([8, 3])  # the second prompt is padded: its slots 3..7 are stale
    prompt = jax.random.randint(jax.random.key(2), (b, p), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    _, filled = models.hidden_cached(cfg, params, prompt, positions, models.init_cache(cfg, b, p),
                                     prefill=True)
    # The reference: every row its own copy of its prompt's cache, N more slots.
    ref_cache = jax.tree.map(lambda c: jnp.repeat(jnp.pad(c, ((0, 0),) * 3 + ((0, n), (0, 0))),
                                                  g, axis=1), filled)
    shared = models.init_shared_cache(cfg, filled, prompt_len, g, n, window=window)
    assert shared.group == g
    assert shared.block_starts == (0, *np.cumsum(decode.window_blocks(n, window)))
    layout = models.decode_layout(cfg, params, weights_first)
    assert decode.is_decode_layout(layout) and not decode.is_decode_layout(params)
    step_fn = jax.jit(models.decode_step, static_argnums=(0, 5))
    tokens = jax.random.randint(jax.random.key(3), (n, b * g), 0, cfg.vocab_size)
    for step in range(n):
        pos = (jnp.repeat(prompt_len, g) + step)[:, None]
        want, ref_cache = models.hidden_cached(cfg, params, tokens[step][:, None], pos, ref_cache)
        block = int(np.searchsorted(shared.block_starts, step, side="right")) - 1
        got, shared = step_fn(cfg, layout, tokens[step], jnp.int32(step), shared, block)
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


def test_decode_layout_rows_first_holds_each_weight_input_major():
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    layer = models.decode_layout(cfg, params, weights_first=False)["layers"][1]
    d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.mlp_dim)
    assert layer["qkv"].shape == (d, (n + 2 * k) * h) and "qkv_t" not in layer
    assert layer["o"].shape == (n * h, d) and layer["down"].shape == (f, d)
    np.testing.assert_array_equal(layer["gate_up"][:, f:], params["layers"]["up"][1])
    np.testing.assert_array_equal(layer["qkv"][:, n * h:(n + k) * h],
                                  params["layers"]["k"][1].reshape(d, -1))


@pytest.mark.parametrize("n,first,want", [
    (256, 64, (64, 64, 128)),
    (200, 64, (64, 64, 72)),  # the last block cut to end at N
    (1024, 64, (64, 64, 128, 256, 512)),
    (5, 1, (1, 1, 2, 1)),
    (48, 64, (48,)), (48, 0, (48,)), (48, None, (48,)),
])
def test_window_blocks_double_and_cover_the_budget(n, first, want):
    assert decode.window_blocks(n, first) == want


def test_window_blocks_reject_a_negative_window():
    with pytest.raises(ValueError, match="decode window -1"):
        decode.window_blocks(8, -1)


def test_a_step_outside_the_cache_blocks_or_stacked_params_are_refused():
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    cache = models.init_shared_cache(cfg, models.init_cache(cfg, 1, 4), jnp.asarray([4]), 2, 4,
                                     window=2)
    with pytest.raises(ValueError, match="block=2: the cache has 2 generated blocks"):
        models.decode_step(cfg, models.decode_layout(cfg, params), jnp.zeros(2, jnp.int32),
                           jnp.int32(0), cache, 2)
    with pytest.raises(ValueError, match="params must come from models.decode_layout"):
        models.decode_step(cfg, params, jnp.zeros(2, jnp.int32), jnp.int32(0), cache, 0)
