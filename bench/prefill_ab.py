"""The prefill alone: one pass with query blocks vs `models.prefill` in chunks, one process.

    .venv/bin/python bench/prefill_ab.py --model bench/.models/tiny_qwen3 --real 813 --rounds 5

Four prompts of `--real` tokens right-padded to 1024 slots. "one_pass" is
`hidden_cached(prefill=True, q_chunk=256)` (the sampler's prefill before `models.prefill`);
"chunks_C" is `models.prefill(chunk=C)`. The variants alternate, round after round, so machine
drift falls on all alike; prints each variant's largest difference to one_pass and its times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ours  # noqa: E402

from catjax import models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--real", type=int, default=813, help="real tokens per prompt (<= 1024)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", default="128,256")
    args = ap.parse_args()
    m = ours.load(args.model)
    cfg, params = m.cfg, m.params
    b, p = 4, 1024
    tokens = jax.random.randint(jax.random.key(0), (b, p), 0, cfg.vocab_size)
    lens = jnp.full((b,), args.real, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))

    @jax.jit
    def one_pass(params, tokens, lens):
        x, cache = models.hidden_cached(cfg, params, tokens, positions, models.init_cache(cfg, b, p),
                                        q_chunk=256, prefill=True)
        return jnp.take_along_axis(x, (lens - 1)[:, None, None], axis=1)[:, 0], cache

    variants = {"one_pass": one_pass}
    for c in (int(x) for x in args.chunks.split(",")):
        variants[f"chunks_{c}"] = jax.jit(lambda params, tokens, lens, c=c: models.prefill(
            cfg, params, tokens, lens, models.init_cache(cfg, b, p), chunk=c))
    ref = None
    for name, fn in variants.items():
        last, _ = jax.block_until_ready(fn(params, tokens, lens))
        ref = last if ref is None else ref
        print(f"{name}: max |last hidden - one_pass| {float(jnp.abs(last - ref).max()):.2e}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, tokens, lens))
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:10s} median {np.median(ts):.3f} s  [{min(ts):.3f}-{max(ts):.3f}]")


if __name__ == "__main__":
    main()
