"""Multi-controller JAX: 2 processes on one machine (jax.distributed over 127.0.0.1, CPU
collectives, 1 CPU device each) train exactly like 1 process on the same global batch, and
a one-process checkpoint resumes in two processes.

The single process gets 2 CPU devices, so both runs split the same mesh the same way and differ
only in being one or two processes: then the parameters agree to the last bits. (Against one
device, summation order differs at round-off level, and Adam's first steps, g / (|g| + eps),
blow that up to ~1e-4 of lr-sized steps for parameters whose gradient is near eps.)

Every run is `python -m catjax.main` in fresh subprocesses with a timeout (`jax.distributed`
waits 300 s for a missing peer otherwise).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from catjax import checkpoint, metrics
from tests.devices import xla_flags

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
# The tiny random Qwen 3 (SmolLM2 tokenizer); global batch 4 questions x G=2, 8 new tokens. The
# 4 questions are the whole set, so every step pads prompts alike and nothing recompiles.
FLAGS = ["--config=configs/cat_rl.py:model=tiny,runlocal", "--config.batch_size=4",
         "--config.data.limit=4", "--config.round.num_rollouts=2",
         "--config.round.max_new_tokens=8", "--config.round.synthesis_max_new_tokens=8",
         "--config.rl.kl_mode=loss", "--config.rl.kl_coef=0.1", "--config.checkpoint.every=1"]


def _init_checkpoint(workdir: Path) -> dict:
    """Step 0 with the policy a perturbed copy of the anchor. A random model earns no reward, so
    its tied rewards give at most z-scored round-off: the loss-level KL to the anchor (FLAGS)
    gives the update a real direction."""
    from catjax import models
    from catjax.rl import trainer
    from configs import cat_rl

    config = cat_rl.get_config("model=tiny,runlocal")
    cfg = models.get_preset("tiny_qwen3", vocab_size=config.model.vocab_size)
    # `models.init_params` in numpy (norms at 1, the rest N(0, 0.02)): no compiles here.
    rng = np.random.default_rng(0)
    anchor = jax.tree_util.tree_map_with_path(
        lambda path, shape: (np.ones(shape) if "norm" in path[-1].key
                             else 0.02 * rng.standard_normal(shape)).astype(np.float32),
        models.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    policy = jax.tree.map(lambda a: (a + 0.3 * a.std() * rng.standard_normal(a.shape)).astype(a.dtype),
                          anchor)
    opt_state = trainer.make_optimizer(config.optimizer, 1).init(policy)
    with checkpoint.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        ckpt.save(0, {"params": policy, "opt_state": opt_state, "anchor": anchor}, meta={"step": 0},
                  force=True)
    return policy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: Path, num_processes: int, steps: int,
           *extra: str) -> list[tuple[subprocess.Popen, Path]]:
    """Launch one run (all its processes) in the background; logs go to files (no pipe stalls).
    2 devices in all: 1 process with 2 CPU devices, or N processes with 1 each."""
    devices = 2 if num_processes == 1 else 1
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               # A program cache per run: a resumed run that loaded an earlier run's programs
               # from a shared cache hung in its first collective (XLA:CPU, gloo).
               XLA_FLAGS=xla_flags(devices),
               JAX_COMPILATION_CACHE_DIR=str(workdir.parent / f"jax_cache_{workdir.name}"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    port = _free_port()
    procs = []
    for pid in range(num_processes):
        cmd = [sys.executable, "-m", "catjax.main", *FLAGS, f"--config.steps={steps}", *extra,
               f"--workdir={workdir}"]
        if num_processes > 1:
            cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                    f"--process_id={pid}"]
        log = workdir.parent / f"{workdir.name}.{pid}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                           stderr=subprocess.STDOUT), log))
    return procs


def _wait(*runs: list[tuple[subprocess.Popen, Path]], everyone: bool = False) -> list[str]:
    """Wait for every process (killing all past the deadline); return process 0's log of each run
    (every process's with `everyone`)."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc, log in (p for run in runs for p in run):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{log.name} timed out:\n{log.read_text()[-3000:]}") from None
            assert proc.returncode == 0, f"{log.name} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    finally:
        for proc, _ in (p for run in runs for p in run):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [log.read_text() for run in runs for _, log in (run if everyone else run[:1])]


def _state(workdir: Path, step: int | None = None) -> tuple[int, dict]:
    """A checkpoint of a run (default: the latest), restored in this (single) process as host
    arrays."""
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        state, meta = ckpt.restore(step)
    finally:
        ckpt.close()
    return int(meta["step"]), jax.device_get(state)


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_process_parts_concatenate_to_the_global_batch():
    """Process p's part of each step is the p-th contiguous slice of the one-process batch, for any
    process count and from any resume step; parts of one step are disjoint."""
    import itertools

    from catjax import data

    items = list(range(23))
    for procs in (1, 2, 4):
        for start in (0, 3, 5):
            whole = list(itertools.islice(data.batches(items, 8, seed=5, start_step=start), 7))
            parts = [list(itertools.islice(data.process_batches(
                items, 8, seed=5, start_step=start, process_index=p, process_count=procs), 7))
                for p in range(procs)]
            for step, batch in enumerate(whole):
                assert [x for part in parts for x in part[step]] == batch
                assert all(len(part[step]) == 8 // procs for part in parts)
    with pytest.raises(ValueError, match="does not split"):
        data.process_batches(items, 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="not in"):
        data.process_batches(items, 8, seed=0, process_index=2, process_count=2)


UNEVEN = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from catjax import parallel
    pid = int(sys.argv[1])
    parallel.initialize_distributed(f"127.0.0.1:{sys.argv[2]}", 2, pid)
    from catjax import models, sampling, scoring
    from catjax.cat import rubrics
    cfg = models.get_preset("tiny_llama")
    local = models.init_params(cfg, jax.random.key(0))
    mesh = parallel.make_mesh()
    shared = jax.device_put(local, parallel.param_shardings(models.param_shapes(cfg),
                                                            models.logical_axes(cfg), mesh))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
    mine = prompts[:3] if pid == 0 else prompts[3:]  # 3 prompts here, 1 there
    kw = dict(num_samples=2, max_new_tokens=6, rng=jax.random.key(3), temperature=0.9, top_p=0.9,
              stop_ids=(3,), logprobs=True)
    out = sampling.sample(cfg, shared, mine, **kw)
    # The global batch: 3 prompts per process, process 1's padded with its last one. The same
    # batch on this process's device alone draws the same tokens.
    ref = sampling.sample(cfg, local, prompts[:3] + [prompts[3]] * 3, **kw)
    rows = slice(0, 6) if pid == 0 else slice(6, 8)
    assert isinstance(out.tokens, np.ndarray) and out.tokens.shape == (2 * len(mine), 6)
    np.testing.assert_array_equal(out.tokens, np.asarray(ref.tokens)[rows])
    np.testing.assert_allclose(out.logprobs, np.asarray(ref.logprobs)[rows], atol=1e-5)
    # The judge's forward: process 1 has nothing to score and still takes part.
    got = scoring.last_token_logits(cfg, shared, prompts[:3] if pid == 0 else [], batch_size=2)
    want = scoring.last_token_logits(cfg, local, prompts[:3])
    assert got.shape == ((3, cfg.vocab_size) if pid == 0 else (0, cfg.vocab_size))
    np.testing.assert_allclose(got, want[:len(got)], atol=1e-5)
    # Grouped (one response judged on several criteria), 3 rows here and 2 there: each group's
    # shared prefix runs once, on the process that holds it.
    head = [[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25, 26]]
    mine = ([head[0] + [30], head[1] + [33], head[0] + [31, 32]] if pid == 0
            else [head[1] + [40], head[1] + [41, 42]])
    keys = ["a", "b", "a"] if pid == 0 else ["c", "c"]
    got = scoring.last_token_logits(cfg, shared, mine, batch_size=4, groups=keys)
    want = scoring.last_token_logits(cfg, local, mine)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Rubric retries: a process with nothing left to re-ask joins every round of the others.
    calls = []
    def generate(convs):
        calls.append(len(convs))
        return ["no rubric here"] * len(convs)
    rubrics.propose_rubric(generate, ["x", "y"] if pid == 0 else [], min_items=2, retries=2)
    assert len(calls) == 3, calls
    print("OK")
""")


def test_sampler_and_judge_forward_with_uneven_process_shares(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    port = _free_port()
    run = []
    for pid in range(2):
        log = tmp_path / f"uneven.{pid}.log"
        with open(log, "w") as f:
            run.append((subprocess.Popen([sys.executable, "-c", UNEVEN, str(pid), str(port)], cwd=ROOT,
                                         env=env, stdout=f, stderr=subprocess.STDOUT), log))
    assert all("OK" in log for log in _wait(run, everyone=True))


def test_two_processes_train_like_one_and_checkpoints_cross_over(tmp_path):
    """One process trains 3 steps, two processes 2 steps on the same global batches: equal at
    step 2, and the two-process checkpoint reads back here. Then two processes resume the
    one-process run's step 2 and reach its step 3 (the pod's case: many processes reading one
    checkpoint). Five processes in all: compiling the trainer is most of each one's time."""
    one, two = tmp_path / "one", tmp_path / "two"
    start = _init_checkpoint(one)
    shutil.copytree(one, two)
    _wait(_start(one, 1, steps=3), _start(two, 2, steps=2))
    (s1, st1), (s2, st2) = _state(one, step=2), _state(two)
    assert s1 == s2 == 2
    diff, moved = _max_diff(st1["params"], st2["params"]), _max_diff(st1["params"], start)
    print(f"1 vs 2 processes after 2 steps: max param diff {diff:.3g} (update size {moved:.3g})")
    assert moved > 1e-4 and diff <= 1e-7
    # Metrics: written once (process 0), and of the global batch: the same as one process's.
    m1, m2 = metrics.read(str(one / "metrics.jsonl"))[:2], metrics.read(str(two / "metrics.jsonl"))
    assert [r["step"] for r in m2] == [1, 2]
    for key in ("reward_mean", "reward_std", "response_length", "round/synthesis_no_answer"):
        assert [r[key] for r in m1] == [r[key] for r in m2], key
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=1e-4, atol=1e-7)
    assert os.path.exists(two / "export" / "config.json")  # gathered, written by process 0

    # Cross-over: the 1-process run's step 2, resumed by 2 processes, ends where it did.
    to_two = tmp_path / "to_two"
    shutil.copytree(one, to_two)
    shutil.rmtree(to_two / "checkpoints" / "3")
    with checkpoint.Checkpointer(to_two / "checkpoints", async_save=False) as ckpt:
        assert ckpt.latest_step() == 2
    (log,) = _wait(_start(to_two, 2, 3, "--config.export=False"))
    assert "resumed from step 2" in log, log
    (s3a, st3a), (s3b, st3b) = _state(to_two), _state(one)
    assert s3a == s3b == 3
    diff3 = _max_diff(st3a["params"], st3b["params"])
    print(f"after resuming across topologies: max param diff {diff3:.3g}")
    assert _max_diff(st3a["params"], st1["params"]) > 1e-4 and diff3 <= 1e-7
    assert [r["step"] for r in metrics.read(str(to_two / "metrics.jsonl"))] == [1, 2, 3]


