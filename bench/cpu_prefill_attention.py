"""The prefill's attention on a CPU, piece by piece, and the variants that did not help.

    .venv/bin/python bench/cpu_prefill_attention.py [--rounds 30] [--keys 896]

One chunk of the tiny synthesis task's prefill (`models.prefill`, chunks of 128): 4 prompts, 128
query positions, 8 query heads over 4 kv heads of 32, float32, the chunk's keys the ones before
it and its own (896 for the last chunk of an 813-token prompt). Times, one jit each and
alternating round after round: the whole `decoder._attend` and its pieces (the score matmul,
the softmax, the value matmul), then the variants measured against it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from catjax import models  # noqa: E402
from catjax.models import decoder  # noqa: E402

B, T, N, K, H = 4, 128, 8, 4, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--keys", type=int, default=896)
    args = ap.parse_args()
    cfg = models.get_preset("tiny_qwen3", vocab_size=49152)
    s, start = args.keys, args.keys - T
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k, v = arr(B, T, N, H), arr(B, K, s, H), arr(B, K, s, H)
    q_rows, scores = arr(B, K, N // K * T, H), arr(B, K, N // K * T, s)
    pos = jnp.broadcast_to(jnp.arange(start, start + T), (B, T))
    mask = decoder._attention_mask(cfg, pos, jnp.broadcast_to(jnp.arange(s), (B, s)),
                                   jnp.ones((B, s), bool), False)
    mask_rows = jnp.broadcast_to(mask[:, None, None], (B, 1, N // K, T, s)).reshape(B, 1, -1, s)

    def grouped(q):  # [B, T, N, H] -> [B, K, G*T, H], as `_attend` lays out the queries
        return q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, H)

    def ungrouped(o):
        return o.reshape(B, K, N // K, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)

    def sub_blocks(q, k, v, nb):  # query blocks of T / nb rows, each over its causal prefix
        c, outs = T // nb, []
        for j in range(nb):
            end = start + (j + 1) * c
            outs.append(decoder._attend(cfg, q[:, j * c:(j + 1) * c], k[:, :, :end],
                                        v[:, :, :end], mask[:, j * c:(j + 1) * c, :end]))
        return jnp.concatenate(outs, 1)

    def normalised_after(q, k, v, barrier):  # exp, value matmul, then divide by the sum
        sc = jnp.einsum("bkrh,bksh->bkrs", grouped(q), k) * cfg.attn_scale
        sc = jnp.where(mask_rows, sc, decoder._NEG_INF)
        e = jnp.exp(sc - jnp.max(sc, -1, keepdims=True))
        den = jnp.sum(e, -1, keepdims=True)
        e = jax.lax.optimization_barrier(e) if barrier else e
        return ungrouped(jnp.einsum("bkrs,bksh->bkrh", e, v) / den)

    full = dict(q=q, k=k, v=v)
    cases = {
        "_attend (the prefill's)": (lambda q, k, v: decoder._attend(cfg, q, k, v, mask), full),
        "  score matmul": (lambda q, k: jnp.einsum("bkrh,bksh->bkrs", q, k),
                           dict(q=q_rows, k=k)),
        "  softmax": (lambda x: jax.nn.softmax(x, -1), dict(x=scores)),
        "  value matmul": (lambda p, v: jnp.einsum("bkrs,bksh->bkrh", p, v),
                           dict(p=scores, v=v)),
        "  copy of the scores (x + 1)": (lambda x: x + 1.0, dict(x=scores)),
        "query blocks of 64": (lambda q, k, v: sub_blocks(q, k, v, 2), full),
        "query blocks of 32": (lambda q, k, v: sub_blocks(q, k, v, 4), full),
        "normalised after the value matmul": (
            lambda q, k, v: normalised_after(q, k, v, False), full),
        "  + barrier before the value matmul": (
            lambda q, k, v: normalised_after(q, k, v, True), full),
    }
    jitted = {name: (jax.jit(fn), xs) for name, (fn, xs) in cases.items()}
    ref = jitted["_attend (the prefill's)"][0](**full)
    for name, (fn, xs) in jitted.items():
        out = jax.block_until_ready(fn(**xs))
        if xs is full:
            print(f"{name}: max |diff| to _attend {float(jnp.abs(out - ref).max()):.1e}")
    times: dict = {name: [] for name in jitted}
    for _ in range(args.rounds):
        for name, (fn, xs) in jitted.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(**xs))
            times[name].append(time.perf_counter() - t0)
    flops = 2 * 2 * B * N * T * s * H
    print(f"one chunk: {B} prompts x {T} queries x {s} keys, {N} heads of {H}: "
          f"{flops / 1e9:.3f} GFLOP in its two matmuls")
    for name, ts in times.items():
        med = np.median(ts)
        extra = f"  {flops / med / 1e9:5.1f} GFLOP/s" if cases[name][1] is full else ""
        print(f"{name:38s} median {1e3 * med:6.2f} ms  [{1e3 * min(ts):.2f}-"
              f"{1e3 * max(ts):.2f}]{extra}")


if __name__ == "__main__":
    main()
