"""Datasets: one `Example` record for MATH, GSM8K and HealthBench, per-host shards, resumable batches.

    from catjax import data
    examples = data.load("math500")                      # shipped; also "gsm8k" (split "train"/"test")
    hb = data.load("healthbench", path="gs://b/hb.jsonl")  # not shipped; default: $CATJAX_HEALTHBENCH
    for step, batch in enumerate(data.batches(examples, 8, seed=0, start_step=resume_step), resume_step): ...
    # multi-host: this process's contiguous part of the same global batches
    mine = data.process_batches(examples, 8, seed=0, start_step=resume_step,
                                process_index=jax.process_index(), process_count=jax.process_count())

The code lives in `catjax.datasets`; TFDS (array_record, no TensorFlow) is imported only by
`tfds_source` / `example_from_tfds`, since tensorflow_datasets takes about a second to import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from catjax.datasets.batching import (
    batches,
    epoch_order,
    process_batches,
    shard,
    step_position,
    steps_per_epoch,
)
from catjax.datasets.records import (
    DATA_FILES,
    HEALTHBENCH_ENV,
    NAMES,
    READERS,
    Example,
    gsm8k_gold,
    healthbench_default_path,
    load,
    read_gsm8k,
    read_healthbench,
    read_math,
    resolve,
)

__all__ = [
    "DATA_FILES",
    "HEALTHBENCH_ENV",
    "NAMES",
    "READERS",
    "Example",
    "batches",
    "epoch_order",
    "example_from_tfds",
    "gsm8k_gold",
    "healthbench_default_path",
    "load",
    "process_batches",
    "read_gsm8k",
    "read_healthbench",
    "read_math",
    "resolve",
    "shard",
    "step_position",
    "steps_per_epoch",
    "tfds_source",
]


def tfds_source(*args: Any, **kwargs: Any) -> Any:
    """`catjax.datasets.tfds_builders.tfds_source`, imported on first use (TFDS imports slowly)."""
    from catjax.datasets import tfds_builders

    return tfds_builders.tfds_source(*args, **kwargs)


def example_from_tfds(record: Mapping[str, Any]) -> Example:
    """The Example stored in one record of a `tfds_source` data source."""
    from catjax.datasets import tfds_builders

    return tfds_builders.from_features(record)
