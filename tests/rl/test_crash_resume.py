"""Crash anywhere, lose nothing: every interrupted CaT-RL run ends bit-identical to one that was not.

One uninterrupted reference run (the tiny config: 3 steps, 1 question x G=2, 4 new tokens) is shared
by every test here, across xdist workers too. The interrupted runs are real `python -m catjax.main`
processes that kill themselves at a named point (`CATJAX_FAULT`, see `catjax.faults`); their resumes
run in-process. A persistent compilation cache, filled by the reference run, keeps each process to
seconds.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import checkpoint, metrics
from catjax.cat import round as cat_round
from catjax.checkpoint import Checkpointer, CheckpointError
from catjax.rl import trainer
from tests.gcs_emulator import gcs_emulator  # noqa: F401  (pytest fixture)
from tests.tiny_model import compile_cache, override

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
# The same settings as CLI overrides and as in-process config edits.
# Loss-level KL: a random model's rewards all tie (0), which moves nothing under
# rl.tied_groups="zero"; the KL term's gradient moves the weights under either setting, so the
# bit-identity checks below compare weights that changed.
OVERRIDES = {"steps": STEPS, "batch_size": 1, "export": False, "round.num_rollouts": 2,
             "round.max_new_tokens": 4, "round.synthesis_max_new_tokens": 4, "checkpoint.keep": 5,
             "rl.kl_mode": "loss"}
# Metrics that are functions of the run (not of the clock).
DETERMINISTIC = ("loss", "kl_ref", "grad_norm", "reward_mean", "entropy", "clip_frac", "skipped",
                 "response_length")


@dataclasses.dataclass(frozen=True)
class Reference:
    workdir: Path
    data: Path
    cache: Path

    def state(self, step: int):
        return _state(self.workdir / "checkpoints", step)

    def rows(self):
        return metrics.read(str(self.workdir / "metrics.jsonl"))


def _config(ref: Reference, **changes):
    from configs import cat_rl

    config = cat_rl.get_config("model=tiny,runlocal")
    return override(config, {**OVERRIDES, "data.path": str(ref.data), **changes})




@functools.lru_cache(maxsize=1)
def _tiny_model(model_config: str):
    from catjax import loading
    from configs import cat_rl

    return loading.load_model(cat_rl.get_config("model=tiny,runlocal").model)


def _run_inprocess(ref: Reference, workdir: Path, **changes):
    """`main.run` of the config (the job is `trainer.train`), with the tiny model loaded once per
    process: the same seed-0 weights `python -m catjax.main` initializes, copied (they are donated)."""
    config = _config(ref, **changes)
    m = _tiny_model(str(config.model))
    policy = cat_round.Model(m.cfg, jax.tree.map(jnp.copy, m.params), m.tokenizer)
    # No curves.png (2 s of matplotlib per run; the plot has its own test in test_trainer.py).
    with compile_cache(ref.cache), mock.patch.object(metrics, "plot_curves", lambda *a, **k: None):
        return trainer.train(config, str(workdir), policy=policy)


def _state(directory: Path, step: int):
    state, meta = Checkpointer(str(directory)).restore(step)
    assert meta["step"] == step
    return jax.device_get(state)


def _assert_bit_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) > 10
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _assert_same_rows(rows, ref_rows):
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    for r, want in zip(rows, ref_rows, strict=True):
        for k in DETERMINISTIC:
            assert r.get(k) == want.get(k), (r["step"], k)


def _shared_root(tmp_path_factory) -> Path:
    """One directory for the whole test session, shared by xdist workers."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:
        return tmp_path_factory.mktemp("crash")
    root = tmp_path_factory.getbasetemp().parent / f"catjax-crash-{uid}"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    root = _shared_root(tmp_path_factory)
    ref = Reference(root / "reference", root / "questions.jsonl", root / "jax-cache")
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker runs it, the others wait and read it
        if not (root / "done").exists():
            # Four questions of one length: every step has the same shapes (one compile each).
            ref.data.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)})
                                        + "\n" for i in range(4)))
            _run_inprocess(ref, ref.workdir)
            (root / "done").touch()
    assert Checkpointer(str(ref.workdir / "checkpoints")).all_steps() == [1, 2, 3]
    return ref


def _run_cli(ref: Reference, workdir: Path, fault: str, *extra: str, timeout: float = 300):
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "CATJAX_FAULT": fault,
           "JAX_COMPILATION_CACHE_DIR": str(ref.cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, "-m", "catjax.main", "--config=configs/cat_rl.py:model=tiny,runlocal",
           f"--workdir={workdir}", f"--config.data.path={ref.data}", *args, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tmp_dirs(directory: Path, step: int) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(f"{step}.orbax-checkpoint-tmp")]


