"""Decode attention as one Pallas (Triton) kernel a layer, for GPUs.

A decode step's attention in XLA ops reads every slot of the cache (two GEMMs over all P + N
slots, masks, a softmax and their small kernels), though a row at step t needs only its first
prompt_len + t + 1 slots. This kernel reads just those: program (row, kv head, split) walks its
share of the row's live slots in blocks with a running softmax (flash decoding). Splits are
there to fill the GPU when rows x kv heads are few: each writes an unnormalised partial, merged
in plain JAX; with one split the kernel writes the attention itself. The cache is read as it
lies ([B, K, S, H], `decoder.KVCache`), so nothing is copied or transposed.

GPUs compile it through Triton. CPUs run it in Pallas's interpreter (for tests; slow). There is
no TPU lowering: `check` says so.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import Mesh, PartitionSpec

from catjax import parallel

_NEG = -1e30  # finite: a split with no live slot keeps m = _NEG, weight exp(_NEG - m) = 0
_MIN_DOT = 16  # Triton's dot needs every dimension >= 16
BLOCK_K = 64  # key slots per block (bf16, head_dim 128: 16 KiB of keys and of values)
TARGET_PROGRAMS = 512  # rows x kv heads x splits to aim for (a few waves of an H100/H200)


def check(head_dim: int, backend: str | None = None) -> None:
    """One-line error when the kernel cannot run here (`decode_attention='pallas'`)."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        raise ValueError("decode_attention='pallas' is a Triton kernel for GPUs; TPUs run 'xla'")
    if not head_dim_fits(head_dim):
        raise ValueError(f"decode_attention='pallas' needs a head_dim that is a power of two "
                         f">= {_MIN_DOT}, not {head_dim}")


def head_dim_fits(head_dim: int) -> bool:
    """Triton's dot takes power-of-two blocks of at least 16."""
    return head_dim >= _MIN_DOT and not head_dim & (head_dim - 1)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def num_splits(rows: int, kv_heads: int, slots: int, block_k: int = BLOCK_K) -> int:
    """Splits per (row, kv head): a power of two, enough programs to fill the GPU, and never
    more than the cache has blocks."""
    cap = min(TARGET_PROGRAMS // max(rows * kv_heads, 1), slots // block_k)
    return 1 << max(cap.bit_length() - 1, 0)  # the largest power of two <= cap, at least 1


def _kernel(start_ref, end_ref, q_ref, k_ref, v_ref, out_ref, *stats_refs, scale: float,
            softcap: float, block_k: int, rows: int, splits: int):
    # Refs of this program: start/end scalars of its row; q [R, H] (R >= rows, rows past
    # `rows` masked); k, v [S, H] of its (row, kv head); out [R, H]. With splits, out is the
    # split's unnormalised sum and `stats_refs` its running max and sum of exponentials [R];
    # without, out is the attention itself.
    r_pad = q_ref.shape[0]
    row_ok = jnp.arange(r_pad) < rows
    start, end = start_ref[()], end_ref[()]
    # This split's share of the live slots [start, end), in whole blocks.
    share = pl.cdiv(pl.cdiv(end - start, splits), block_k) * block_k
    lo = start + pl.program_id(2) * share
    hi = jnp.minimum(lo + share, end)
    q = plgpu.load(q_ref, mask=row_ok[:, None], other=0.0)
    exact = q.dtype == jnp.float32  # no TF32 where the model computes in float32

    def body(i, carry):
        out_rh, max_r, sum_r = carry
        pos = lo + i * block_k
        live = pos + jnp.arange(block_k) < hi
        k = plgpu.load(k_ref.at[pl.ds(pos, block_k), :], mask=live[:, None], other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(pos, block_k), :], mask=live[:, None], other=0.0)
        s = plgpu.dot(q, k.astype(q.dtype), trans_b=True, allow_tf32=not exact) * scale
        if softcap:
            s = jnp.tanh(s / softcap) * softcap
        s = jnp.where(live[None, :], s, _NEG)
        new_max = jnp.maximum(max_r, s.max(axis=1))
        p = jnp.exp(s - new_max[:, None])  # each block's first slot is live: new_max is real
        keep = jnp.exp(max_r - new_max)
        pv = plgpu.dot(p.astype(q.dtype), v.astype(q.dtype), allow_tf32=not exact)
        return out_rh * keep[:, None] + pv, new_max, sum_r * keep + p.sum(axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((r_pad,), _NEG, jnp.float32),
            jnp.zeros((r_pad,), jnp.float32))
    blocks = jnp.maximum(pl.cdiv(hi - lo, block_k), 0)
    out_rh, max_r, sum_r = jax.lax.fori_loop(0, blocks, body, init)
    if not stats_refs:  # one split: its row's whole softmax, normalised here
        out_rh = out_rh / sum_r[:, None]
    plgpu.store(out_ref, out_rh.astype(out_ref.dtype), mask=row_ok[:, None])
    if stats_refs:
        plgpu.store(stats_refs[0], max_r, mask=row_ok)
        plgpu.store(stats_refs[1], sum_r, mask=row_ok)


