"""Suite-wide set-up: one on-disk XLA compilation cache, unoptimised XLA:CPU code generation, torch
on one thread, and a local OpenAI-compatible server for the judge tests (tests/cat and
tests/test_guarantees.py)."""

import os
from collections.abc import Iterator
from pathlib import Path

# Many tests (and the subprocesses they start, which inherit the environment) compile the same
# tiny programs: a persistent cache keeps every program, however quick to compile (a fresh
# process would otherwise recompile dozens of 0.1-0.5 s ones). One per xdist worker: JAX writes
# a cache entry in place, not atomically, and a worker that read a program while the other was
# still writing it died in deserialisation (a segfault in tests/test_sft.py, 2026-11-29). A
# worker's subprocesses run one at a time and share its cache. Set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(
    Path(__file__).resolve().parent.parent / ".cache" / "jax-tests"
    / os.environ.get("PYTEST_XDIST_WORKER", "main")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The tests compile far more than they run: LLVM without optimisation (XLA's backend level 0)
# took the whole suite from 1237 to 972 s on 2 cores; only the long runs got slower (toy CaT-RL
# 91 -> 117 s). Subprocesses inherit it (tests/devices.py adds device counts to it). Benchmarks
# and real runs keep XLA's default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

# torch (the transformers references) on one thread: its OpenMP workers spin at barriers, and with
# the other xdist worker on the second core they wait on each other. SmolLM2's generate-parity
# test beside a busy JAX process: 40.8 s with two threads, 22.4 s with one; the whole suite, cold,
# 760 -> 696 s (test_smollm2 130 -> 96 s, test_sampling 153 -> 121 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def hf_pair(request, tmp_path_factory):
    """A tiny random `transformers` model of each family and catjax's load of it (float32)."""
    from catjax import models
    from tests.hf_fixtures import make_hf_model

    d = str(tmp_path_factory.mktemp(request.param))
    model = make_hf_model(request.param, d)
    cfg, params = models.from_pretrained(d)
    return model, cfg, params
