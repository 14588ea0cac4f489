"""The Pallas decode-attention kernel: equal to masked softmax attention, interpreted on CPU;
lowers to one Triton call for CUDA that reads the cache as it lies; the sampler's tokens with it
are the XLA path's, on one device and on meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models, sampling
from catjax.models import decode_kernel
from tests.devices import run_on_devices

PROMPTS = [[5, 17, 33], [7, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13], [250, 3, 99, 98, 12]]


def reference(q_bkrh, k_bksh, v_bksh, start_b, end_b, scale, softcap=0.0):
    s = jnp.einsum("bkrh,bksh->bkrs", q_bkrh.astype(jnp.float32), k_bksh.astype(jnp.float32))
    s = s * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    slot = jnp.arange(k_bksh.shape[2])
    live = (slot >= start_b[:, None]) & (slot < end_b[:, None])
    p = jax.nn.softmax(jnp.where(live[:, None, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bkrs,bksh->bkrh", p, v_bksh.astype(jnp.float32))


@pytest.mark.parametrize("shape,splits,softcap", [
    ((3, 2, 2, 200, 32), 1, 0.0),    # slots not a multiple of the block
    ((3, 2, 2, 200, 32), 4, 0.0),    # splits, some of them past a short row's end
    ((2, 1, 5, 96, 16), 2, 30.0),    # 5 query heads a kv head (padded to 16), a softcap
    ((1, 4, 1, 16, 64), None, 0.0),  # one block of 16, splits by the rule
])
def test_kernel_is_masked_softmax_attention(shape, splits, softcap):
    b, k, r, s, h = shape
    rng = np.random.default_rng(sum(shape))
    q, keys, vals = (jnp.asarray(rng.normal(size=x), jnp.float32)
                     for x in ((b, k, r, h), (b, k, s, h), (b, k, s, h)))
    # One live slot; a window inside the cache; the whole cache.
    start = jnp.asarray([0, s // 3, 0][:b], jnp.int32)
    end = jnp.asarray([1, s - 7, s][:b], jnp.int32)
    got = decode_kernel.decode_attention(q, keys, vals, start, end, scale=0.2, softcap=softcap,
                                         splits=splits)
    np.testing.assert_allclose(got, reference(q, keys, vals, start, end, 0.2, softcap),
                               atol=1e-5, rtol=1e-5)
    # A bfloat16 cache under float32 queries reads as its float32 values.
    kb, vb = keys.astype(jnp.bfloat16), vals.astype(jnp.bfloat16)
    got = decode_kernel.decode_attention(q, kb, vb, start, end, scale=0.2, softcap=softcap,
                                         splits=splits)
    np.testing.assert_allclose(got, reference(q, kb, vb, start, end, 0.2, softcap),
                               atol=1e-5, rtol=1e-5)


def test_splits_fill_the_gpu_but_never_outnumber_the_blocks():
    assert decode_kernel.num_splits(64, 8, 320) == 1  # 512 programs already
    assert decode_kernel.num_splits(4, 8, 4096) == 16  # a synthesis: 32 (row, kv head) pairs
    assert decode_kernel.num_splits(4, 8, 200) == 2  # 3 blocks of 64: a power of two below
    assert decode_kernel.num_splits(1, 1, 16) == 1


def test_cuda_lowering_is_one_triton_call_on_the_cache_as_it_lies():
    """Lowered here for CUDA (no GPU needed): the Pallas kernel becomes Triton IR inside one
    custom call whose operands are the cache arrays themselves, [B, K, S, H], not a transposed
    or split copy."""
    b, k, r, s, h = 8, 8, 2, 320, 128
    q = jax.ShapeDtypeStruct((b, k, r, h), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((b, k, s, h), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = jax.jit(lambda *a: decode_kernel.decode_attention(*a, scale=0.1, interpret=False))
    text = fn.trace(q, cache, cache, rows, rows).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 1 and "xla.gpu.triton" in calls[0], calls
    assert calls[0].count(f"tensor<{b}x{k}x{s}x{h}xbf16>") == 2
    assert "stablehlo.transpose" not in text


@pytest.mark.parametrize("preset", ["tiny_qwen3", "tiny_gemma3"])
def test_the_sampler_draws_the_same_tokens_through_the_kernel(preset):
    """Unrolled decode with the kernel against XLA's attention: Gemma 3's sliding layers
    (window 8) see the window move as the 13-token prompt grows by 12 tokens."""
    cfg = models.get_preset(preset)
    params = models.init_params(cfg, jax.random.key(0))
    kw = dict(num_samples=3, max_new_tokens=12, temperature=0.9, top_p=0.95, stop_ids=(3,),
              rng=jax.random.key(5), logprobs=True, decode_layout="unrolled")
    ref = sampling.sample(cfg, params, PROMPTS, decode_attention="xla", **kw)
    out = sampling.sample(cfg, params, PROMPTS, decode_attention="pallas", **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    # 1e-5 interpreted on a CPU; the Triton kernel on an H200 sums in another order (Gemma 3:
    # 7.6e-5 at log-probs near -6). A wrong mask moves them by ~0.1.
    tol = 1e-4 if jax.default_backend() == "gpu" else 1e-5
    np.testing.assert_allclose(np.asarray(out.model_logprobs), np.asarray(ref.model_logprobs),
                               atol=tol)
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))


def test_bad_kernel_settings_are_one_line_errors():
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    kw = dict(max_new_tokens=4, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="decode_attention='triton': expected one of"):
        sampling.sample(cfg, params, PROMPTS, decode_attention="triton", **kw)
    with pytest.raises(ValueError, match="runs in decode_layout='unrolled'.*not 'scan'"):
        sampling.sample(cfg, params, PROMPTS, decode_attention="pallas", decode_layout="scan",
                        **kw)
    with pytest.raises(ValueError, match="draft_tokens=2 checks several"):
        sampling.sample(cfg, params, PROMPTS, decode_attention="pallas", decode_layout="unrolled",
                        draft_tokens=2, max_new_tokens=4, rng=jax.random.key(0), temperature=0.0)
    odd = cfg.replace(head_dim=24)
    with pytest.raises(ValueError, match="power of two >= 16, not 24"):
        sampling.sample(odd, models.init_params(odd, jax.random.key(0)), PROMPTS,
                        decode_attention="pallas", decode_layout="unrolled", **kw)
    cache = models.init_cache(cfg, 1, 16)
    with pytest.raises(ValueError, match="serves decode steps .one token a row., not 2 tokens"):
        models.hidden_cached(cfg, params, jnp.ones((1, 2), jnp.int32),
                             jnp.arange(2)[None], cache, decode_attention="pallas")
    with pytest.raises(ValueError, match="Triton kernel for GPUs; TPUs run 'xla'"):
        decode_kernel.check(128, backend="tpu")


def test_the_kernel_is_the_default_where_it_runs():
    """GPUs: the "unrolled" layout's steps, one token a row, a power-of-two head_dim; XLA's ops
    for every other layout, for drafted passes, other head sizes and on CPUs and TPUs."""
    cfg = models.get_preset("tiny_qwen3")
    default = sampling.default_decode_attention
    assert default(cfg, "unrolled", backend="gpu") == "pallas"
    assert [default(cfg, k, backend="gpu") for k in sampling.DECODE_LAYOUTS if k != "unrolled"] \
        == ["xla"] * (len(sampling.DECODE_LAYOUTS) - 1)
    assert default(cfg, "unrolled", draft_tokens=4, backend="gpu") == "xla"
    assert default(cfg.replace(head_dim=24), "unrolled", backend="gpu") == "xla"
    assert default(cfg, "unrolled", backend="cpu") == default(cfg, "unrolled", backend="tpu") == "xla"
    assert default(cfg, "unrolled") == ("pallas" if jax.default_backend() == "gpu" else "xla")


MESH = r"""
import jax, numpy as np
from catjax import models, parallel, sampling
cfg = models.get_preset("tiny_gemma3")  # 2 kv heads: split over a tensor axis of 2
params = models.init_params(cfg, jax.random.key(0))
prompts = [[5, 17, 33], [7, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13], [250, 3, 99, 98, 12], [9, 9]]
kw = dict(num_samples=2, max_new_tokens=10, temperature=0.0, stop_ids=(), logprobs=True,
          rng=jax.random.key(1), decode_layout="unrolled")
ref = sampling.sample(cfg, params, prompts, decode_attention="xla", **kw)
for shape in ((4, 1, 1), (2, 1, 2), (1, 2, 2)):
    mesh = parallel.make_mesh(*shape)
    out = sampling.sample(cfg, params, prompts, mesh=mesh, decode_attention="pallas", **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=str(shape))
    np.testing.assert_allclose(np.asarray(out.model_logprobs), np.asarray(ref.model_logprobs),
                               atol=1e-5)
print("OK")
"""


def test_the_kernel_runs_on_each_devices_rows_and_kv_heads():
    run_on_devices(MESH, 4, timeout=400)
