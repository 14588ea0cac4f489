"""Fault injection for crash tests: kill (or signal) this process at a named point of a step.

    CATJAX_FAULT=rollout:3 python -m catjax.main --config=...     # SIGKILL mid-rollout of step 3
    CATJAX_FAULT=update:2          # SIGKILL once step 2's update is dispatched, before it is read
    CATJAX_FAULT=checkpoint_write:2    # SIGKILL while checkpoint 2 is being written (uncommitted)
    CATJAX_FAULT=rollout:2:TERM    # SIGTERM instead (the trainer saves step 2, then exits)

Steps are numbered as in `metrics.jsonl` and the checkpoint directories (1 = the first update).
Points: "rollout" (the policy's rollouts are sampled, the synthesis has not run), "update" (the
jitted update is in flight), "checkpoint_write" (Orbax has written part of the step into its
temporary directory and is about to commit it). Unset, every call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CATJAX_FAULT"
POINTS = ("rollout", "update", "checkpoint_write")

_step: int | None = None  # the step in progress, for points that do not know it (the round)


def _spec() -> tuple[str, int, int] | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    parts = raw.split(":")
    if len(parts) not in (2, 3) or parts[0] not in POINTS or not parts[1].isdigit():
        raise ValueError(f"${ENV}={raw!r}: use POINT:STEP[:SIGNAL], POINT one of {POINTS}")
    sig = getattr(signal, "SIG" + (parts[2] if len(parts) == 3 else "KILL").upper(), None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"${ENV}={raw!r}: unknown signal {parts[2]!r}")
    return parts[0], int(parts[1]), int(sig)


def set_step(step: int) -> None:
    """The trainer announces the step it is working on (1-based)."""
    global _step
    _step = int(step)


def point(name: str, step: int | None = None) -> None:
    """Fire the configured fault if this is its point and step (default: the announced step)."""
    spec = _spec()
    if spec is None:
        return
    want, at, sig = spec
    step = _step if step is None else step
    if name != want or step != at:
        return
    if name == "checkpoint_write":
        _arm_checkpoint_write(at, sig)
    else:
        os.kill(os.getpid(), sig)


def _arm_checkpoint_write(step: int, sig: int) -> None:
    """Signal this process from inside Orbax's commit of `step`: the first item (or the step itself)
    to be finalized triggers it, so the step's temporary directory is on storage, uncommitted."""
    from orbax.checkpoint._src.path import atomicity

    def inside(tmp) -> bool:
        parts = [p.name for p in (tmp.get(), tmp.get_final(), tmp.get().parent)]
        return str(step) in parts or any(p.startswith(f"{step}.orbax-checkpoint-tmp") for p in parts)

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        original = cls.finalize

        async def finalize(self, *args, _original=original, **kwargs):
            if inside(self):
                os.kill(os.getpid(), sig)
            return await _original(self, *args, **kwargs)

        cls.finalize = finalize
