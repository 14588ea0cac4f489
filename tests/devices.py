"""Run a script in a fresh process that sees N fake CPU devices (XLA flags act at start-up)."""

from __future__ import annotations

import os
import subprocess
import sys


def xla_flags(num_devices: int) -> str:
    """The suite's XLA flags (tests/conftest.py) plus `num_devices` host devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"


def run_on_devices(script: str, num_devices: int, timeout: int = 600) -> str:
    """Run `script` with `num_devices` host devices; it must print OK. Returns its stdout."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(num_devices), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    return res.stdout
