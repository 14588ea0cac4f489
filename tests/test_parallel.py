"""Sharding helpers of `catjax.parallel` outside a mesh."""

from catjax import parallel


def test_fsdp_helpers_leave_arrays_alone_without_an_fsdp_axis():
    import jax.numpy as jnp

    x = jnp.ones((4, 8))
    assert parallel.split_features(x, None) is x
    assert parallel.gathered_over_fsdp({"w": x}, {"w": ("embed", "mlp")}, None)["w"] is x