def decode_attention(q_bkrh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array,
                     start_b: jax.Array, end_b: jax.Array, *, scale: float,
                     softcap: float = 0.0, block_k: int = BLOCK_K, splits: int | None = None,
                     interpret: bool | None = None, num_warps: int = 4,
                     num_stages: int = 2) -> jax.Array:
    """Attention of one query step over slots [start_b, end_b) of each row's cache.

    q [B, K, R, H] (the R query heads of each kv head); k, v [B, K, S, H], any float dtype.
    Returns [B, K, R, H] in q's dtype (summed in float32). `interpret`: Pallas's interpreter
    (default: off GPUs).
    """
    b, kv, rows, h = q_bkrh.shape
    slots = k_bksh.shape[2]
    block_k = max(_MIN_DOT, min(block_k, _pow2_at_least(slots)))
    splits = splits or num_splits(b, kv, slots, block_k)
    r_pad = max(_MIN_DOT, _pow2_at_least(rows))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    # A slot past the cache would be another row's (or past the array): never read one.
    start, end = jnp.maximum(start_b.astype(jnp.int32), 0), jnp.minimum(end_b.astype(jnp.int32), slots)
    kernel = functools.partial(_kernel, scale=float(scale), softcap=float(softcap),
                               block_k=block_k, rows=rows, splits=splits)
    row = pl.BlockSpec((None,), lambda i, k, j: (i,))
    cache = pl.BlockSpec((None, None, slots, h), lambda i, k, j: (i, k, 0, 0))
    part = (b, kv, splits, rows)
    out_specs = [pl.BlockSpec((None, None, None, r_pad, h), lambda i, k, j: (i, k, j, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((*part, h), q_bkrh.dtype if splits == 1 else jnp.float32)]
    if splits > 1:  # each split's running max and sum of exponentials, for the merge
        out_specs += 2 * [pl.BlockSpec((None, None, None, r_pad), lambda i, k, j: (i, k, j, 0))]
        out_shape += 2 * [jax.ShapeDtypeStruct(part, jnp.float32)]
    outs = pl.pallas_call(
        kernel, grid=(b, kv, splits),
        in_specs=[row, row, pl.BlockSpec((None, None, r_pad, h), lambda i, k, j: (i, k, 0, 0)),
                  cache, cache],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="catjax_decode_attention",
    )(start, end, q_bkrh, k_bksh, v_bksh)
    if splits == 1:
        return outs[0][:, :, 0]
    out, top, total = outs
    # The barrier keeps XLA from fusing the max into the merge: JAX's own split-K decode kernel
    # does the same after seeing NaNs from that fusion on GPUs.
    top_max = jax.lax.optimization_barrier(top.max(axis=2, keepdims=True))
    weight = jnp.exp(top - top_max)  # [B, K, splits, R]
    merged = (out * weight[..., None]).sum(2) / (total * weight).sum(2)[..., None]
    return merged.astype(q_bkrh.dtype)


def decode_attention_sharded(q_bkrh, k_bksh, v_bksh, start_b, end_b, mesh: Mesh | None,
                             **kw) -> jax.Array:
    """`decode_attention` on each device's own rows and kv heads: rows split over the
    data-parallel axes, kv heads over "tensor" where it divides them (a custom call is opaque
    to GSPMD, which would otherwise gather the cache)."""
    if mesh is None or mesh.size == 1:
        return decode_attention(q_bkrh, k_bksh, v_bksh, start_b, end_b, **kw)
    heads = "tensor" if q_bkrh.shape[1] % mesh.shape["tensor"] == 0 else None
    rows = parallel.BATCH_AXES if q_bkrh.shape[0] % parallel.data_parallel_size(mesh) == 0 else None
    four, one = PartitionSpec(rows, heads), PartitionSpec(rows)
    return jax.shard_map(functools.partial(decode_attention, **kw), mesh=mesh,
                         in_specs=(four, four, four, one, one), out_specs=four,
                         check_vma=False)(q_bkrh, k_bksh, v_bksh, start_b, end_b)
