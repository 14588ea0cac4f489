"""The update's memory-saving paths compute the plain update: chunked log-probs, micro-batches
(the anchor's pass included), float32 gradient accumulation for bf16 parameters."""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from catjax import models
from catjax.rl import trainer
from tests.devices import run_on_devices

CFG = models.get_preset("tiny_qwen3")
R, P, N = 8, 8, 10  # 10 completion tokens: chunks of 3 leave a remainder, chunks of 5 do not


def _batch(r: int = R, n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (r, P + n)).astype(np.int32)
    return dict(tokens=tokens, targets=tokens[:, P:],
                positions=np.broadcast_to(np.arange(P + n), (r, P + n)).astype(np.int32),
                key_mask=np.ones((r, P + n), bool),
                pred_index=np.broadcast_to(np.arange(P - 1, P + n - 1), (r, n)).astype(np.int32),
                mask=(np.arange(n)[None] < rng.integers(2, n + 1, (r, 1))).astype(np.float32),
                rewards=rng.integers(0, 2, r).astype(np.float32))


def _capture() -> optax.GradientTransformation:
    """Passes the gradients on and keeps them as its state: what `opt.update` was given."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, state, params=None: (g, g))


OPT = optax.chain(_capture(), optax.sgd(0.1))


def _step(dtype: str, **rl):
    cfg = CFG.replace(dtype=dtype)
    fresh = lambda seed: jax.tree.map(lambda x: jnp.array(x, dtype),  # a copy: params are donated
                                      models.init_params(CFG, jax.random.key(seed)))
    params, anchor = fresh(0), fresh(1)
    new, state, mets = trainer.train_step(cfg, params, OPT.init(params), anchor, _batch(),
                                          rl=trainer.RLConfig(num_rollouts=4, **rl), opt=OPT)
    new, grads, mets = jax.device_get((new, state[0], mets))
    return new, grads, {k: float(s) / max(float(c), 1e-9) for k, (s, c) in mets.items()}


def test_chunked_logprobs_equal_unchunked_values_and_gradients():
    params = models.init_params(CFG, jax.random.key(0))
    batch = _batch()
    w = jax.random.normal(jax.random.key(1), (R, N))

    @functools.partial(jax.jit, static_argnums=1)
    def value_and_grad(p, chunk):
        def f(p):
            lp, ent = trainer.completion_logprobs(CFG, p, batch, chunk)
            return jnp.sum(lp * w) + jnp.sum(ent * w[::-1]), (lp, ent)
        return jax.value_and_grad(f, has_aux=True)(p)

    (_, (lp0, ent0)), g0 = value_and_grad(params, 0)
    assert lp0.shape == ent0.shape == (R, N) and lp0.dtype == ent0.dtype == jnp.float32
    for chunk in (3, 5):
        (_, (lp, ent)), g = value_and_grad(params, chunk)
        np.testing.assert_allclose(lp, lp0, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ent, ent0, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.fixture(scope="module")
def f32_whole():
    return _step("float32", logprob_chunk=0)


def test_micro_batched_chunked_update_equals_the_whole_batch_update(f32_whole):
    """Two micro-batches (the anchor's pass too), chunks of 3 of 10 tokens == one pass."""
    params0, grads0, mets0 = f32_whole
    params, grads, mets = _step("float32", micro_batch=4, logprob_chunk=3)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, params0)
    assert mets.keys() == mets0.keys()
    for k in mets:
        np.testing.assert_allclose(mets[k], mets0[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bf16_update_matches_float32(f32_whole):
    _, grads32, mets32 = f32_whole
    params, grads, mets = _step("bfloat16", micro_batch=4, logprob_chunk=3)
    assert {x.dtype for x in jax.tree.leaves((params, grads))} == {jnp.dtype(jnp.bfloat16)}
    assert mets["skipped"] == 0.0
    # A bf16 forward and backward pass rounds by 2**-8 per operation: the gradients of this
    # 2-layer model come out 3.7-4.8% off float32 (every leaf alike); a lost gradient term or a
    # wrong scale would be off by tens of percent.
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32), strict=True):
        a = np.asarray(a, np.float32)
        assert np.linalg.norm(a - b) <= 0.07 * np.linalg.norm(b)
    for k in ("loss", "entropy", "kl_ref", "grad_norm", "logprob_gap"):
        np.testing.assert_allclose(mets[k], mets32[k], rtol=0.02, atol=1e-4, err_msg=k)


