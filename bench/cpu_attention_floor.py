"""The decode step's attention over a long shared prompt on a CPU, against reading its keys.

    .venv/bin/python bench/cpu_attention_floor.py [--rounds 40]

Shapes of the tiny synthesis task (bench/workload.py): 4 prompts of 1024 slots, 4 layers, 4 kv
heads with 2 query heads each, head_dim 32, float32. Times, in one jit each and alternating
round after round: the score matmul (keys [H, S] as `models.SharedPromptCache` holds them, and
[S, H]), the softmax, the PV matmul, one matmul for all layers, and a plain sum over the same
keys: the floor for anything that reads them once.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

B, K, M, H, S, L = 4, 4, 2, 32, 1024, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k_hs, k_sh, v, p = (arr(L, B, K, M, H), arr(L, B, K, H, S), arr(L, B, K, S, H),
                           arr(L, B, K, S, H), arr(L, B, K, M, S))

    def per_layer(fn):
        return lambda *xs: jnp.stack([fn(*(x[i] for x in xs)) for i in range(L)])

    cases = {
        "scores, keys [H, S]": (per_layer(lambda a, b: jnp.einsum("bkmh,bkhs->bkms", a, b)),
                                (q, k_hs)),
        "scores, keys [S, H]": (per_layer(lambda a, b: jnp.einsum("bkmh,bksh->bkms", a, b)),
                                (q, k_sh)),
        "softmax": (per_layer(lambda a: jax.nn.softmax(a, -1)), (p,)),
        "PV": (per_layer(lambda a, b: jnp.einsum("bkms,bksh->bkmh", a, b)), (p, v)),
        "scores, all layers in one matmul": (
            lambda a, b: jnp.einsum("lbkmh,lbkhs->lbkms", a, b), (q, k_hs)),
        "sum over the keys (the read floor)": (per_layer(jnp.sum), (k_hs,)),
    }
    jitted = {name: (jax.jit(fn), xs) for name, (fn, xs) in cases.items()}
    for fn, xs in jitted.values():
        jax.block_until_ready(fn(*xs))
    times: dict = {name: [] for name in jitted}
    for _ in range(args.rounds):
        for name, (fn, xs) in jitted.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times[name].append(time.perf_counter() - t0)
    mb = k_hs.nbytes / 1e6
    print(f"{L} layers x [{B}, {K}, {H}, {S}] float32 keys: {mb:.1f} MB")
    for name, ts in times.items():
        print(f"{name:36s} median {1e3 * np.median(ts):.3f} ms  [{1e3 * min(ts):.3f}-"
              f"{1e3 * max(ts):.3f}]")


if __name__ == "__main__":
    main()
