"""Random weights for tiny test models, without compiling an initializer (seconds saved per test
module): normal(0, 0.02) from numpy, norm weights at one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from catjax import models


def numpy_params(cfg: models.ModelConfig, seed: int = 0) -> models.Params:
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.02, shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, models.param_shapes(cfg),
                                            is_leaf=lambda x: isinstance(x, tuple))
