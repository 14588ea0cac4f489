"""Metric writers: JSONL and TensorBoard event files in the workdir (process 0 only), plots.

A gs:// workdir is written through `storage.Workdir`: a local mirror, whose metrics.jsonl is
fetched from the bucket at start (a resumed run appends to it) and uploaded, with the TensorBoard
events, after every write (at most once a second: GCS takes about one update per second of an
object; rows held back go up with a later write or at `close()`)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import jax

from catjax import storage

PUSH_INTERVAL_S = 1.0  # gs:// workdirs: least time between two uploads of metrics.jsonl


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX tries `import torch`
    (3 s) only to accept torch tensors, and we log floats."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` fails at once
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends one JSON line per step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = storage.Workdir(workdir)
        self._tb = None
        self._pushed_at, self._unpushed = -float("inf"), False
        if not self.enabled:  # no local mirror: other processes never touch the workdir
            self.path = os.path.join(workdir, "metrics.jsonl")
            return
        self.path = self.workdir.file("metrics.jsonl")  # local, or the gs:// workdir's mirror
        os.makedirs(self.workdir.local, exist_ok=True)
        self.workdir.pull("metrics.jsonl")  # gs://: the rows of the run being resumed
        try:
            self._tb = _summary_writer()(self.workdir.file("tb"))
        except ImportError:  # TensorBoard files are a convenience, JSONL is the record
            self._tb = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        self._push()

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (written before a crash, redone after resume)."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)
        self._push(force=True)

    def _push(self, force: bool = False) -> None:
        """Upload metrics.jsonl and the TensorBoard events of a gs:// workdir (local: nothing)."""
        if not self.workdir.remote:
            return
        now = time.monotonic()
        if force or now - self._pushed_at >= PUSH_INTERVAL_S:
            self.workdir.push("metrics.jsonl", "tb")
            self._pushed_at, self._unpushed = now, False
        else:
            self._unpushed = True

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.enabled and (self._unpushed or self._tb is not None):
            self._push(force=True)
        self._tb = None


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(path: str, out_png: str, keys: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(path)
    keys = tuple(k for k in keys if any(k in r for r in rows))
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
