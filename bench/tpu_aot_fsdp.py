"""What an fsdp mesh moves between chips: XLA's TPU compiler, deviceless AOT, bytes per call.

    .venv/bin/pip install --no-deps --target /tmp/libtpu "libtpu==0.0.42.*"   # jax 0.10.2's
    .venv/bin/python bench/tpu_aot_fsdp.py --libtpu /tmp/libtpu [--topology v5p:2x2x1]

Qwen 3 4B on a mesh with every chip on the fsdp axis (the trainer's default mesh, data=1,
fsdp=-1), its parameters sharded as the trainer shards them (`parallel.param_shardings`):
1. the update (`trainer.train_step`, float32 master weights, remat, AdamW, logprob chunks of
   128): 16 rows of 512 prompt + 1536 completion tokens;
2. the sampler (`sampling._sample`, the TPU's scan decode, bfloat16 weights and cache): 4
   prompts of 2048 tokens, 8 rollouts of 512 new tokens each at T 0.7, top-k 20, top-p 0.8.
3. `--only judge`: the local judge's forward (`scoring._shared_prefix_logits`), 8 prefixes of
   2048 tokens, 32 suffixes of 64.
4. `--only drafted`: the anchor's greedy synthesis, 4 prompts of 4096 tokens, 1024 new tokens
   each, plain (`sampling._sample`) and drafted 4 tokens a pass (`drafting.sample_drafted`,
   whose loop has no constant bound: its collectives are counted once, i.e. per pass).
For each: XLA's temporaries per chip and the bytes each chip's collectives carry per call:
every collective's result size times the trip counts of the loops around it (a loop's count
read off its condition's constant: the decode loop's is its upper bound, every row running to
the budget), split into those outside loops and those inside. The programs are the TPU's:
`jax.default_backend()` answers "tpu" for catjax's choices by backend. `--tree DIR`: compile an
older commit's catjax (a git worktree; 84ea27a has the programs as GSPMD partitioned them
unguided), read with this checkout's `catjax/hlo.py`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import os
import re
import sys
import time

import numpy as np

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[sufb]f?\d+)\[([\d,]*)\]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libtpu", required=True, help="a folder holding the libtpu package")
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--preset", default="qwen3_4b")
    ap.add_argument("--only", default="train,sampler")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (-1: the rest)")
    ap.add_argument("--tree", help="the checkout whose catjax to compile (default: this one)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tpu_aot_prefill import tpu_devices

    devices = tpu_devices("tpu_aot_fsdp", args.libtpu, args.topology, args.tree)
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh

    from catjax import models, parallel, sampling
    from catjax.rl import trainer

    # The TPU's code paths (blocked top-k, prefill chunks of 1024, plain vocabulary sums, ...),
    # though the compile runs on the CPU backend.
    jax.default_backend = lambda: "tpu"
    mesh = Mesh(np.array(devices).reshape([int(x) for x in args.mesh.split(",")]), parallel.AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = models.get_preset(args.preset).replace(remat=True)
    shardings = parallel.param_shardings(models.param_shapes(cfg), models.logical_axes(cfg), mesh)

    def params_as(dtype):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                            models.abstract_params(cfg), shardings)

    def rows(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))

    # Trees from before 2026-11-29 take no mesh: GSPMD alone partitions their programs.
    kw = {"mesh": mesh} if "mesh" in inspect.signature(trainer.train_step).parameters else {}
    print(f"{args.preset} on a {args.topology} ({len(devices)} chips, mesh {dict(mesh.shape)}); "
          f"train_step {'told' if kw else 'not told'} the mesh", flush=True)
    if "train" in args.only:
        params = params_as(jnp.float32)
        rl = trainer.RLConfig(num_rollouts=8, kl_mode="none")
        opt = optax.adamw(1e-6)
        opt_state = optax.tree_utils.tree_map_params(
            opt, lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(opt.init, params), jax.tree.map(lambda p: p.sharding, params),
            transform_non_params=lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=parallel.replicated(mesh)))
        r, w, n = 16, 512, 1536
        batch = dict(tokens=rows((r, w + n), jnp.int32), positions=rows((r, w + n), jnp.int32),
                     key_mask=rows((r, w + n), jnp.bool_), pred_index=rows((r, n), jnp.int32),
                     targets=rows((r, n), jnp.int32), mask=rows((r, n), jnp.float32),
                     rewards=rows((r,), jnp.float32))
        step = jax.jit(functools.partial(trainer.train_step, cfg, rl=rl, opt=opt, **kw),
                       donate_argnums=(0, 1))
        t0 = time.perf_counter()
        report(f"update, {r} rows x {w}+{n} tokens",
               step.lower(params, opt_state, params, batch).compile(), t0)
    if "sampler" in args.only:
        b, p = 4, 2048
        t0 = time.perf_counter()
        compiled = sampling._sample.lower(
            cfg, params_as(jnp.bfloat16), rows((b, p), jnp.int32), rows((b,), jnp.int32),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
            sp=sampling.SamplingParams(0.7, 20, 0.8), num_samples=8, max_new_tokens=512,
            stop_ids=(1,), pad_id=0, cache_dtype="bfloat16", mesh=mesh).compile()
        report(f"sampler, {b} prompts of {p} tokens, 8 x 512 new tokens each", compiled, t0)
    if "drafted" in args.only:
        from catjax import drafting

        b, p, n = 4, 4096, 1024
        common = dict(num_samples=1, max_new_tokens=n, stop_ids=(1,), pad_id=0,
                      cache_dtype="bfloat16", mesh=mesh)
        t0 = time.perf_counter()
        compiled = sampling._sample.lower(
            cfg, params_as(jnp.bfloat16), rows((b, p), jnp.int32), rows((b,), jnp.int32),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype), sp=sampling.SamplingParams(0.0),
            logprobs=False, **common).compile()
        report(f"greedy synthesis, {b} prompts of {p} tokens, {n} new tokens (every step)",
               compiled, t0)
        t0 = time.perf_counter()
        compiled = drafting.sample_drafted.lower(
            cfg, params_as(jnp.bfloat16), rows((b, p), jnp.int32), rows((b,), jnp.int32),
            draft_tokens=4, unrolled=sampling.default_decode_layout() != "scan", **common).compile()
        report("drafted synthesis, the same (one pass of 5 tokens a row)", compiled, t0)
    if "judge" in args.only:
        from catjax import scoring

        g, p, r, s = 8, 2048, 32, 64  # 8 shared prefixes (a response each), 4 criteria each
        shards = parallel.data_parallel_size(mesh)
        t0 = time.perf_counter()
        compiled = scoring._shared_prefix_logits.lower(
            cfg, params_as(jnp.bfloat16), rows((g, p), jnp.int32), rows((g,), jnp.int32),
            rows((r, s), jnp.int32), rows((r,), jnp.int32), rows((r,), jnp.int32), mesh=mesh,
            shards=shards).compile()
        report(f"local judge, {g} prefixes of {p} tokens, {r} suffixes of {s}", compiled, t0)


def traffic(hlo_text: str) -> tuple[float, float, collections.Counter]:
    """(bytes outside loops, bytes inside them, bytes by (op, shape)) of a program's collectives,
    each counted as often as the loops around it run (`catjax/hlo.py`'s trip counts)."""
    from tpu_aot_prefill import load_hlo

    once = looped = 0.0
    by_shape: collections.Counter = collections.Counter()
    for shape, op, trips in load_hlo().collectives_with_trips(hlo_text):
        size = sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dd.split(",") if d]))
                   for dt, dd in _ARRAY.findall(shape))
        total = size * int(np.prod(trips))
        by_shape[(op, re.sub(r"\{[^}]*\}", "", shape)[:90])] += total
        if trips:
            looped += total
        else:
            once += total
    return once, looped, by_shape


def report(what: str, compiled, t0: float) -> None:
    mem = compiled.memory_analysis()
    once, looped, by_shape = traffic(compiled.as_text())
    print(f"{what}: temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB per chip (compiled in "
          f"{time.perf_counter() - t0:.0f} s); collectives carry {(once + looped) / 1e9:.2f} GB "
          f"per chip per call, {once / 1e9:.2f} GB outside loops, {looped / 1e9:.2f} GB in them",
          flush=True)
    for (op, shape), b in by_shape.most_common(6):
        print(f"    {b / 1e9:8.2f} GB  {op} {shape}", flush=True)


if __name__ == "__main__":
    main()
