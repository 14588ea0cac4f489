"""catjax.hostmem: the modes, and that retained memory stops the page faults (fresh processes:
glibc's malloc must be set before JAX starts its threads)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from catjax import hostmem

# A jitted call whose 256 MiB temporary is allocated and freed on every call; prints the minor
# page faults of each call after the first. The pause lets XLA free the last call's buffers
# (it does so after the result is ready) before the next call allocates.
_PROBE = textwrap.dedent("""
    import resource, sys, time
    from catjax import hostmem
    print(hostmem.configure(sys.argv[1]))
    import jax, jax.numpy as jnp
    x = jnp.ones((64, 1024, 1024), jnp.float32)
    f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(x * 2.0)[::-1] * x))
    f(x).block_until_ready()
    for _ in range(12):
        time.sleep(0.1)
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
""")
_TEMP_PAGES = 256 * 2**20 // 4096


def _probe(mode: str) -> tuple[str, list[int]]:
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0], [int(v) for v in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_retained_memory_is_not_faulted_in_again():
    applied, faults = _probe("retain")
    assert applied == "True"
    # Once freed temporaries are back in the heap, calls reuse them: no fresh pages. (The first
    # few calls may still fault: an aligned request does not fit every freed block.)
    assert sum(faults[-4:]) < _TEMP_PAGES // 4, faults
    applied, faults = _probe("system")
    assert applied == "False"
    # glibc's default hands the 256 MiB back and every call faults it in again.
    assert all(f >= 0.9 * _TEMP_PAGES for f in faults[-4:]), faults


def test_modes(monkeypatch):
    with pytest.raises(ValueError, match="CATJAX_HOST_MALLOC='fast'"):
        hostmem.configure("fast")
    monkeypatch.setenv(hostmem.ENV, "bogus")
    with pytest.raises(ValueError, match="CATJAX_HOST_MALLOC='bogus'"):
        hostmem.configure()
    assert hostmem.configure("system") is False
    monkeypatch.delenv(hostmem.ENV)
    assert hostmem.configure() is False  # glibc's default unless asked


def test_retain_off_glibc_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: False)  # e.g. macOS, musl
    assert hostmem.configure("retain") is False
    assert capsys.readouterr().err == ("catjax: CATJAX_HOST_MALLOC=retain has no effect here: "
                                       "it needs glibc's malloc\n")


def test_cli_rejects_an_unknown_mode_in_one_line(tmp_path):
    env = {"CATJAX_HOST_MALLOC": "fast", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "catjax.main", "--config=configs/toy.py",
                           f"--workdir={tmp_path}"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("catjax: error: CATJAX_HOST_MALLOC='fast': use one of system, "
                                   "retain")