def test_bf16_gradients_accumulate_in_float32():
    """The micro-batch scan carries a float32 gradient sum for bf16 parameters."""
    cfg = CFG.replace(dtype="bfloat16")
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch())
    jaxpr = trainer.train_step.trace(cfg, params, jax.eval_shape(OPT.init, params), params, batch,
                                     rl=trainer.RLConfig(num_rollouts=4, micro_batch=4),
                                     opt=OPT).jaxpr

    def carries(jaxpr):  # the carry types of every scan, nested ones included
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                n = eqn.params["num_consts"]
                yield [v.aval for v in eqn.invars[n:n + eqn.params["num_carry"]]]
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from carries(sub)

    embed = params["embed"].shape
    found = [[a.dtype for a in c if a.shape == embed] for c in carries(jaxpr.jaxpr)]
    assert [jnp.dtype(jnp.float32)] in found, found


def test_update_memory_scales_with_the_micro_batch_and_the_chunk():
    """XLA's temporaries: 4x the rows at the same micro-batch cost nothing more (the anchor's
    pass is micro-batched too); chunked logits save at least one micro-batch's whole logits."""
    cfg = CFG.replace(vocab_size=4096)
    params = models.abstract_params(cfg)
    opt = optax.adamw(1e-2)
    state = jax.eval_shape(opt.init, params)

    def temp(rows: int, chunk: int) -> int:
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(rows, 256))
        rl = trainer.RLConfig(num_rollouts=4, micro_batch=2, logprob_chunk=chunk)
        lowered = trainer.train_step.lower(cfg, params, state, params, batch, rl=rl, opt=opt)
        # LLVM's optimisation level does not change buffer assignment; level 0 compiles faster.
        compiled = lowered.compile({"xla_backend_optimization_level": 0})
        return compiled.memory_analysis().temp_size_in_bytes

    small, big, whole = temp(8, 32), temp(32, 32), temp(8, 0)
    assert big <= 1.1 * small, (small, big)
    logits_bytes = 2 * 256 * cfg.vocab_size * 4  # [micro-batch, N, V] float32
    assert whole - small >= logits_bytes, (small, whole)


def test_without_a_kl_term_the_anchor_is_never_read():
    """kl_mode='none' skips the anchor's forward pass: a NaN anchor changes nothing."""
    cfg = CFG
    rl = trainer.RLConfig(num_rollouts=4, kl_mode="none")
    runs = []
    for poison in (False, True):
        params = models.init_params(CFG, jax.random.key(0))
        anchor = models.init_params(CFG, jax.random.key(1))
        if poison:
            anchor = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), anchor)
        new, _, mets = trainer.train_step(cfg, params, OPT.init(params), anchor, _batch(), rl=rl,
                                          opt=OPT)
        runs.append(jax.device_get((new, mets)))
    jax.tree.map(np.testing.assert_array_equal, runs[0][0], runs[1][0])
    assert float(runs[1][1]["skipped"][0]) == 0.0 and "kl_ref" not in runs[1][1]
    assert [float(x) for x in runs[1][1]["kl"]] == [0.0, 0.0]  # no reference, no "kl"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_rewards_while_the_policy_is_the_anchor_give_no_update(dtype):
    """The first step of a run: the policy is the anchor. Its behaviour log-probs and the
    anchor's come from one computation, so the KL is exactly 0 and a tied group gets no
    advantage even with tied_groups="kl" (round-off between the sampler's kernels and the
    trainer's, z-scored, used to give such groups updates of full size)."""
    batch = _batch()
    batch["rewards"] = np.ones_like(batch["rewards"])
    cfg = CFG.replace(dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), models.init_params(CFG, jax.random.key(0)))
    anchor = jax.tree.map(jnp.copy, params)
    _, state, mets = trainer.train_step(cfg, params, OPT.init(params), anchor, batch, opt=OPT,
                                        rl=trainer.RLConfig(num_rollouts=4, kl_mode="reward",
                                                            tied_groups="kl", temperature=0.7))
    grads, mets = jax.device_get((state[0], mets))
    assert all(bool(np.all(g == 0.0)) for g in jax.tree.leaves(grads))
    assert float(mets["kl_ref"][0]) == 0.0 and float(mets["kl_ref"][1]) == batch["mask"].sum()