# --------------------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("fault", ["rollout:3", "update:3", "checkpoint_write:2"])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, capsys, fault):
    point, step = fault.split(":")
    step = int(step)
    work = tmp_path / "run"
    proc = _run_cli(reference, work, fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = work / "checkpoints"
    left = _tmp_dirs(ckpts, step)  # before a Checkpointer opens the directory (it cleans up)
    finalized = Checkpointer(str(ckpts)).all_steps()
    rows = [r["step"] for r in metrics.read(str(work / "metrics.jsonl"))]
    if point == "checkpoint_write":
        # Killed inside Orbax's write of step 2: its temporary directory is there, uncommitted...
        assert left, os.listdir(ckpts)
        assert finalized == [1]  # ...and never listed, so never loaded.
        assert rows in ([1, 2], [1, 2, 3])  # the write is asynchronous: step 3 may have run
    else:
        # Step 1 was waited for before step 2's save; step 2 may or may not have been committed.
        assert finalized in ([1], [1, 2]) and rows == [1, 2]
    capsys.readouterr()
    out = _run_inprocess(reference, work)
    assert f"resumed from step {finalized[-1]}" in capsys.readouterr().out
    _assert_bit_identical(_state(ckpts, STEPS), reference.state(STEPS))
    _assert_bit_identical(jax.device_get(out["params"]), reference.state(STEPS)["params"])
    _assert_same_rows(metrics.read(str(work / "metrics.jsonl")), reference.rows())
    assert not _tmp_dirs(ckpts, step)  # the dead writer's leftovers were cleaned up
    assert Checkpointer(str(ckpts)).all_steps() == [1, 2, 3]


# --------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_the_current_step_then_resume_is_bit_identical(reference, tmp_path, capsys):
    work = tmp_path / "run"
    # Checkpoints are not due (every 100 steps): only the preemption makes one.
    proc = _run_cli(reference, work, "rollout:2:TERM", "--config.checkpoint.every=100",
                    "--config.export=True")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preempted: saved step 2, exiting" in proc.stdout
    assert not (work / "export").exists()  # an unfinished model is not exported
    assert Checkpointer(str(work / "checkpoints")).all_steps() == [2]
    assert [r["step"] for r in metrics.read(str(work / "metrics.jsonl"))] == [1, 2]
    _assert_bit_identical(_state(work / "checkpoints", 2), reference.state(2))
    capsys.readouterr()
    _run_inprocess(reference, work, **{"checkpoint.every": 100})
    assert "resumed from step 2" in capsys.readouterr().out
    _assert_bit_identical(_state(work / "checkpoints", STEPS), reference.state(STEPS))
    _assert_same_rows(metrics.read(str(work / "metrics.jsonl")), reference.rows())


# ------------------------------------------------------------------------------ gs:// store gone


def test_gcs_store_gone_mid_run_fails_clearly_and_keeps_the_last_good_step(
        reference, tmp_path, monkeypatch, gcs_emulator):  # noqa: F811
    emu = gcs_emulator
    url = f"{emu.url}/run/checkpoints"
    saved = dict(checkpoint.GCS_RETRIES)
    checkpoint.set_gcs_retries(max_retries=2, initial_delay_s=0.05, max_delay_s=0.2)
    calls, stopped = [], []
    run_round = trainer.cat_round.run_round

    def round_then_outage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 2: once step 1 is committed, the store goes away
            deadline = time.monotonic() + 60
            while "run/checkpoints/1/commit_success.txt" not in emu.objects("run/checkpoints/1/"):
                assert time.monotonic() < deadline, "step 1 was never committed"
                time.sleep(0.05)
            emu.stop()
            stopped.append(time.monotonic())
        return run_round(*args, **kwargs)

    monkeypatch.setattr(trainer.cat_round, "run_round", round_then_outage)
    try:
        with pytest.raises(CheckpointError) as err:
            _run_inprocess(reference, tmp_path / "run", **{"checkpoint.directory": url})
        assert time.monotonic() - stopped[0] < 60  # bounded retries, not tensorstore's 15 minutes
        msg = str(err.value)  # e.g. "<url>: listing: GCS unreachable after 2 attempts: ..."
        assert msg.startswith(url) and "\n" not in msg, msg
        assert any(w in msg for w in ("unreachable", "did not finish", "failed")), msg
        emu.start()  # the store comes back: the last good step is intact and loads bit-exact
        assert Checkpointer(url).all_steps() == [1]
        state, meta = Checkpointer(url).restore()
        assert meta == {"step": 1}
        _assert_bit_identical(jax.device_get(state), reference.state(1))
    finally:
        checkpoint.set_gcs_retries(**saved)



# ------------------------------------------------------------------------------- NaN / inf steps


def test_non_finite_steps_are_skipped_counted_and_leave_the_state_alone(reference, tmp_path,
                                                                         monkeypatch):
    build = trainer.build_batch
    steps = []

    def poisoned(*args, **kwargs):
        batch = dict(build(*args, **kwargs))
        steps.append(len(steps) + 1)
        if steps[-1] == 2:  # NaN rewards: a NaN loss
            batch["rewards"] = np.full_like(batch["rewards"], np.nan)
        if steps[-1] == 3:  # one infinite reward: its group's advantages, the loss, NaN
            rewards = batch["rewards"].copy()
            rewards[0] = np.inf
            batch["rewards"] = rewards
        return batch

    monkeypatch.setattr(trainer, "build_batch", poisoned)
    _run_inprocess(reference, tmp_path / "run")
    rows = metrics.read(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 1.0]
    for r in rows[1:]:
        assert not (np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])), r
    ckpts = tmp_path / "run" / "checkpoints"
    first = _state(ckpts, 1)
    _assert_bit_identical(first, reference.state(1))
    for step in (2, 3):  # params, optimizer state (step count included) and anchor: untouched
        _assert_bit_identical(_state(ckpts, step), first)
