"""Model loading: which seed draws a random model's weights."""

import jax
import ml_collections
import numpy as np

from catjax import loading


def test_random_weights_follow_the_run_seed_unless_the_model_names_one(monkeypatch):
    monkeypatch.setattr(loading.text, "load_tokenizer", lambda path, chat_format=None: path)
    mc = ml_collections.ConfigDict(dict(init="random:tiny_qwen3", tokenizer="t"))
    embed = lambda m: np.asarray(jax.device_get(m.params["embed"]))  # noqa: E731
    a, b, again = (embed(loading.load_model(mc, seed=s)) for s in (1, 2, 1))
    assert not np.array_equal(a, b)  # one seed drives everything: config.seed reaches the weights
    np.testing.assert_array_equal(a, again)
    mc.seed = 2  # an explicit model.seed wins
    np.testing.assert_array_equal(embed(loading.load_model(mc, seed=1)), b)
