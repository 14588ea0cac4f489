"""The benchmark's FLOP count (bench/ours.py), on which its MFU figures rest."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "ours.py")
_spec = importlib.util.spec_from_file_location("bench_ours", _PATH)
ours = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ours)


def test_matmul_flops_counts_scanned_layers_gradients_and_recompute():
    b, d, layers = 8, 16, 3
    x = jnp.ones((b, d))
    w = jnp.ones((layers, d, d)) * 0.1
    one = 2.0 * b * d * d  # one [b, d] x [d, d] matmul

    def forward(w, x, remat=False):
        body = lambda h, wi: (jnp.tanh(h @ wi), None)  # noqa: E731
        return jax.lax.scan(jax.checkpoint(body) if remat else body, x, w)[0].sum()

    assert ours.matmul_flops(jax.make_jaxpr(forward)(w, x).jaxpr) == layers * one
    # Backward: d(h) and d(w) per layer, on top of the forward.
    grad = jax.make_jaxpr(jax.grad(forward))(w, x).jaxpr
    assert ours.matmul_flops(grad) == 3 * layers * one
    # Rematerialised: the forward matmul runs again in the backward pass.
    grad_remat = jax.make_jaxpr(jax.grad(lambda w, x: forward(w, x, True)))(w, x).jaxpr
    assert ours.matmul_flops(grad_remat) == 4 * layers * one


def test_matmul_flops_counts_batched_contractions():
    q = jnp.ones((2, 4, 5, 8))  # [b, heads, t, h]
    k = jnp.ones((2, 4, 7, 8))
    jaxpr = jax.make_jaxpr(lambda q, k: jnp.einsum("bnth,bnsh->bnts", q, k))(q, k).jaxpr
    assert ours.matmul_flops(jaxpr) == 2.0 * 2 * 4 * 5 * 7 * 8
    assert np.isclose(ours.matmul_flops(jax.make_jaxpr(lambda a: a @ a)(jnp.ones((3, 3))).jaxpr), 54)


def test_fsdp_traffic_counts_each_collective_as_often_as_its_loops_run():
    spec = importlib.util.spec_from_file_location(
        "bench_fsdp", os.path.join(os.path.dirname(_PATH), "tpu_aot_fsdp.py"))
    fsdp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fsdp)
    hlo = """
%inner_cond (t: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(36)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%inner (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = (bf16[32,9728]{1,0}, bf16[32,9728]{1,0}) all-reduce(%a, %b), channel_id=3
}

%outer_cond (t: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(511)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%outer (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %w = (s32[], f32[8]) while(%t), condition=%inner_cond, body=%inner
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %ag = bf16[151936,2560]{1,0} all-gather(%h), dimensions={1}
  %w = (s32[], f32[8]) while(%t), condition=%outer_cond, body=%outer
}
"""
    once, looped, by_shape = fsdp.traffic(hlo)
    assert once == 151936 * 2560 * 2
    assert looped == 511 * 36 * 2 * 32 * 9728 * 2
    assert by_shape[("all-gather", "bf16[151936,2560]")] == once
