"""The sampler with this tree's `models/decode.py` against a git revision's, one process.

    .venv/bin/python bench/decode_ab.py --model bench/.models/tiny_qwen3 --baseline HEAD~1

Both run the weights-first decode loop (the CPU default) on the synthesis task's three shapes:
the 4 anchor syntheses (~800-token prompts in the 1024 bucket, greedy, 64 new tokens), 4 rollouts
(64 new tokens) and 4 prompts x G=8 (128 new tokens). The two variants alternate, round after
round, so machine drift falls on both alike; prints whether they drew the same tokens, then each
case's median and min-max. `--steps`: `decode_step` alone instead, over random caches of those
shapes (one step, 4 layers). The baseline's decode.py is loaded from `git show REV:...` as a
module and swapped in for `models.decode_step` / `init_shared_cache` / `decode_layout`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ours  # noqa: E402
import workload  # noqa: E402

from catjax import models, sampling  # noqa: E402
from catjax.cat import round as cat_round  # noqa: E402

_SWAPPED = ("decode_step", "init_shared_cache", "decode_layout")


def baseline_models(rev: str) -> types.SimpleNamespace:
    """`catjax.models` with the decode loop's functions from `rev`'s models/decode.py."""
    got = subprocess.run(["git", "show", f"{rev}:catjax/models/decode.py"],
                         cwd=os.path.dirname(HERE), capture_output=True, text=True)
    if got.returncode:
        sys.exit(f"decode_ab: --baseline {rev}: {got.stderr.strip().splitlines()[-1]}")
    src = got.stdout
    path = os.path.join(tempfile.mkdtemp(), "decode_baseline.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("decode_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    ns = types.SimpleNamespace(**{k: getattr(models, k) for k in dir(models) if not k.startswith("_")})
    for name in _SWAPPED:
        setattr(ns, name, getattr(mod, name))
    if not hasattr(mod, "window_blocks"):  # before the windows: one block, weights first
        ns.decode_layout = lambda cfg, params, weights_first=True: mod.decode_layout(cfg, params)
        ns.decode_step = lambda cfg, params, tokens, step, cache, block=0: mod.decode_step(
            cfg, params, tokens, step, cache)

        def init_shared_cache(*args, window=None):
            if window:
                sys.exit(f"decode_ab: {rev}'s decode.py has no windows (window={window})")
            return mod.init_shared_cache(*args)

        ns.init_shared_cache = init_shared_cache
    return ns


def sampler_with(models_ns) -> callable:
    """A separately jitted copy of `sampling._sample` that sees `models_ns` as `models` (a copy:
    two `jax.jit`s of one function object would share its trace cache)."""
    raw = sampling._sample.__wrapped__
    glb = dict(raw.__globals__, models=models_ns)
    fn = types.FunctionType(raw.__code__, glb, raw.__name__, raw.__defaults__, raw.__closure__)
    fn.__kwdefaults__ = raw.__kwdefaults__
    return jax.jit(fn, static_argnames=sampling._STATIC_ARGNAMES)


def time_steps(cfg, params, base, name: str, rounds: int) -> None:
    """One decode step (weights first) of each variant over random prompt caches."""
    cases = {}
    for p, g in ((1024, 1), (128, 8)):
        b = 4
        filled = jax.tree.map(lambda c: jax.random.normal(jax.random.key(3), c.shape, c.dtype),
                              models.init_cache(cfg, b, p))
        lens = jnp.full((b,), p - 10, jnp.int32)
        toks = jnp.arange(b * g, dtype=jnp.int32)
        for v, ns in (("this tree", models), (name, base)):
            layout, cache = ns.decode_layout(cfg, params), ns.init_shared_cache(cfg, filled, lens, g, 64)
            step = jax.jit(lambda lp, c, ns=ns, t=toks: ns.decode_step(cfg, lp, t, jnp.int32(5), c)[0])
            cases[(f"prompt {p} slots, {b} x G={g}", v)] = (step, layout, cache)
    outs = {key: jax.block_until_ready(f(lp, c)) for key, (f, lp, c) in cases.items()}
    times: dict = {key: [] for key in cases}
    for _ in range(rounds):
        for key, (f, lp, c) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(lp, c))
            times[key].append(time.perf_counter() - t0)
    for (s, v), ts in times.items():
        diff = float(jnp.abs(outs[(s, v)] - outs[(s, "this tree")]).max())
        print(f"{s:28s} {v:10s} median {1e3 * np.median(ts):.2f} ms  "
              f"[{1e3 * min(ts):.2f}-{1e3 * max(ts):.2f}]  hidden vs this tree {diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--baseline", default="HEAD", help="git revision whose decode.py is the baseline")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", action="store_true", help="time decode_step alone")
    args = ap.parse_args()
    m = ours.load(args.model)
    if args.steps:
        return time_steps(m.cfg, m.params, baseline_models(args.baseline), args.baseline,
                          args.rounds * 6)
    cfg, params, pad = m.cfg, m.params, m.tokenizer.pad_id
    prompts, g, n = ours.question_ids(m), workload.NUM_SAMPLES, 64
    rc = cat_round.RoundConfig(num_rollouts=g, max_new_tokens=n, synthesis_max_new_tokens=n)
    out = sampling.sample(cfg, params, prompts, num_samples=g, max_new_tokens=n,
                          rng=jax.random.key(0), temperature=1.0, stop_ids=(), pad_id=pad)
    texts = [m.tokenizer.decode(ids) for ids in sampling.completions(out)]
    budget = cat_round.prompt_budget(cfg, n)
    syn = [cat_round.synthesis_prompt(m.tokenizer, texts[i * g:(i + 1) * g], "math", rc, budget,
                                      cfg)[0] for i in range(len(prompts))]

    def case(fn, ps, samples, new, temperature):
        toks, lens = (jnp.asarray(x) for x in sampling.pad_prompts(ps, pad))
        kw = dict(sp=sampling.SamplingParams(temperature=temperature), num_samples=samples,
                  max_new_tokens=new, stop_ids=(), pad_id=pad,
                  cache_dtype=sampling.default_cache_dtype(cfg), mesh=None,
                  decode_layout="weights_first")
        return lambda: jax.block_until_ready(fn(cfg, params, toks, lens, jax.random.key(1), **kw))

    shapes = {"synthesis (4 x ~800, N=64)": (syn, 1, 64, 0.0),
              "rollout (4, N=64)": (prompts, 1, 64, 1.0),
              "rollouts (4 x G=8, N=128)": (prompts, g, 128, 1.0)}
    variants = {"this tree": sampler_with(models),
                args.baseline: sampler_with(baseline_models(args.baseline))}
    cases = {(s, v): case(fn, *shape) for s, shape in shapes.items() for v, fn in variants.items()}
    first = {key: f() for key, f in cases.items()}
    for s in shapes:
        a, b = (first[(s, v)] for v in variants)
        print(f"{s}: same tokens {bool(np.array_equal(a.tokens, b.tokens))}, largest log-prob "
              f"difference {float(np.abs(np.asarray(a.logprobs) - np.asarray(b.logprobs)).max()):.1e}")
    times: dict = {key: [] for key in cases}
    for _ in range(args.rounds):
        for key, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[key].append(time.perf_counter() - t0)
    for (s, v), ts in times.items():
        print(f"{s:28s} {v:10s} median {np.median(ts):.3f} s  [{min(ts):.3f}-{max(ts):.3f}]")


if __name__ == "__main__":
    main()
