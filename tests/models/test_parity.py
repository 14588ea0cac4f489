"""Logit parity with `transformers` (float32, eager attention) for every family."""

import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models
from tests.hf_fixtures import hf_logits, make_hf_model

# Sequences of 80 tokens: past Gemma's window of 8 and Llama's original context of 32.
SEQ = 80
CASES = [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 1}),
    ("llama", {"num_key_value_heads": 4, "attention_bias": True}),
    ("qwen3", {}),
    ("qwen3", {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    ("gemma3", {}),
    ("gemma3", {"num_key_value_heads": 1, "final_logit_softcapping": 5.0}),
]


@pytest.mark.parametrize("family,overrides", CASES, ids=lambda x: str(x))
def test_logits_match_transformers(tmp_path, family, overrides):
    model = make_hf_model(family, str(tmp_path), **overrides)
    tokens = np.random.default_rng(1).integers(0, 320, size=(2, SEQ))
    want = hf_logits(model, tokens)
    cfg, params = models.from_pretrained(str(tmp_path))
    assert cfg.head_dim == 24 and cfg.head_dim != cfg.hidden_size // cfg.num_heads
    got = np.asarray(models.forward(cfg, params, jnp.asarray(tokens, jnp.int32)))
    assert got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_cached_decoding_matches_full_pass(tmp_path, family, unroll):
    model = make_hf_model(family, str(tmp_path))
    del model
    cfg, params = models.from_pretrained(str(tmp_path))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 320, size=(2, 40)), jnp.int32)
    full = models.forward(cfg, params, tokens)
    cache = models.init_cache(cfg, 2, 48)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    pre, cache = models.forward_cached(cfg, params, tokens[:, :30], pos[:, :30], cache)
    steps = [pre]
    if unroll:  # the sampler's CPU decode: per-layer weights and cache (Gemma: sliding layers)
        params, cache = models.unstack_layers(params), cache.unstacked()
        assert len(params["layers"]) == cfg.num_layers and not cache.is_stacked
    for t in range(30, 40):
        step, cache = models.forward_cached(cfg, params, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        steps.append(step)
    assert cache.is_stacked != unroll
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full),
                               atol=2e-5, rtol=0)
