"""Helpers for tests that run tiny models: random weights without compiling an initializer
(seconds saved per test module), dotted config overrides, and a scoped compilation cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from catjax import models, sampling


def noisy_params(params: models.Params, rng: jax.Array) -> models.Params:
    """`params` plus noise everywhere, norms and (zero-initialised) biases included, so that a
    weight read from the wrong place shows in a comparison."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys, strict=True)])


def forward_rows(cfg: models.ModelConfig, params: models.Params,
                 seqs: list[list[int]]) -> np.ndarray:
    """float32 logits [len(seqs), longest, V] of each token list, right-padded into one batch:
    one program for rows of every length (a causal pass: the padding after a row's end changes
    nothing before it), where a forward pass per row compiles once per length."""
    tokens, _ = sampling.pad_prompts(seqs, 0, max(map(len, seqs)))
    return np.asarray(models.forward(cfg, params, jnp.asarray(tokens)))


def numpy_params(cfg: models.ModelConfig, seed: int = 0) -> models.Params:
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.02, shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, models.param_shapes(cfg),
                                            is_leaf=lambda x: isinstance(x, tuple))


def override(config: Any, changes: dict[str, Any]) -> Any:
    """Set dotted fields (`"round.max_new_tokens": 4`) of a ConfigDict; returns it."""
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@contextlib.contextmanager
def compile_cache(path: Path) -> Iterator[None]:
    """JAX's persistent compilation cache in `path`, for this block only."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(path))
    jax.config.update(names[1], 0.0)
    cc.reset_cache()
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()
