"""The sampler with its batch split over a 4-device data mesh equals the single-device result,
and its compiled program moves no rows between devices."""

import textwrap

from tests.devices import run_on_devices

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from catjax import hlo, models, parallel, sampling
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    kw = dict(num_samples=2, max_new_tokens=12, rng=jax.random.key(3), stop_ids=(3,),
              logprobs=True)
    mesh = parallel.make_mesh()
    assert mesh.shape["data"] == 4
    on_mesh = jax.device_put(params, parallel.replicated(mesh))
    calls = []
    program = sampling._sample
    sampling._sample = lambda *a, **k: calls.append((a, k)) or program(*a, **k)
    cases = [("scan", dict(temperature=0.9, top_p=0.9), True),
             ("weights_first", dict(temperature=0.9, top_p=0.9), True),
             ("rows_first", dict(temperature=0.9, top_p=0.9), True),
             ("unrolled", dict(temperature=0.9, top_p=0.9), True),
             # A paper config's truncation, with the accelerators' blocked top-k.
             ("scan", dict(temperature=0.7, top_k=20, top_p=0.8), False)]
    for layout, sp, cpu in cases:
        sampling._on_cpu = lambda cpu=cpu: cpu
        single = sampling.sample(cfg, params, prompts, **sp, **kw)
        sharded = sampling.sample(cfg, on_mesh, prompts, mesh=mesh, decode_layout=layout, **sp,
                                  **kw)
        assert sharded.tokens.shape == single.tokens.shape == (6, 12)
        np.testing.assert_array_equal(sharded.tokens, single.tokens)
        np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)
        # Rows stay on their device: the one collective is the prefill's scalar "any prompt
        # still running" (the cache writes and top-k once all-gathered every row's keys and
        # values, and logits, to every device each step).
        text = program.lower(*calls[-1][0], **calls[-1][1]).compile().as_text()
        moved = hlo.collectives(text)
        assert set(moved) <= {("pred[]", "all-reduce")}, (layout, sp, sorted(set(moved)))
    print("OK")
""")


def test_sampling_on_a_data_mesh_matches_one_device_and_keeps_rows_local():
    run_on_devices(SCRIPT, 4, timeout=400)


FSDP = textwrap.dedent(r"""
    import re
    import jax, numpy as np
    from catjax import hlo, models, parallel, sampling
    cfg = models.get_preset("tiny_llama")  # an untied head [D, V]
    params = models.init_params(cfg, jax.random.key(0))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [3, 4]]
    kw = dict(num_samples=2, max_new_tokens=12, rng=jax.random.key(3), stop_ids=(3,),
              logprobs=True, temperature=0.9, top_p=0.9)
    single = sampling.sample(cfg, params, prompts, **kw)
    weights = {tuple(sorted(d for d in s[1:] if d > 1)) for s in
               jax.tree.leaves(models.param_shapes(cfg)["layers"], is_leaf=lambda x: isinstance(x, tuple))}
    weights.add(tuple(sorted((cfg.hidden_size, cfg.vocab_size))))
    calls = []
    program = sampling._sample
    sampling._sample = lambda *a, **k: calls.append((a, k)) or program(*a, **k)
    for dims in ((1, 4, 1), (2, 2, 1), (1, 2, 2)):
        mesh = parallel.make_mesh(*dims)
        shard = parallel.param_shardings(models.param_shapes(cfg), models.logical_axes(cfg), mesh)
        on_mesh = jax.device_put(params, shard)
        for layout in sampling.DECODE_LAYOUTS:
            out = sampling.sample(cfg, on_mesh, prompts, mesh=mesh, decode_layout=layout, **kw)
            np.testing.assert_array_equal(out.tokens, single.tokens)
            np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
            # The weights stay in place while decoding: each step moves a few rows' partial
            # sums, never a weight (gate, up and q/k/v were gathered every step, and the head
            # over a tensor axis) nor, without a tensor axis, a row's logits over the vocabulary
            # (the head is gathered once, before the loop; split over a tensor axis, the logits
            # are what moves).
            text = program.lower(*calls[-1][0], **calls[-1][1]).compile().as_text()
            for shape, op in hlo.collectives(text, in_loops=True):
                for dims_ in re.findall(r"\[([\d,]*)\]", shape):
                    got = [int(d) for d in dims_.split(",") if d]
                    assert dims[2] > 1 or cfg.vocab_size not in got, (dims, layout, shape, op)
                    assert tuple(sorted(d for d in got if d > 1)) not in weights, (dims, layout, shape, op)
    print("OK")
""")


def test_sampling_on_an_fsdp_mesh_matches_one_device_and_leaves_the_weights_in_place():
    run_on_devices(FSDP, 4, timeout=400)
