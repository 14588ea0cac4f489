"""Host memory on CPU runs: optionally keep freed memory in the process (CATJAX_HOST_MALLOC).

XLA:CPU allocates every call's temporary buffer afresh: 2.7 GB for the benchmark's training step
on a 4-layer model with a 49k vocabulary. glibc serves blocks that large with a fresh `mmap` and
returns them to the kernel on `free`, so each call page-faults gigabytes in again, zero-filled by
the kernel: a fifth of that step's wall time went to the kernel (bench/RESULTS.md). With one malloc
arena, no `mmap` and no trimming (`retain`), a freed buffer stays mapped and the next call reuses
it: that step ran 1.3x faster.

It is opt-in because of its price, measured here: the process keeps its peak heap and never
returns fragments (peak RSS 1.6x on that step; SmolLM2-135M's 32-row step, which completed in
24 GiB with glibc's default that day, was killed for memory), and XLA's compiler threads share
one arena (the demo took 370 s instead of 342). Use it for long CPU training runs with memory to
spare.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "CATJAX_HOST_MALLOC"
MODES = ("system", "retain")  # system: glibc's default (the default); retain: as above

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (one arena, no mmap, no trim); True if applied.

    Call it before JAX starts: an arena limit set after other threads have allocated does not
    bind them. A no-op returning False where the C library is not glibc (macOS, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # M_TRIM_THRESHOLD -1 turns trimming off; M_MMAP_MAX 0 sends every block through the heap;
    # one arena, because glibc's per-thread arenas mmap large blocks whatever M_MMAP_MAX says.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def configure(mode: str | None = None) -> bool:
    """Apply `mode` (default: $CATJAX_HOST_MALLOC, else 'system'); True if memory is retained."""
    mode = mode if mode is not None else os.environ.get(ENV, "system")
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    if mode != "retain":
        return False
    if retain_freed_memory():
        return True
    print(f"catjax: {ENV}=retain has no effect here: it needs glibc's malloc", file=sys.stderr)
    return False