def test_one_iteration_reads_its_own_log_probs():
    """Without a reward-level KL, a single iteration's ratio is exactly 1 (its old log-probs are
    its own, no extra pass) and the loss-level KL is reported as kl_ref."""
    params = models.init_params(CFG, jax.random.key(0))
    anchor = models.init_params(CFG, jax.random.key(1))
    _, _, mets = trainer.train_step(CFG, params, OPT.init(params), anchor, _batch(), opt=OPT,
                                    rl=trainer.RLConfig(num_rollouts=4, kl_mode="loss"))
    mets = {k: float(s) / float(c) for k, (s, c) in jax.device_get(mets).items()}
    assert mets["ratio_mean"] == 1.0 and mets["clip_frac"] == 0.0 and mets["logprob_gap"] == 0.0
    assert mets["kl_ref"] == mets["kl"] > 0


@pytest.mark.parametrize("tied_groups", ["zero", "kl"])
def test_tied_rewards_with_reward_level_kl(tied_groups):
    """Every rollout right: the reward-level KL differs per row. tied_groups="zero": no advantage,
    no gradient; "kl" (verl's): the z-scored KL ranks the rollouts, a full-size update."""
    batch = _batch()
    batch["rewards"] = np.ones_like(batch["rewards"])
    assert (batch["mask"] == 0).any()  # padded slots: left out of the KL
    params = models.init_params(CFG, jax.random.key(0))
    anchor = models.init_params(CFG, jax.random.key(1))  # a real KL: the policy is not the anchor
    _, state, mets = trainer.train_step(CFG, params, OPT.init(params), anchor, batch, opt=OPT,
                                        rl=trainer.RLConfig(num_rollouts=4, kl_mode="reward",
                                                            tied_groups=tied_groups))
    grads, mets = jax.device_get((state[0], mets))
    zero = [bool(np.all(g == 0.0)) for g in jax.tree.leaves(grads)]
    assert all(zero) if tied_groups == "zero" else not any(zero)
    kl_sum, kl_count = (float(x) for x in mets["kl_ref"])
    assert np.isfinite(kl_sum) and kl_sum > 0 and kl_count == batch["mask"].sum()


def test_the_update_scores_the_distribution_the_sampler_drew_from():
    """At the sampling temperature (no top-k/p), the update's log-probs of the rollouts are the
    sampler's; at temperature 1 they are not (what the update used to score)."""
    from catjax import sampling
    from catjax.cat import round as cat_round

    params = models.init_params(CFG, jax.random.key(0))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    out = sampling.sample(CFG, params, prompts, num_samples=2, max_new_tokens=6,
                          rng=jax.random.key(3), temperature=0.5, stop_ids=(), pad_id=0,
                          logprobs=True)
    batch = trainer.build_batch(cat_round.RoundResult(out, prompts, np.zeros(4, np.float32), [], {}),
                                2, pad_id=0)
    sampled = np.asarray(out.logprobs)
    at_t, _ = trainer.completion_logprobs(CFG, params, batch, temperature=0.5)
    at_1, _ = trainer.completion_logprobs(CFG, params, batch)
    np.testing.assert_allclose(np.asarray(at_t), sampled, atol=2e-4)
    assert np.abs(np.asarray(at_1) - sampled).max() > 0.1


# 16 rows of 16 + 8 tokens split over the mesh's data-parallel devices, and an optimizer.
_BATCH = """
    r, p, n = 16, 16, 8
    rng = np.random.default_rng(0)
    batch = dict(tokens=rng.integers(1, 500, (r, p + n)).astype(np.int32),
                 positions=np.broadcast_to(np.arange(p + n), (r, p + n)).astype(np.int32),
                 key_mask=np.ones((r, p + n), bool),
                 pred_index=(p - 1 + np.broadcast_to(np.arange(n), (r, n))).astype(np.int32),
                 targets=rng.integers(1, 500, (r, n)).astype(np.int32),
                 mask=np.ones((r, n), np.float32), rewards=rng.random(r).astype(np.float32))
    batch = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    opt = optax.adamw(1e-3)
"""

