"""Lower + compile the forward pass of the paper's models for abstract inputs (no weights).

    .venv/bin/python bench/compile_time.py [--seq 1024]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from catjax import models  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()
    for name in ("qwen3_4b", "gemma3_4b", "llama31_8b"):
        cfg = models.get_preset(name)
        t0 = time.perf_counter()
        fwd = jax.jit(lambda p, t, cfg=cfg: models.forward(cfg, p, t))
        fwd.lower(models.abstract_params(cfg),
                  jax.ShapeDtypeStruct((1, args.seq), jnp.int32)).compile()
        print(f"{name}: {cfg.num_layers} layers, {cfg.num_params() / 1e9:.2f}B params, "
              f"lower+compile {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
