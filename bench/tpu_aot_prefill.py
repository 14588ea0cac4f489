"""The prefill compiled for a TPU without one: XLA's TPU compiler, deviceless AOT, per-chip memory.

    .venv/bin/pip install --no-deps --target /tmp/libtpu "libtpu==0.0.42.*"   # jax 0.10.2's
    .venv/bin/python bench/tpu_aot_prefill.py --libtpu /tmp/libtpu [--prompt 13312]

Qwen 3 4B (bfloat16, replicated), a v5e 2x2 slice with its 4 chips on the data axis, one prompt
per chip, chunks of 1024 (the sampler's default off CPUs), a bfloat16 cache of the prompt's
slots: `models.prefill` with the last layer whole at every position and as it runs now. Prints
XLA's temporaries per chip for each. (Its cost analysis counts a loop body once, so its FLOPs
and bytes say little here.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libtpu", required=True, help="a folder holding the libtpu package")
    ap.add_argument("--prompt", type=int, default=13312, help="prompt slots per chip")
    ap.add_argument("--preset", default="qwen3_4b")
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.libtpu, "libtpu")):
        sys.exit(f"tpu_aot_prefill: --libtpu {args.libtpu}: no libtpu package there (install it "
                 "with the pip line in this script's docstring)")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    sys.path.insert(0, args.libtpu)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from jax.experimental.topologies import get_topology_desc
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from catjax import models

    jax.config.update("jax_platforms", "cpu")  # compile for the TPU topology, run nothing
    devices = get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    mesh = Mesh(np.array(devices), ("data",))
    cfg = models.get_preset(args.preset)
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          models.abstract_params(cfg))
    b, p = len(devices), args.prompt
    tokens = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)
    for whole in (True, False):
        def prefill(params, tokens, lengths, whole=whole):
            cache = jax.tree.map(
                lambda c: jax.lax.with_sharding_constraint(c, NamedSharding(mesh, P(None, "data"))),
                models.init_cache(cfg, b, p, jnp.bfloat16))
            return models.prefill(cfg, params, tokens, lengths, cache, chunk=1024,
                                  whole_last_layer=whole)

        t0 = time.perf_counter()
        mem = jax.jit(prefill).lower(params, tokens, lengths).compile().memory_analysis()
        print(f"{args.preset}, {p}-token prompt per chip, last layer "
              f"{'whole everywhere' if whole else 'whole at the last token only'}: temporaries "
              f"{mem.temp_size_in_bytes / 2**30:.2f} GiB per chip, arguments "
              f"{mem.argument_size_in_bytes / 2**30:.2f} GiB (compiled in "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
