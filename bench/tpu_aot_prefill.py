"""The prefill compiled for a TPU without one: XLA's TPU compiler, deviceless AOT, per-chip memory.

    .venv/bin/pip install --no-deps --target /tmp/libtpu "libtpu==0.0.42.*"   # jax 0.10.2's
    .venv/bin/python bench/tpu_aot_prefill.py --libtpu /tmp/libtpu [--prompt 13312]
    .venv/bin/python bench/tpu_aot_prefill.py --libtpu /tmp/libtpu --sampler [--prompt 1024]

Qwen 3 4B (bfloat16, replicated), a v5e 2x2 slice with its 4 chips on the data axis, one prompt
per chip, chunks of 1024 (the sampler's default off CPUs), a bfloat16 cache of the prompt's
slots: `models.prefill` with the last layer whole at every position, as it runs now without
telling it the mesh, and as the sampler runs it (`mesh=`: each chip writes its own rows' keys
and values). Prints XLA's temporaries per chip and the collectives in each compiled program.
(Its cost analysis counts a loop body once, so its FLOPs and bytes say little here.)

`--sampler`: the whole sampler instead (`sampling._sample`, the TPU's scan decode), 8 rollouts
of 512 new tokens per prompt at Qwen 3's recommended temperature 0.7, top-k 20, top-p 0.8:
its temporaries and collectives. Rows split over the chips should move nothing between them
but scalars (a u32, and the prefill's "any prompt still running" past its first chunk).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libtpu", required=True, help="a folder holding the libtpu package")
    ap.add_argument("--prompt", type=int, default=13312, help="prompt slots per chip")
    ap.add_argument("--preset", default="qwen3_4b")
    ap.add_argument("--sampler", action="store_true", help="compile the whole sampler")
    args = ap.parse_args()
    devices = tpu_devices("tpu_aot_prefill", args.libtpu, "v5e:2x2")
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from catjax import models

    mesh = Mesh(np.array(devices).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
    cfg = models.get_preset(args.preset)
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          models.abstract_params(cfg))
    b, p = len(devices), args.prompt
    tokens = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)
    if args.sampler:
        from catjax import sampling

        # The accelerators' choices, though the compile runs on the CPU backend: blocked top-k,
        # nucleus search, prefill chunks of 1024.
        sampling._on_cpu = lambda: False
        sampling.default_prefill_chunk = lambda: models.decoder.DEFAULT_Q_CHUNK
        t0 = time.perf_counter()
        compiled = sampling._sample.lower(
            cfg, params, tokens, lengths, jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
            sp=sampling.SamplingParams(0.7, 20, 0.8), num_samples=8, max_new_tokens=512,
            stop_ids=(1,), pad_id=0, cache_dtype="bfloat16", mesh=mesh).compile()
        report(f"{args.preset}, the sampler, 8 x 512 new tokens per {p}-token prompt", compiled, t0)
        return
    variants = {"last layer whole everywhere": dict(whole_last_layer=True),
                "last layer whole at the last token only": dict(),
                "and each chip writing its own rows (mesh=)": dict(mesh=mesh)}
    for name, kw in variants.items():
        def prefill(params, tokens, lengths, kw=kw):
            cache = jax.tree.map(
                lambda c: jax.lax.with_sharding_constraint(c, NamedSharding(mesh, P(None, "data"))),
                models.init_cache(cfg, b, p, jnp.bfloat16))
            return models.prefill(cfg, params, tokens, lengths, cache, chunk=1024, **kw)

        t0 = time.perf_counter()
        report(f"{args.preset}, {p}-token prompt per chip, {name}",
               jax.jit(prefill).lower(params, tokens, lengths).compile(), t0)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tpu_devices(script: str, libtpu: str, topology: str, tree: str | None = None) -> list:
    """The chips of a TPU `topology` ("v5e:2x2", "v5p:2x2x1") to compile for, on this machine's
    CPU backend with the libtpu package in folder `libtpu` (one host's chips). `tree`: the
    checkout whose catjax is compiled (default: this one; an older commit's git worktree to
    compare)."""
    if not os.path.isdir(os.path.join(libtpu, "libtpu")):
        sys.exit(f"{script}: --libtpu {libtpu}: no libtpu package there (install it with the "
                 "pip line in this script's docstring)")
    if tree is not None and not os.path.isdir(os.path.join(tree, "catjax")):
        sys.exit(f"{script}: --tree {tree}: no catjax package there")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    sys.path.insert(0, libtpu)
    sys.path.insert(0, tree or _REPO)
    import jax
    from jax.experimental.topologies import get_topology_desc

    jax.config.update("jax_platforms", "cpu")  # compile for the TPU topology, run nothing
    dims = [int(x) for x in topology.split(":")[1].split("x")]
    return get_topology_desc(platform="tpu", topology_name=topology,
                             chips_per_host_bounds=tuple(dims + [1] * (3 - len(dims))),
                             num_slices=1).devices


def load_hlo():
    """This checkout's `catjax/hlo.py` (reading compiled programs), whichever tree is compiled."""
    spec = importlib.util.spec_from_file_location("bench_hlo", os.path.join(_REPO, "catjax", "hlo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(what: str, compiled, t0: float) -> None:
    mem = compiled.memory_analysis()
    moved = collections.Counter(load_hlo().collectives(compiled.as_text()))
    listed = ", ".join(f"{n} x {op} {shape}" for (shape, op), n in sorted(moved.items()))
    print(f"{what}: temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB per chip, arguments "
          f"{mem.argument_size_in_bytes / 2**30:.2f} GiB (compiled in "
          f"{time.perf_counter() - t0:.0f} s); collectives in the program: {listed or 'none'}",
          flush=True)

if __name__ == "__main__":
    main()
