"""Host memory on CPU runs: which malloc serves XLA:CPU's buffers (CATJAX_HOST_MALLOC).

XLA:CPU allocates every call's temporary buffer afresh: 2.7 GB for the benchmark's training step
on a 4-layer model with a 49k vocabulary. glibc serves blocks that large with a fresh `mmap` and
returns them to the kernel on `free`, so each call page-faults gigabytes in again, zero-filled by
the kernel: a fifth of that step's wall time went to the kernel (bench/RESULTS.md).

Modes:
- `auto` (the default): `mimalloc` where JAX will compute on the CPU (no GPU or TPU device on
  the host, or JAX_PLATFORMS=cpu), else `system`: an accelerator's buffers live on the device.
- `mimalloc`: the entry points restart the process once with mimalloc (the `cmeel-mimalloc`
  wheel, a dependency on Linux) preloaded and told to keep freed pages
  (MIMALLOC_PURGE_DELAY=-1), so the next call reuses them. A preload is the only way: XLA calls
  the C library's malloc, and only the dynamic loader can put another in its place.
- `system`: the C library's malloc as it comes.

(glibc's malloc set to one arena with no `mmap` and no trim also stops the faults; it was an
option until mimalloc measured at least as fast without its memory price: bench/RESULTS.md.)
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from catjax import hostinfo

ENV = "CATJAX_HOST_MALLOC"
MODES = ("auto", "mimalloc", "system")
# Set in the restarted process: a preload the loader refused must not restart it again.
_RESTARTED = "CATJAX_HOST_MALLOC_RESTARTED"


def mimalloc_library() -> Path | None:
    """The shared mimalloc that `cmeel-mimalloc` installs (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = metadata.distribution("cmeel-mimalloc")
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("cmeel.prefix/lib/libmimalloc.so.3"))
    return path if path.is_file() else None


def accelerator_present() -> bool:
    """Whether JAX may find a GPU or TPU here (judged before JAX starts, from the device nodes)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and all(p.strip() == "cpu" for p in platforms.split(",")):
        return False
    return hostinfo.gpu_present() or hostinfo.tpu_present()


def mimalloc_loaded() -> bool:
    """Whether this process runs with mimalloc (preloaded or linked in)."""
    try:
        return "libmimalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def restart_with_mimalloc(library: Path) -> None:
    """Replace this process by the same command with `library` preloaded (does not return)."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MIMALLOC_PURGE_DELAY", "-1")  # keep freed pages for the next call
    env[_RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own options and `-m module` / `-c code`.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def configure(mode: str | None = None, *, restart: bool = False) -> str:
    """Apply `mode` (default: $CATJAX_HOST_MALLOC, else auto); returns the malloc in effect.

    `restart`: the caller is the program's entry point, early, before JAX starts, and mimalloc
    may be brought in by restarting the process (see `restart_with_mimalloc`). Library callers
    leave it False and get what their process already runs with.
    """
    mode = mode if mode is not None else os.environ.get(ENV) or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    asked = mode == "mimalloc"
    if mode == "auto":
        mode = "system" if accelerator_present() else "mimalloc"
    loaded = mimalloc_loaded()
    if loaded or mode == "system" or not restart:
        return "mimalloc" if loaded else "system"
    library = mimalloc_library()
    if library is not None and _RESTARTED not in os.environ:
        restart_with_mimalloc(library)
    if asked or library is not None:  # asked for, or the loader refused it: say why it is off
        why = "the loader did not preload it" if library else "install cmeel-mimalloc (Linux)"
        print(f"catjax: {ENV}=mimalloc has no effect here: {why}", file=sys.stderr)
    return "system"
