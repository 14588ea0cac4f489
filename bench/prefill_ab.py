"""The prefill alone: one pass with query blocks vs `models.prefill` in chunks, one process.

    .venv/bin/python bench/prefill_ab.py --model bench/.models/tiny_qwen3 --real 813 --rounds 5
    .venv/bin/python bench/prefill_ab.py --model bench/.models/tiny_qwen3 --sampler --rounds 9

Four prompts of `--real` tokens right-padded to 1024 slots. "one_pass" is
`hidden_cached(prefill=True, q_chunk=256)` (the sampler's prefill before `models.prefill`);
"chunks_C" is `models.prefill(chunk=C)`, "chunks_C_whole_last" the same with the last layer run
at every position (`whole_last_layer=True`, the prefill before 2026-11-29). The variants
alternate, round after round, so machine drift falls on all alike; prints each variant's largest
difference to one_pass and its times.

`--sampler`: the synthesis task instead (`ours.py --task synthesis`, N=64: 4 anchor syntheses
over G=8 rollouts vs one more rollout each), with the sampler's prefill as it is and with the
whole last layer, two jitted copies of the sampler alternating; prints whether they drew the
same tokens, and the times and ratio of each.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ours  # noqa: E402

from catjax import models, sampling  # noqa: E402
from catjax.cat import round as cat_round  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--real", type=int, default=813, help="real tokens per prompt (<= 1024)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", default="128,256")
    ap.add_argument("--sampler", action="store_true", help="the synthesis task, both prefills")
    args = ap.parse_args()
    m = ours.load(args.model)
    if args.sampler:
        return sampler_ab(m, args.rounds)
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
        for whole in (False, True):
            variants[f"chunks_{c}" + "_whole_last" * whole] = jax.jit(
                lambda params, tokens, lens, c=c, whole=whole: models.prefill(
                    cfg, params, tokens, lens, models.init_cache(cfg, b, p), chunk=c,
                    whole_last_layer=whole))
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
        print(f"{name:20s} median {np.median(ts):.3f} s  [{min(ts):.3f}-{max(ts):.3f}]")


def sampler_ab(m, rounds: int, n: int = 64) -> None:
    g, prompts = 8, ours.question_ids(m)
    rc = cat_round.RoundConfig(num_rollouts=g, max_new_tokens=n, synthesis_max_new_tokens=n)
    out = sampling.sample(m.cfg, m.params, prompts, num_samples=g, max_new_tokens=n,
                          rng=jax.random.key(0), temperature=1.0, stop_ids=(),
                          pad_id=m.tokenizer.pad_id, logprobs=False)
    texts = [m.tokenizer.decode(ids) for ids in sampling.completions(out)]
    budget = cat_round.prompt_budget(m.cfg, n)
    syn = [cat_round.synthesis_prompt(m.tokenizer, texts[i * g:(i + 1) * g], "math", rc, budget,
                                      m.cfg)[0] for i in range(len(prompts))]
    tasks = {"synthesis": (syn, 0.0), "rollout": (prompts, 1.0)}
    kw = dict(num_samples=1, max_new_tokens=n, stop_ids=(), pad_id=m.tokenizer.pad_id,
              logprobs=False)
    # Two jits of one function object share JAX's trace cache: each variant traces a copy, with
    # `models.prefill` swapped while it traces.
    fn_jit, prefill = sampling._sample, models.prefill
    fn = fn_jit.__wrapped__
    jits = {}
    for name, pf in (("trimmed", prefill),
                     ("whole_last", functools.partial(prefill, whole_last_layer=True))):
        jits[name] = jax.jit(types.FunctionType(fn.__code__, fn.__globals__, fn.__name__,
                                                fn.__defaults__, fn.__closure__),
                             static_argnames=sampling._STATIC_ARGNAMES)
        models.prefill, sampling._sample = pf, jits[name]
        for pr, temp in tasks.values():
            jax.block_until_ready(sampling.sample(m.cfg, m.params, pr, rng=jax.random.key(1),
                                                  temperature=temp, **kw))
    models.prefill = prefill
    compiled = {v: j._cache_size() for v, j in jits.items()}
    times = {(v, t): [] for v in jits for t in tasks}
    tokens = {}
    for r in range(rounds):
        for v, j in jits.items():
            sampling._sample = j
            for t, (pr, temp) in tasks.items():
                t0 = time.perf_counter()
                o = jax.block_until_ready(sampling.sample(m.cfg, m.params, pr, rng=jax.random.key(r),
                                                          temperature=temp, **kw))
                times[(v, t)].append(time.perf_counter() - t0)
                tokens.setdefault((t, r), []).append(np.asarray(o.tokens))
    sampling._sample = fn_jit
    # A trace during the rounds would have used the prefill in place then, not its variant's.
    if {v: j._cache_size() for v, j in jits.items()} != compiled:
        sys.exit("prefill_ab: a variant traced again while timed; its figures are not its own")
    print("same tokens:", all(np.array_equal(*pair) for pair in tokens.values()))
    for v in jits:
        syn_t, roll_t = times[(v, "synthesis")], times[(v, "rollout")]
        print(f"{v:10s} synthesis {np.median(syn_t):.3f} s [{min(syn_t):.3f}-{max(syn_t):.3f}]  "
              f"one more rollout {np.median(roll_t):.3f} s [{min(roll_t):.3f}-{max(roll_t):.3f}]  "
              f"ratio {np.median(syn_t) / np.median(roll_t):.2f}x")


if __name__ == "__main__":
    main()
