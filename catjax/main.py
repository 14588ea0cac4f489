"""Entry point: `python -m catjax.main --config=configs/X.py[:arg] --workdir=DIR|gs://...`.

The config's `job` picks what runs: `evaluate` (test-time synthesis and baselines), `train` (CaT-RL)
or `demo`.
Any field can be overridden with `--config.field=value`; an unknown field or a wrong type stops
with one line before anything compiles.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")


def run(config, workdir: str):
    job = config.get("job", "evaluate")
    if job == "evaluate":
        from catjax import evaluate

        return evaluate.run(config, workdir)
    if job == "train":
        from catjax.rl import trainer

        return trainer.train(config, workdir)
    if job == "demo":
        from catjax import demo

        return demo.run(config, workdir)
    raise ValueError(f"config.job={job!r}: use 'evaluate', 'train' or 'demo'")


def main(argv):
    del argv
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    logging.getLogger("jax").setLevel(logging.WARNING)
    run(_CONFIG.value, _WORKDIR.value)


def cli():
    try:
        app.run(main)
    except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
        # Config and input errors: one clear line, no traceback.
        print(f"catjax: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
