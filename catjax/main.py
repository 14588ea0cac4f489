"""Entry point: `python -m catjax.main --config=configs/X.py[:arg] --workdir=DIR|gs://...`.

The config's `job` picks what runs: `evaluate` (test-time synthesis and baselines), `train` (CaT-RL)
or `demo`.
Any field can be overridden with `--config.field=value`; an unknown field or a wrong type stops
with one line before anything compiles.

Multi-host: run the same command on every host. A multi-host Cloud TPU slice is detected; any
other cluster (or several processes on one machine) passes `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` to each process. `config.batch_size` is the global batch.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (multi-process runs; "
    "default: detect a multi-host Cloud TPU slice, else one process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")


def run(config, workdir: str):
    job = config.get("job", "evaluate")
    if job == "evaluate":
        from catjax import evaluate

        return evaluate.run(config, workdir)
    if job == "train":
        from catjax.rl import trainer

        return trainer.train(config, workdir)
    if job == "sft":
        from catjax import sft

        return sft.run(config, workdir)
    if job == "demo":
        from catjax import demo

        return demo.run(config, workdir)
    raise ValueError(f"config.job={job!r}: use 'evaluate', 'train', 'sft' or 'demo'")


def main(argv):
    del argv
    if _CONFIG.value is None:
        _fail("--config is required (a config file, e.g. --config=configs/cat_rl.py)")
    if _WORKDIR.value is None:
        _fail("--workdir is required")
    logging.getLogger("jax").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint step at INFO
    from catjax import hostmem, parallel

    # Before JAX starts: may restart this process with mimalloc preloaded (see hostmem); only
    # when this module is the program, not when a test calls cli().
    hostmem.configure(restart=__name__ == "__main__")
    # Before anything touches a JAX backend: devices are fixed once one is initialized.
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    run(_CONFIG.value, _WORKDIR.value)


def _fail(message: str, code: int = 2):
    print(f"catjax: error: {message}", file=sys.stderr)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    """absl wraps a config file's exception, traceback and all, in its message: keep the gist."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}"
    return " ".join(lines) or type(e).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, every error one line (exit 2) rather than a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(_one_line(e))
    except (AttributeError, KeyError) as e:  # `--config.x=...` for a field the config lacks
        key = str(e).strip("\"'")
        given = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
        field = next((g for g in given if g.rsplit(".", 1)[-1] == key), f"config.{key}")
        _fail(f"unknown config field {field!r}")


def cli():
    try:
        app.run(main, flags_parser=_parse_flags)
    except (ValueError, OSError, KeyError, AttributeError) as e:
        # Config and input errors (a missing or unreadable file too): one clear line, no traceback.
        _fail(_one_line(e))
    except RuntimeError as e:
        from catjax.checkpoint import CheckpointError
        from catjax.storage import StorageError

        if not isinstance(e, CheckpointError | StorageError):
            raise
        _fail(str(e), code=1)  # storage gone: already one line, after bounded retries


if __name__ == "__main__":
    cli()
