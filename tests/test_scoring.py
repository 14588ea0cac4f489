"""Teacher-forced scoring equals log-probs read off a plain full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from catjax import models, scoring


def test_continuation_logprobs_and_last_token_logits_match_forward():
    cfg = models.get_preset("tiny_gemma3")
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 500, n).tolist() for n in (3, 17, 9)]
    conts = [rng.integers(1, 500, n).tolist() for n in (5, 1, 12)]
    got = scoring.continuation_logprobs(cfg, params, prompts, conts, batch_size=2)
    last = scoring.last_token_logits(cfg, params, prompts, batch_size=2)
    for p, c, lp, lg in zip(prompts, conts, got, last, strict=True):
        logits = models.forward(cfg, params, jnp.asarray([p + c], jnp.int32))[0]
        logp = np.asarray(jax.nn.log_softmax(logits, -1))
        want = logp[np.arange(len(p) - 1, len(p) + len(c) - 1), c]
        np.testing.assert_allclose(lp, want, atol=1e-5)
        np.testing.assert_allclose(lg, np.asarray(logits[len(p) - 1]), atol=1e-4)
