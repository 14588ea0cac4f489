"""Sandboxed symbolic-equivalence worker, run in its own interpreter process.

`catjax.cat.answers` owns the process: it runs ``python -m catjax.cat.verify_worker FD`` (a
fresh interpreter, never a fork), sends ``(request_id, op, a, b)`` tuples over the socket FD
with `multiprocessing.connection` framing, and enforces a wall-clock limit per request from
the outside (killing and replacing this process if it overruns). This module must stay cheap
to import in the parent: math-verify / sympy are imported only inside `serve`.

Defence in depth, on top of "we never hand model text to sympify/parse_expr/eval":
* only math-verify's LaTeX extractor is enabled (its plain-expression extractor calls sympy's
  ``parse_expr``, i.e. ``eval``, on the text);
* after warm-up an audit hook refuses spawning processes, sockets, native-library loading,
  file writes and compiling source text that looks like an injection (see `_audit_hook`);
* the address space is capped so a huge intermediate raises MemoryError instead of swapping.
"""

from __future__ import annotations

import os
import re
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

# Cap on the worker's virtual memory: sympy + math-verify need ~0.3 GB; the rest is headroom.
MEMORY_LIMIT_BYTES = 4 << 30

# Audit events that have no business happening while grading an answer.
_BLOCKED_EVENTS = frozenset(
    {
        "os.system",
        "os.fork",
        "os.forkpty",
        "os.kill",
        "os.killpg",
        "os.putenv",
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.link",
        "os.symlink",
        "os.truncate",
        "os.chdir",
        "pty.spawn",
        "shutil.rmtree",
        "shutil.move",
        "shutil.copyfile",
        "webbrowser.open",
        "urllib.Request",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.cdata",
    }
)
_BLOCKED_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn", "subprocess.", "socket.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# sympy itself compiles source strings at run time (`sympy.Number("12")` goes through
# sympify -> parse_expr -> eval with "Integer (12 )"; polys generate monomial helpers), so
# run-time compilation cannot be banned outright. What an injected payload would need (dunder
# access, imports, builtins that reach the system) never appears in those internal strings.
_SYMPY_PREAMBLE = "from sympy import *"
_DYNAMIC_SOURCE = "<string>"  # filename of run-time source; module imports use real paths
_DANGEROUS_SOURCE_RE = re.compile(
    r"__|\b(?:import|lambda|eval|exec|compile|getattr|setattr|globals|locals|vars|open|system"
    r"|breakpoint|input|help|exit|quit)\b"
)


def _source_text(source: object) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source).decode("utf-8", "replace")
    return source if isinstance(source, str) else ""


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    """Refuse anything beyond pure computation (installed only after warm-up)."""
    if event in _BLOCKED_EVENTS or event.startswith(_BLOCKED_PREFIXES):
        raise PermissionError(f"grader worker: {event} is not allowed")
    if event == "compile" and len(args) > 1 and args[1] == _DYNAMIC_SOURCE:
        text = _source_text(args[0]).strip()
        if text != _SYMPY_PREAMBLE and _DANGEROUS_SOURCE_RE.search(text):
            raise PermissionError("grader worker: refusing to compile suspicious source")
    if event == "open":
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else False
        if writes or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            raise PermissionError("grader worker: writing files is not allowed")


def _limit_memory(limit: int = MEMORY_LIMIT_BYTES) -> None:
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # not fatal: the parent's wall-clock limit still bounds us


def _make_checker():
    """Import math-verify and return ``check(candidate, reference) -> bool``."""
    import logging

    from math_verify import LatexExtractionConfig, parse, verify

    # math-verify warns once that its own timeouts are off; we bound time from the parent.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # LaTeX extraction only: ExprExtractionConfig (a math-verify default) would hand the raw
    # text to sympy's parse_expr, i.e. eval. The LaTeX path parses with ANTLR and gives sympy
    # only number tokens.
    config = [LatexExtractionConfig()]

    def parse_latex(text: str) -> list:
        # Wrapping in \boxed{} makes math-verify take the whole string as one LaTeX answer.
        # parsing_timeout=None: no SIGALRM inside math-verify (the parent owns the clock).
        return parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=None)

    def check(candidate: str, reference: str) -> bool:
        gold, pred = parse_latex(reference), parse_latex(candidate)
        if not gold or not pred:
            return False
        # verify is asymmetric: the reference goes in as gold.
        return bool(verify(gold, pred, timeout_seconds=None))

    return check


def _sandbox_holds() -> bool:
    """Self-test: the installed audit hook refuses a file write, a shell, and compiling an
    injection-shaped string (a constant; nothing here is ever executed)."""
    attempts = (
        lambda: open(os.devnull, "w"),  # noqa: SIM115 - must fail before returning a file
        lambda: os.system("true"),
        lambda: compile("__import__('os')", "<string>", "eval"),
    )
    for attempt in attempts:
        try:
            attempt()
        except PermissionError:
            continue
        return False
    return True


def _handle(check, op: str, a: str, b: str) -> bool:
    if op == "verify":
        return check(a, b)
    if op == "ping":
        return True
    if op == "probe":  # test hook: is the sandbox in place?
        return _sandbox_holds()
    if op == "sleep":  # test hook: simulates a hung comparison
        time.sleep(float(a))
        return True
    raise ValueError(f"unknown op {op!r}")


def serve(conn: Connection) -> None:
    """Worker main loop: answer requests until the pipe closes or ``None`` arrives."""
    _limit_memory()
    check = _make_checker()
    check("\\frac{1}{2}", "0.5")  # warm-up loads sympy's lazy modules before the hook
    check("(1, 2]", "x \\in (1, 2]")
    sys.addaudithook(_audit_hook)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        req_id, op, a, b = msg
        try:
            result, error = _handle(check, op, a, b), None
        except Exception as e:  # RecursionError, MemoryError, parse errors: all mean "no"
            result, error = False, type(e).__name__
        conn.send((req_id, result, error))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