EVAL = textwrap.dedent("""
    import json, os, sys
    pid, procs, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from catjax import parallel
    if procs > 1:
        parallel.initialize_distributed(f"127.0.0.1:{port}", procs, pid)
    from catjax import evaluate
    from configs import eval_math500
    config = eval_math500.get_config("model=tiny,n=3,g=2")
    config.model.init, config.model.tokenizer = "random:tiny_qwen3", "smollm2"
    config.model.vocab_size = 49152
    config.round.max_new_tokens = config.round.synthesis_max_new_tokens = 8
    config.eval.update(g_values=(2,), batch_size=1, baselines=("majority", "mutual"))
    summary = evaluate.run(config, workdir)
    assert (summary != {}) == (pid == 0), summary  # process 0 summarises
    print("OK")
""")


def test_evaluation_over_two_processes_writes_the_records_of_one(tmp_path):
    """Three questions in batches of one over two processes (the second idle in the last turn):
    process 0 writes the same records as a one-process run, then a rerun samples nothing."""
    # A program cache of its own (see `_start`: collectives loaded from the suite's shared cache
    # have hung in gloo).
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))

    def start(procs: int, name: str) -> list[tuple[subprocess.Popen, Path]]:
        port, run = _free_port(), []
        for pid in range(procs):
            log = tmp_path / f"{name}.{pid}.log"
            with open(log, "w") as f:
                run.append((subprocess.Popen(
                    [sys.executable, "-c", EVAL, str(pid), str(procs), str(port),
                     str(tmp_path / f"{name}{pid}")], cwd=ROOT, env=env, stdout=f,
                    stderr=subprocess.STDOUT), log))
        return run

    assert all("OK" in log for log in _wait(start(1, "one"), start(2, "two"), everyone=True))
    records = lambda d: (tmp_path / d / "records.jsonl").read_text().splitlines()
    assert len(records("one0")) == 3 and records("two0") == records("one0")
    assert not (tmp_path / "two1" / "records.jsonl").exists()
    assert all("OK" in log for log in _wait(start(2, "two"), everyone=True))  # resumed: all done
    assert records("two0") == records("one0")