MESH = textwrap.dedent("""
    import jax, numpy as np, optax
    from catjax import hlo, models, parallel
    from catjax.rl import trainer
    cfg = models.get_preset("tiny_qwen3", vocab_size=512)
    mesh = parallel.make_mesh()
    params = jax.device_put(models.init_params(cfg, jax.random.key(0)), parallel.replicated(mesh))
""" + _BATCH + """
    for micro_batch in (0, 4):  # whole, and micro-batches (each spread over the 4 devices)
        rl = trainer.RLConfig(num_rollouts=8, logprob_chunk=4, micro_batch=micro_batch)
        text = trainer.train_step.lower(cfg, params, opt.init(params), params, batch, rl=rl,
                                       opt=opt, mesh=mesh).compile().as_text()
        moved = hlo.collectives(text)
        # Rows stay on their device: what moves is the gradients' sum (combined into a few
        # all-reduces) and scalars (the loss's normalisers, a group's statistics). Contiguous
        # micro-batches once gathered the whole batch to every device instead.
        assert {op for _, op in moved} == {"all-reduce"}, (micro_batch, sorted(set(moved)))
        assert any("f32[512,64]" in shape for shape, _ in moved)  # the embedding's gradient
    # A micro-batch that cannot spread over the devices is refused at start-up, in one line.
    import tempfile
    from configs import cat_rl
    config = cat_rl.get_config("model=tiny,runlocal")
    config.mesh.update(data=4, fsdp=1)
    config.rl.micro_batch = 2
    try:
        trainer.train(config, tempfile.mkdtemp())
        raise AssertionError("micro_batch=2 on 4 devices was accepted")
    except ValueError as e:
        assert "micro_batch=2 is not a multiple of the mesh's 4" in str(e), e
    print("OK")
""")


def test_on_a_data_mesh_only_gradients_and_scalars_move():
    run_on_devices(MESH, 4, timeout=300)


FSDP = textwrap.dedent(r"""
    import re
    import jax, numpy as np, optax
    from catjax import hlo, models, parallel
    from catjax.rl import trainer
    cfg = models.get_preset("tiny_qwen3", vocab_size=512)
    mesh = parallel.make_mesh(data=1, fsdp=4)
    shapes = models.param_shapes(cfg)
    params = jax.device_put(models.init_params(cfg, jax.random.key(0)),
                            parallel.param_shardings(shapes, models.logical_axes(cfg), mesh))
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    # A weight's dimensions, in any order and layout, without the layer axis and 1s.
    weights = {tuple(sorted(d for d in s[i:] if d > 1)) for s in leaves for i in (0, 1)}
""" + _BATCH + r"""
    for micro_batch in (0, 4):
        rl = trainer.RLConfig(num_rollouts=8, logprob_chunk=4, micro_batch=micro_batch)
        text = trainer.train_step.lower(cfg, params, opt.init(params), params, batch, rl=rl,
                                       opt=opt, mesh=mesh).compile().as_text()
        # FSDP proper: each layer's weights are gathered and their gradients summed back; the
        # rows' activations stay on their device. Left to GSPMD, it kept the weights sharded and
        # all-reduced every row's activations instead, layer by layer (and the logits).
        for shape, op in hlo.collectives(text):
            if op.startswith("all-to-all"):
                continue  # the embedding lookup's [rows, T, D / 4] pieces, once
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
                got = tuple(sorted(int(d) for d in dims.split(",") if d and int(d) > 1))
                # Token ids and positions (int32, [rows, T]) and scalars may move; activations not.
                small = not dtype.startswith(("f", "bf")) or np.prod(got) <= r
                assert got in weights or small, (micro_batch, shape, op)
    print("OK")
""")


def test_on_an_fsdp_mesh_weights_move_and_rows_stay():
    run_on_devices(FSDP, 4, timeout=300)
