"""What accelerators this host has, judged from its device nodes without starting JAX.

Read before JAX is imported (catjax.hostmem may still restart the process) or before a backend
is initialized (catjax.parallel's slice detection): asking JAX would fix its devices too early.
"""

from __future__ import annotations

import glob


def tpu_present() -> bool:
    """TPU chips: /dev/accel* (v4 and earlier) or /dev/vfio/N (v5e and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def gpu_present() -> bool:
    """NVIDIA GPUs: /dev/nvidiaN."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))
