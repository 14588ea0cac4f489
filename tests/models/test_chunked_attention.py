"""Query-chunked prefill attention (`q_chunk`) equals the one-block version it replaces."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models

PRESETS = [("tiny_llama", {}), ("tiny_qwen3", {}), ("tiny_gemma3", {}),
           ("tiny_gemma3", {"attn_logit_softcap": 20.0, "final_logit_softcap": 5.0})]
P, SLOTS = 37, 48  # 37 tokens: several times Gemma's window of 8, divisible by no chunk below


def _setup(name, overrides):
    cfg = models.get_preset(name, dtype="float32", **overrides)
    params = models.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, SLOTS)), jnp.int32)
    return cfg, params, tokens


@pytest.mark.parametrize("name,overrides", PRESETS, ids=lambda x: str(x))
def test_chunked_prefill_matches_unchunked(name, overrides):
    cfg, params, tokens = _setup(name, overrides)
    pos = jnp.broadcast_to(jnp.arange(SLOTS, dtype=jnp.int32), (2, SLOTS))

    @functools.partial(jax.jit, static_argnums=(0, 1))  # one compile per setting, not per call
    def run(q_chunk, prefill=False):
        # A prefill from slot 0 (`prefill`: keys limited to the prompt, causal blocks), a second
        # one that starts mid-cache, then two decode steps.
        cache = models.init_cache(cfg, 2, SLOTS)
        a, cache = models.forward_cached(cfg, params, tokens[:, :P], pos[:, :P], cache,
                                         q_chunk=q_chunk, prefill=prefill)
        b, cache = models.forward_cached(cfg, params, tokens[:, P:P + 9], pos[:, P:P + 9], cache,
                                         q_chunk=q_chunk)
        steps = [a, b]
        for t in (P + 9, P + 10):
            step, cache = models.forward_cached(cfg, params, tokens[:, t:t + 1], pos[:, t:t + 1], cache,
                                                q_chunk=q_chunk)
            steps.append(step)
        return jnp.concatenate(steps, 1), cache

    want, want_cache = run(None)
    want = np.asarray(want)
    full = np.asarray(models.forward(cfg, params, tokens[:, :P + 11]))
    np.testing.assert_allclose(want, full, atol=2e-5, rtol=0)
    # Padded last blocks (37 = 4*8 + 5; 9 = 8 + 1); prefill blocks over growing key prefixes
    # (an unchunked prefill=True is what every sampler test runs).
    for q_chunk, prefill in ((8, False), (8, True)):
        got, cache = run(q_chunk, prefill)
        got = np.asarray(got)
        assert np.abs(got - want).max() <= 1e-5, (q_chunk, prefill, np.abs(got - want).max())
        for g, w in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_chunked_prefill_workspace_shrinks():
    """The point of chunking: XLA's temporaries no longer scale with P x S."""
    cfg = models.get_preset("tiny_qwen3", dtype="float32")
    params = models.init_params(cfg, jax.random.key(0))
    p = 1024
    tokens = jnp.zeros((1, p), jnp.int32)
    pos = jnp.arange(p, dtype=jnp.int32)[None]
    cache = models.init_cache(cfg, 1, p)

    def temp(q_chunk):
        fn = jax.jit(lambda t, c: models.hidden_cached(cfg, params, t, pos, c, q_chunk=q_chunk))
        return fn.lower(tokens, cache).compile().memory_analysis().temp_size_in_bytes

    scores = cfg.num_heads * p * p * 4  # one layer's float32 scores, unchunked
    assert temp(None) > scores
    assert temp(64) < scores / 4
