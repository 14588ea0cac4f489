"""The sampler with its batch split over a 4-device data mesh equals the single-device result."""

import textwrap

from tests.devices import run_on_devices

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from catjax import models, parallel, sampling
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    kw = dict(num_samples=2, max_new_tokens=12, rng=jax.random.key(3), temperature=0.9,
              top_p=0.9, stop_ids=(3,), logprobs=True)
    single = sampling.sample(cfg, params, prompts, **kw)
    mesh = parallel.make_mesh()
    assert mesh.shape["data"] == 4
    sharded = sampling.sample(cfg, jax.device_put(params, parallel.replicated(mesh)), prompts,
                              mesh=mesh, **kw)
    assert sharded.tokens.shape == single.tokens.shape == (6, 12)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)
    print("OK")
""")


def test_sampling_on_a_data_mesh_matches_one_device():
    run_on_devices(SCRIPT, 4, timeout=300)
