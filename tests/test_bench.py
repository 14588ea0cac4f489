"""The benchmarks' own arithmetic: the FLOP count behind the MFU figures (bench/ours.py), the
collective traffic of the TPU compile checks and the CPU profile's kernel labels."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _bench_module(name: str):
    """bench/<name>.py, imported (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(_BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ours = _bench_module("ours")


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
    fsdp = _bench_module("tpu_aot_fsdp")
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


def test_cpu_profile_names_each_kernel_by_the_einsums_it_runs():
    prof = _bench_module("cpu_profile")
    # As in the sampler's prefill: a query projection and its norm in one kernel, which XLA names
    # after the norm's reduction; a kernel without a dot; a while loop.
    hlo = """
%fused_computation.79 (param_0: f32[512,256], param_1: f32[256,256]) -> f32[4,128,8,32] {
  %dot.324 = f32[512,256]{1,0} dot(%param_0, %param_1), metadata={op_name="s/btd,dnh->btnh/dot_general"}
  ROOT %reduce_sum.481 = f32[4,128,8]{2,1,0} reduce(%dot.324, %c), metadata={op_name="s/reduce_sum"}
}

ENTRY %main.2 (x.1: f32[512,256], w.1: f32[256,256]) -> f32[4,128,8,32] {
  %ynn_fusion.79 = f32[4,128,8,32] fusion(%x, %w), calls=%fused_computation.79, metadata={op_name="s/sum"}
  %slice_fusion = f32[4,64]{1,0} fusion(%ynn_fusion.79), calls=%sliced, metadata={op_name="s/slice"}
  %while.19 = (s32[], f32[8]) while(%t), condition=%cond, body=%body
}
"""
    labels = prof.parse_hlo(hlo)
    assert labels["ynn_fusion.79"] == "btd,dnh->btnh f32[512,256]"
    assert labels["slice_fusion"] == "s/slice (fusion)"
    assert labels["while.19"] == "while (control)"

    def f(x, w):  # the same from XLA:CPU itself
        y = jnp.einsum("td,df->tf", x, w)
        return y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6)

    compiled = jax.jit(f).lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
    assert "td,df->tf f32[64,48]" in prof.parse_hlo(compiled).values()
