"""Per-host sharding and a deterministic, exactly resumable epoch iterator.

Multi-host use: every process calls `shard(examples, jax.process_index(), jax.process_count())` and then
`batches(my_shard, per_host_batch, seed, start_step=step)` with the same seed and step. No state needs
checkpointing beyond the step number: where a step falls is pure arithmetic (`step_position`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def shard(
    examples: Sequence[T], process_index: int, process_count: int, *, drop_remainder: bool = True
) -> list[T]:
    """Items process_index, process_index + process_count, ... of `examples`.

    Strided, not contiguous, so every host gets a similar mix of a file that is grouped (by subject,
    level or source). With `drop_remainder` (default) the last len % process_count items are left out
    so that all hosts hold the same number of examples, hence the same steps per epoch: a host with one
    step more than the others would wait forever in the next collective.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    end = len(examples) - len(examples) % process_count if drop_remainder else len(examples)
    if end == 0:
        raise ValueError(f"{len(examples)} examples cannot be split over {process_count} processes")
    return list(examples[process_index:end:process_count])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples < batch_size:
        raise ValueError(f"{num_examples} examples do not fill one batch of {batch_size}")
    return num_examples // batch_size


def step_position(step: int, num_examples: int, batch_size: int) -> tuple[int, int]:
    """(epoch, offset into that epoch's permutation) of the batch at global step `step`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, index = divmod(step, steps_per_epoch(num_examples, batch_size))
    return epoch, index * batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch `epoch`: a function of (seed, epoch) alone, so any epoch can be rebuilt."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy seed sequences take non-negative ints), got {seed}")
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(examples: Sequence[T], batch_size: int, seed: int, start_step: int = 0) -> Iterator[list[T]]:
    """Endless batches of `batch_size` items, one per step, starting at step `start_step`.

    Each epoch visits `examples` in the order `epoch_order(len(examples), seed, epoch)`. Every batch is
    full: the last len % batch_size items of each epoch's permutation are skipped in that epoch (the
    ragged tail; different items each epoch, since each epoch reshuffles). Nothing else is dropped.
    `batches(x, b, s, start_step=k)` yields exactly what a fresh iterator yields from its k-th step on.
    Take a finite number of steps with `itertools.islice`.
    """
    n = len(examples)
    epoch, offset = step_position(start_step, n, batch_size)  # validates here, not at the first next()
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return _batches(examples, batch_size, seed, epoch, offset)


def _batches(examples: Sequence[T], batch_size: int, seed: int, epoch: int, offset: int) -> Iterator[list[T]]:
    end = steps_per_epoch(len(examples), batch_size) * batch_size
    while True:
        order = epoch_order(len(examples), seed, epoch)
        for lo in range(offset, end, batch_size):
            yield [examples[i] for i in order[lo : lo + batch_size]]
        epoch, offset = epoch + 1, 0
