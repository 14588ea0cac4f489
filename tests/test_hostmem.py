"""catjax.hostmem: the modes, and that mimalloc (by restart) stops the page faults (fresh
processes: the malloc must be chosen before JAX starts)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from catjax import hostinfo, hostmem

ROOT = Path(__file__).resolve().parent.parent
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD: Linux")

# A jitted call whose 256 MiB temporary is allocated and freed on every call; prints the malloc
# in effect, then the minor page faults of each call after the first. The pause lets XLA free the
# last call's buffers (it does so after the result is ready) before the next call allocates.
_PROBE = textwrap.dedent("""
    import os, resource, sys, time
    from catjax import hostinfo, hostmem
    print(hostmem.configure(sys.argv[1], restart=True), os.environ.get("PROBE_KEEP"))
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
_ENV = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PROBE_KEEP": "kept"}


def _probe(mode: str, **env: str) -> tuple[list[str], list[int], str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**_ENV, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    head, *faults = proc.stdout.splitlines()
    return head.split(), [int(v) for v in faults], proc.stderr


def _reused(faults: list[int]) -> bool:
    # Once freed temporaries are kept, calls reuse them: no fresh pages. (The first few calls may
    # still fault: an aligned request does not fit every freed block.)
    return sum(faults[-4:]) < _TEMP_PAGES // 4


@LINUX
def test_system_malloc_faults_the_temporary_in_on_every_call():
    head, faults, _ = _probe("system")
    assert head == ["system", "kept"]
    # glibc's default hands the 256 MiB back and every call faults it in again.
    assert all(f >= 0.9 * _TEMP_PAGES for f in faults[-4:]), faults


@LINUX
def test_mimalloc_restart_keeps_argv_and_env_and_stops_the_faults():
    head, faults, _ = _probe("mimalloc")
    assert head == ["mimalloc", "kept"]  # restarted once, with the same argv and environment
    assert _reused(faults), faults


@LINUX
def test_a_refused_preload_does_not_restart_again():
    # As if the restart happened but the loader skipped the library: no second restart, one line.
    head, _, err = _probe("mimalloc", **{hostmem._RESTARTED: "1"})
    assert head == ["system", "kept"]
    assert err == ("catjax: CATJAX_HOST_MALLOC=mimalloc has no effect here: the loader did not "
                   "preload it\n")


def test_modes(monkeypatch):
    with pytest.raises(ValueError, match="CATJAX_HOST_MALLOC='fast': use one of auto, mimalloc, system"):
        hostmem.configure("fast")
    monkeypatch.setenv(hostmem.ENV, "bogus")
    with pytest.raises(ValueError, match="CATJAX_HOST_MALLOC='bogus'"):
        hostmem.configure()
    assert hostmem.configure("system", restart=True) == "system"
    monkeypatch.delenv(hostmem.ENV)
    # Without `restart` (a library caller, this test) the process keeps the malloc it has.
    assert hostmem.configure() == "system"
    assert hostmem.configure("mimalloc") == "system"


def test_auto_is_mimalloc_only_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted"))
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: True)
    assert hostmem.configure("auto", restart=True) == "system"
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: False)
    with pytest.raises(pytest.fail.Exception, match="restarted"):
        hostmem.configure("auto", restart=True)


def test_accelerator_present_honours_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not hostmem.accelerator_present()
    monkeypatch.setattr(hostinfo, "tpu_present", lambda: True)
    assert not hostmem.accelerator_present()  # a TPU host told to compute on the CPU
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert hostmem.accelerator_present()
    monkeypatch.setattr(hostinfo, "tpu_present", lambda: False)
    monkeypatch.setattr(hostinfo, "gpu_present", lambda: False)
    assert not hostmem.accelerator_present()


def test_mimalloc_missing_says_so_only_when_asked(monkeypatch, capsys):
    monkeypatch.setattr(hostmem, "mimalloc_library", lambda: None)  # e.g. macOS
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: False)
    monkeypatch.delenv(hostmem.ENV, raising=False)
    assert hostmem.configure(restart=True) == "system"  # the default: quietly the system's
    assert capsys.readouterr().err == ""
    assert hostmem.configure("mimalloc", restart=True) == "system"
    assert capsys.readouterr().err == ("catjax: CATJAX_HOST_MALLOC=mimalloc has no effect here: "
                                       "install cmeel-mimalloc (Linux)\n")


def test_restart_preloads_mimalloc_before_other_preloads(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "250")
    hostmem.restart_with_mimalloc(Path("/lib/libmimalloc.so.3"))
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == "/lib/libmimalloc.so.3:/opt/other.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "250"  # a user's setting wins
    assert env[hostmem._RESTARTED] == "1"


def _cli(tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catjax.main", "--config=configs/toy.py",
                           f"--workdir={tmp_path}", "--config.job=bogus"],
                          env={**_ENV, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_rejects_an_unknown_mode_in_one_line(tmp_path):
    proc = _cli(tmp_path, CATJAX_HOST_MALLOC="fast")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("catjax: error: CATJAX_HOST_MALLOC='fast': use one of auto, "
                                   "mimalloc, system")


@LINUX
def test_cli_runs_with_mimalloc_by_default(tmp_path):
    # mimalloc prints its statistics at exit when asked: only a process it serves does.
    proc = _cli(tmp_path, MIMALLOC_SHOW_STATS="1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("catjax: error: config.job='bogus'"), proc.stderr
    assert "arenas" in proc.stderr, proc.stderr
    assert "arenas" not in _cli(tmp_path, MIMALLOC_SHOW_STATS="1",
                                CATJAX_HOST_MALLOC="system").stderr
