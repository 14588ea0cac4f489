"""models.prefill: a prompt run in chunks through every layer gives the one-pass prefill's cache
and last hidden states, and skips the chunks that hold only padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models
from tests.tiny_model import noisy_params


@pytest.mark.parametrize("preset,overrides,per_layer", [
    ("tiny_qwen3", {"attention_bias": True}, False),  # biases and q/k norms
    ("tiny_qwen3", {}, True),  # per-layer weights (`unstack_layers`): unrolled layers
    ("tiny_qwen3", {"num_layers": 1}, False),  # the last layer is the only one
    ("tiny_llama", {"attn_logit_softcap": 5.0}, False),
    ("tiny_gemma3", {"sliding_window": 6}, False),  # a window shorter than a chunk and the prompt
    # The last layer (run whole only at each row's last token) sliding: its window must hold.
    ("tiny_gemma3", {"sliding_window": 6, "sliding_pattern": (False, True, True)}, False),
])
def test_chunks_equal_one_pass_and_padding_chunks_are_skipped(preset, overrides, per_layer):
    cfg = models.get_preset(preset, **overrides)
    # Random norms and biases: the last layer's keys and values, computed apart, must read the
    # same weights as the whole layer does.
    params = noisy_params(models.init_params(cfg, jax.random.key(0)), jax.random.key(2))
    layer_params = models.unstack_layers(params) if per_layer else params
    b, p, chunk, slots = 3, 32, 5, 40  # chunks [0,5) .. [30,32): the last one is short
    prompt_len = jnp.asarray([17, 9, 1])  # chunks from [20, 25) on hold only padding
    tokens = jax.random.randint(jax.random.key(1), (b, p), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    want_x, want_cache = models.hidden_cached(cfg, params, tokens, positions,
                                              models.init_cache(cfg, b, slots), q_chunk=None,
                                              prefill=True)
    want_last = jnp.take_along_axis(want_x, (prompt_len - 1)[:, None, None], axis=1)[:, 0]

    last, cache = jax.jit(lambda t, n: models.prefill(
        cfg, layer_params, t, n, models.init_cache(cfg, b, slots), chunk=chunk))(tokens, prompt_len)
    np.testing.assert_allclose(last, want_last, atol=2e-5)
    whole, _ = models.prefill(cfg, layer_params, tokens, prompt_len,
                              models.init_cache(cfg, b, slots), chunk=chunk, whole_last_layer=True)
    np.testing.assert_allclose(whole, want_last, atol=2e-5)
    cache = cache.stacked()
    for got, want in ((cache.k_lbksh, want_cache.k_lbksh), (cache.v_lbksh, want_cache.v_lbksh)):
        # Slots up to the end of the last chunk that runs hold what one pass writes there ...
        np.testing.assert_allclose(got[:, :, :, :20], want[:, :, :, :20], atol=2e-5)
        # ... and a skipped chunk's slots keep the empty cache's zeros (one pass writes its
        # padding tokens' keys there).
        assert np.all(np.asarray(got[:, :, :, 20:]) == 0)
        assert np.any(np.asarray(want[:, :, :, 20:p]) != 0)


def test_a_prompt_as_long_as_the_bucket_runs_every_chunk():
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    prompt_len = jnp.asarray([3, 12])
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    want_x, want_cache = models.hidden_cached(cfg, params, tokens, positions,
                                              models.init_cache(cfg, 2, 12), prefill=True)
    last, cache = models.prefill(cfg, params, tokens, prompt_len, models.init_cache(cfg, 2, 12),
                                 chunk=4)
    np.testing.assert_allclose(last, want_x[jnp.arange(2), prompt_len - 1], atol=2e-5)
    np.testing.assert_allclose(cache.k_lbksh, want_cache.k_lbksh, atol=2e-5)


def test_a_chunk_below_one_is_a_one_line_error():
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="chunk=0"):
        models.prefill(cfg, params, jnp.zeros((1, 4), jnp.int32), jnp.asarray([4]),
                       models.init_cache(cfg, 1, 4), chunk=0)
