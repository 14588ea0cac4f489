"""Deterministic, exactly resumable batch order over a whole dataset, and its per-process slices.

Multi-host use: every process calls `process_batches(examples, global_batch, seed, start_step=step,
process_index=jax.process_index(), process_count=jax.process_count())`. The global batch of each step
is the same as `batches(examples, global_batch, seed)` gives one process (a function of (seed, step)
over the whole dataset), and process p takes its contiguous part [p*b, (p+1)*b), b = global_batch /
process_count, indexing only those items (a lazy, random-access source is read only there). So any
process count trains on the same global batches, in the same row order. No state needs
checkpointing beyond the step number: where a step falls is pure arithmetic (`step_position`).
`shard` (a strided split of the dataset itself) remains for jobs without a global order.
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
    return process_batches(examples, batch_size, seed, start_step=start_step)


def process_batches(examples: Sequence[T], global_batch_size: int, seed: int, *, start_step: int = 0,
                    process_index: int = 0, process_count: int = 1) -> Iterator[list[T]]:
    """Process `process_index`'s contiguous part of each global batch of `batches(examples,
    global_batch_size, seed, start_step)`: items [p*b, (p+1)*b) of it, b = global / process_count.

    Concatenating the parts of processes 0..process_count-1 gives exactly the global batch, so the
    data (and its order) of a step do not depend on the number of processes.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} does not split over {process_count} "
                         "processes")
    n = len(examples)
    epoch, offset = step_position(start_step, n, global_batch_size)  # validates now, not at next()
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    local = global_batch_size // process_count
    return _batches(examples, global_batch_size, seed, epoch, offset,
                    (process_index * local, (process_index + 1) * local))


def _batches(examples: Sequence[T], batch_size: int, seed: int, epoch: int, offset: int,
             part: tuple[int, int]) -> Iterator[list[T]]:
    end = steps_per_epoch(len(examples), batch_size) * batch_size
    while True:
        order = epoch_order(len(examples), seed, epoch)
        for lo in range(offset, end, batch_size):
            yield [examples[i] for i in order[lo + part[0] : lo + part[1]]]
        epoch, offset = epoch + 1, 0
