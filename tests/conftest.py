"""Suite-wide set-up: one on-disk XLA compilation cache, and a local OpenAI-compatible server
for the judge tests (tests/cat and tests/test_guarantees.py)."""

import os
from collections.abc import Iterator
from pathlib import Path

# Many tests (and the subprocesses they start, which inherit the environment) compile the same
# tiny programs: both xdist workers share one persistent cache, which keeps every program, however
# quick to compile (a fresh process would otherwise recompile dozens of 0.1-0.5 s ones). Set
# before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from tests.cat.test_judges import FakeServer  # noqa: E402


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer()
    s.thread.start()
    yield s
    s.stop.set()  # wake sleeping handlers
    s.httpd.shutdown()
    s.httpd.server_close()
