"""`token_logprobs`' hand-written gradient equals autodiff of the log-softmax it replaces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models
from catjax.models import logprobs

B, T = 3, 5


def _reference(cfg, params, x_btd, targets_bt, temperature=1.0):
    logits = models.logits_from_hidden(cfg, params, x_btd) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0], ent


def _case(preset: str, dtype: str = "float32", **changes):
    cfg = models.get_preset(preset).replace(dtype=dtype, vocab_size=384, **changes)
    params = models.init_params(cfg, jax.random.key(0))
    kx, kt, kw, kn = jax.random.split(jax.random.key(1), 4)
    # A head large enough that the softmaxes are far from uniform (and the softcap bites), and a
    # final norm that is not all ones.
    for name in ("embed", "lm_head"):
        if name in params:
            params[name] = params[name] * jnp.asarray(30.0, params[name].dtype)
    params["final_norm"] = jax.random.uniform(kn, params["final_norm"].shape, minval=0.5,
                                              maxval=1.5).astype(params["final_norm"].dtype)
    x = jax.random.normal(kx, (B, T, cfg.hidden_size)).astype(cfg.jnp_dtype)
    targets = jax.random.randint(kt, (B, T), 0, cfg.vocab_size)
    weights = jax.random.normal(kw, (2, B, T))
    return cfg, params, x, targets, weights


def _value_and_grads(fn, cfg, params, x, targets, weights):
    def loss(p, x):
        lp, ent = fn(cfg, p, x, targets)
        return jnp.sum(lp * weights[0]) + jnp.sum(ent * weights[1]), (lp, ent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("preset,changes", [
    ("tiny_qwen3", {}),                                                  # tied head
    ("tiny_llama", {}),                                                  # separate lm_head
    ("tiny_llama", {"final_logit_softcap": 5.0}),
])
@pytest.mark.parametrize("keep_logits", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])  # 0.7: the sampler's (Qwen 3, Llama 3.1)
def test_values_and_gradients_equal_autodiff_of_the_log_softmax(preset, changes, keep_logits,
                                                                temperature):
    cfg, params, x, targets, weights = _case(preset, **changes)
    ours = lambda *a: models.token_logprobs(*a, keep_logits=keep_logits, temperature=temperature)
    ref = lambda *a: _reference(*a, temperature=temperature)
    (_, (lp, ent)), (gp, gx) = _value_and_grads(ours, cfg, params, x, targets, weights)
    (_, (lp0, ent0)), (gp0, gx0) = _value_and_grads(ref, cfg, params, x, targets, weights)
    assert lp.dtype == ent.dtype == jnp.float32 and lp.shape == ent.shape == (B, T)
    assert float(jnp.ptp(ent0)) > 0.1  # the rows differ: a wrong gradient cannot hide
    # The entropy, lse - E[z], cancels logits of a few hundred: its rounding grows with 1 / T.
    np.testing.assert_allclose(lp, lp0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ent0, rtol=1e-5, atol=1e-5 / temperature)
    np.testing.assert_allclose(gx, gx0, rtol=1e-4, atol=1e-5 * float(jnp.abs(gx0).max()))
    # Every parameter the head touches (the embedding or lm_head, the final norm) and none else.
    for path, a in jax.tree_util.tree_leaves_with_path(gp):
        b = gp0
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(float(jnp.abs(b).max()), 1e-6),
                                   err_msg=jax.tree_util.keystr(path))


def test_temperature_changes_the_distribution_scored():
    cfg, params, x, targets, _ = _case("tiny_qwen3")
    lp1, ent1 = models.token_logprobs(cfg, params, x, targets)
    lp07, ent07 = models.token_logprobs(cfg, params, x, targets, temperature=0.7)
    assert float(jnp.mean(ent07)) < float(jnp.mean(ent1))  # sharper at 0.7
    assert not np.allclose(lp1, lp07)
    with pytest.raises(ValueError, match="temperature=0"):
        models.token_logprobs(cfg, params, x, targets, temperature=0.0)


def test_bfloat16_gradients_keep_their_dtypes_and_stay_near_float32():
    cfg, params, x, targets, weights = _case("tiny_qwen3", "bfloat16")
    (_, (lp, _)), (gp, gx) = _value_and_grads(models.token_logprobs, cfg, params, x, targets,
                                              weights)
    (_, (lp0, _)), (gp0, gx0) = _value_and_grads(_reference, cfg, params, x, targets, weights)
    assert lp.dtype == jnp.float32 and gx.dtype == gp["embed"].dtype == jnp.bfloat16
    np.testing.assert_allclose(lp, lp0, rtol=0.02, atol=0.05)
    for a, b in ((gx, gx0), (gp["embed"], gp0["embed"]), (gp["final_norm"], gp0["final_norm"])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(b)


def test_the_logit_gradient_is_one_elementwise_pass_without_a_scatter():
    """What the hand-written gradient is for: no full-vocabulary scatter from the gather's
    transpose (autodiff's has one; checked too, so this test would notice JAX changing)."""
    cfg, params, x, targets, weights = _case("tiny_qwen3")

    def hlo(fn):
        def loss(p):
            lp, ent = fn(cfg, p, x, targets)
            return jnp.sum(lp * weights[0]) + jnp.sum(ent * weights[1])
        return jax.jit(jax.grad(loss)).lower(params).as_text()

    assert "scatter" in hlo(_reference)
    assert "scatter" not in hlo(models.token_logprobs)


@pytest.mark.parametrize("vocab", [49152, 1000, 997])
def test_vocabulary_sums_round_like_a_pairwise_sum(vocab):
    """The two vocabulary sums behind the log-normaliser and the entropy (`vocab_sums`, a
    blocked variadic reduce on CPUs) are float32-accurate against float64, for a vocabulary of
    128-blocks, one of 8-blocks and a prime one (no blocks)."""
    rng = np.random.default_rng(0)
    a = rng.random((3, 4, vocab)).astype(np.float32)
    b = rng.standard_normal((3, 4, vocab)).astype(np.float32)
    sa, sb = jax.jit(logprobs.vocab_sums)(jnp.asarray(a), jnp.asarray(b))
    assert sa.shape == sb.shape == (3, 4)
    np.testing.assert_allclose(sa, a.astype(np.float64).sum(-1), rtol=2e-6)
    scale = np.abs(b).astype(np.float64).sum(-1)
    assert np.all(np.abs(np.asarray(sb, np.float64) - b.astype(np.float64).sum(-1)) <= 2e-6 * scale)


def test_target_logits_masked_sum_equals_the_gather_exactly():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 3, 50)) * 30, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 3)), jnp.int32)
    gathered = logprobs.target_logits(z, targets, masked=False)
    masked = logprobs.target_logits(z, targets, masked=True)
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(gathered))
    expected = np.take_along_axis(np.asarray(z), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_array_equal(np.asarray(gathered), expected)
