"""Training checkpoints with Orbax, in a local directory or under `gs://bucket/path`.

    ckpt = Checkpointer(workdir + "/checkpoints", max_to_keep=3, save_interval_steps=100)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state=abstract)    # abstract: ShapeDtypeStructs + shardings
    is_preempted = install_preemption_handler()
    for step in ...:
        ckpt.save(step, {"params": p, "opt_state": o}, meta={"data_pos": i}, force=is_preempted())
        if is_preempted():
            break
    ckpt.close()                                                # waits for the last async write

Layout: `<directory>/<step>/{state,meta}`: "state" is the array pytree (Orbax StandardSave: OCDBT +
zarr via tensorstore; any sharding, restored onto any other), "meta" a small JSON document.

Atomicity. Orbax writes a step into `<step>.orbax-checkpoint-tmp-<t>` and renames it when complete
(local disks), or writes `<step>/commit_success.txt` last (GCS, which cannot rename directories).
`latest_step()` lists the storage afresh and reports only finalized steps, so a step whose writer was
killed, or that is still being written asynchronously, is never restored. A `Checkpointer` removes
unfinalized step directories left by a dead writer before its first save (Orbax's
`cleanup_tmp_directories`), so only one writer may use a directory at a time; a Checkpointer that
only lists and restores never removes anything.

Failures and timeouts (what bounds a call when storage goes away):
* Deadline: each storage operation a call makes (opening, listing, starting a save, waiting for an
  async save, restoring) runs in a helper thread under a wall-clock limit, `timeout_s` (default
  1800 s; `save` = wait for the previous save + listing + start, so at most a few times that). Past
  it, `CheckpointError` is raised and this checkpointer refuses further work. The abandoned write
  cannot finalize a step (the commit comes last, after every write succeeded); at interpreter exit
  Python may still wait for Orbax's I/O threads until their own retries below give up.
* gs:// only: before opening, each save and each listing (so `latest_step`, `restore`, `wait`), a
  one-request probe (tensorstore GET of a missing object, retried per `GCS_RETRIES`) checks that the
  bucket answers, so a store that is gone fails in seconds rather than after the retries below.
* Arrays (tensorstore): `gcs_request_retries` = `GCS_RETRIES` (6 attempts, backoff 1 s doubling to at
  most 16 s: about a minute per request), instead of tensorstore's default of 32 attempts with
  backoff up to 32 s (about 15 minutes). Change with `set_gcs_retries(...)`.
* Small files (metadata, JSON, commit markers, listings) go through gcsfs: 6 attempts, backoff about
  1, 2, 4, 8, 16 s (20-35 s in all), not configurable there; the deadline bounds it anyway.
* gcsfs caches directory listings forever; they are dropped before each listing, so steps written by
  other processes are seen.
Errors are one line: `CheckpointError("<directory>: save of step 12 failed: HTTP 503")`. A failed save
never touches the last finalized checkpoint: older steps are only deleted (`max_to_keep`) after a newer
one is finalized.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

STATE, META = "state", "meta"
DEFAULT_TIMEOUT_S = 1800.0
GCS_RETRIES = {"max_retries": 6, "initial_delay_s": 1.0, "max_delay_s": 16.0}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (storage unreachable, timed out, or corrupt)."""


class ShapeMismatch(ValueError):
    """A saved item's tree structure or shapes differ from the ones asked for."""


# --------------------------------------------------------------------------- GCS retry policy


def _ts_retries() -> dict:
    r = GCS_RETRIES
    return {"max_retries": int(r["max_retries"]), "initial_delay": f"{float(r['initial_delay_s'])}s",
            "max_delay": f"{float(r['max_delay_s'])}s"}


def _apply_gcs_retries() -> None:
    """Put `GCS_RETRIES` into the tensorstore contexts Orbax builds for array reads and writes.

    Orbax 0.12 has no public option for this; it deep-copies these module-level dicts into every
    `ts.Context`, so adding the `gcs_request_retries` resource to them applies it (only the `gcs`
    kvstore driver reads that resource; local files are unaffected)."""
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
    except ImportError:  # another Orbax layout: tensorstore's defaults apply (the deadline still does)
        return
    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        ctx = getattr(tsu, name, None)
        if isinstance(ctx, dict):
            ctx["gcs_request_retries"] = _ts_retries()


def set_gcs_retries(max_retries: int = 6, initial_delay_s: float = 1.0, max_delay_s: float = 16.0) -> None:
    """Retry policy of every GCS request tensorstore makes for checkpoints (process-wide)."""
    GCS_RETRIES.update(max_retries=max_retries, initial_delay_s=initial_delay_s, max_delay_s=max_delay_s)
    _apply_gcs_retries()


# --------------------------------------------------------------------------- meta (JSON)


def _encode_meta(x: Any, path: str = "meta") -> Any:
    """JSON-ready copy of `x`; arrays (incl. typed PRNG keys) become tagged dicts, tuples lists."""
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: JSON object keys must be str, got {k!r}")
            out[k] = _encode_meta(v, f"{path}[{k!r}]")
        return out
    if isinstance(x, list | tuple):
        return [_encode_meta(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return {"__prng_key__": str(jax.random.key_impl(x)),
                "data": _encode_meta(jax.random.key_data(x), path)}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray | jax.Array):
        a = np.asarray(x)
        return {"__ndarray__": a.reshape(-1).tolist(), "dtype": str(a.dtype), "shape": list(a.shape)}
    raise TypeError(f"{path}: {type(x).__name__} is not JSON-serialisable")


def _decode_meta(x: Any) -> Any:
    if isinstance(x, list):
        return [_decode_meta(v) for v in x]
    if not isinstance(x, dict):
        return x
    if set(x) == {"__ndarray__", "dtype", "shape"}:
        return np.asarray(x["__ndarray__"], dtype=jax.numpy.dtype(x["dtype"])).reshape(x["shape"])
    if set(x) == {"__prng_key__", "data"}:
        return jax.random.wrap_key_data(_decode_meta(x["data"]), impl=x["__prng_key__"])
    return {k: _decode_meta(v) for k, v in x.items()}


# --------------------------------------------------------------------------- helpers


def _one_line(e: BaseException, limit: int = 400) -> str:
    msg = " ".join(str(e).split())
    msg = msg.split(" [tensorstore_spec=")[0]  # tensorstore appends the whole JSON spec
    code = getattr(e, "code", None)
    if isinstance(code, int):  # HTTP errors (gcsfs' HttpError prints as ", 503")
        detail = msg.strip(" ,")
        msg = f"HTTP {code}" + ("" if detail in ("", str(code)) else f": {detail}")
    if len(msg) > limit:
        msg = msg[:limit] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _forget_gcs_listings() -> None:
    """Drop gcsfs' cached directory listings (kept forever by default) so that steps written or
    deleted by another process or by tensorstore are seen; Orbax lists and stats through gcsfs."""
    filesystems = []
    try:
        from etils.epath import backend

        filesystems.append(backend.fsspec_backend.fs("gs://"))  # the instance epath (Orbax) uses
    except Exception:  # other etils versions / TensorFlow backend: nothing cached here
        pass
    try:
        import gcsfs

        filesystems.extend(gcsfs.GCSFileSystem._cache.values())
    except Exception:
        pass
    for fs in filesystems:
        with contextlib.suppress(Exception):
            fs.invalidate_cache()


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_leaf(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x  # numpy arrays / Python scalars restore as such


class Checkpointer:
    """Orbax `CheckpointManager` over items "state" (array pytree) and "meta" (JSON)."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True, timeout_s: float | None = DEFAULT_TIMEOUT_S):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = str(directory).rstrip("/")
        self.timeout_s = timeout_s
        self._is_gcs = self.directory.startswith("gs://")
        if not self._is_gcs:  # Orbax (tensorstore) refuses relative paths, e.g. --workdir=runs/x
            self.directory = os.path.abspath(self.directory)
        self._failed: CheckpointError | None = None
        self._pending: int | None = None  # step of an async save not yet waited for
        self._closed = False
        self._async = async_save
        self._interval = max(1, int(save_interval_steps))
        if self._is_gcs:
            _apply_gcs_retries()
            self._probe("open")
        self._options = dict(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                             enable_async_checkpointing=async_save)
        self._writer = False  # True once `save` has reopened Orbax's manager to write
        self._warned_incomplete = False
        self._mgr = self._bounded("open", lambda: self._open_manager(cleanup=False))

    def _open_manager(self, cleanup: bool):
        """Orbax's manager; `cleanup` for a writer's. It creates the directory and removes
        unfinalized step directories, in a background thread started here and awaited before the
        first save. Only a writer may: a reader (an evaluation reading a live run's checkpoints)
        could delete the step the run is writing, two managers opened one after the other would
        race on the same rmtree, and a mistyped path would be left behind as an empty directory."""
        ocp = self._ocp
        options = ocp.CheckpointManagerOptions(**self._options, create=cleanup,
                                               cleanup_tmp_directories=cleanup)
        handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ----------------------------------------------------------------------- internals

    def _bounded(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` under the deadline; turn failures into a one-line `CheckpointError`."""
        if self._failed is not None:
            raise self._failed
        box: dict[str, Any] = {}

        def run():
            try:
                box["out"] = fn()
            except BaseException as e:  # re-raised in the caller's thread
                box["err"] = e

        t = threading.Thread(target=run, name=f"catjax-checkpoint-{what}", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            self._failed = CheckpointError(
                f"{self.directory}: {what} did not finish within {self.timeout_s:g} s (storage "
                f"unreachable or too slow); the last finalized checkpoint is intact")
            raise self._failed
        err = box.get("err")
        if err is not None:
            if isinstance(err, FileNotFoundError | CheckpointError | KeyboardInterrupt):
                raise err
            raise CheckpointError(f"{self.directory}: {what} failed: {_one_line(err)}") from err
        return box.get("out")

    def _probe(self, what: str) -> None:
        """One GET against the bucket (gs:// only), retried per `GCS_RETRIES`."""
        import tensorstore as ts

        bucket, _, path = self.directory[len("gs://"):].partition("/")
        spec = {"driver": "gcs", "bucket": bucket, "path": path + "/" if path else "",
                "context": {"gcs_request_retries": _ts_retries()}}
        try:
            ts.KvStore.open(spec).result().read(".catjax-probe").result()
        except Exception as e:
            raise CheckpointError(f"{self.directory}: {what}: GCS unreachable after "
                                  f"{GCS_RETRIES['max_retries']} attempts: {_one_line(e)}") from e

    def _finalized_steps(self) -> list[int]:
        if self._is_gcs:
            self._probe("listing")
            _forget_gcs_listings()
            return sorted(self._ocp.path.step.checkpoint_steps(self.directory))
        steps, whole = self._local_steps()
        if len(whole) < len(steps) and not self._warned_incomplete:
            self._warned_incomplete = True
            print(f"checkpoint: {self.directory}: step directories "
                  f"{sorted(set(steps) - set(whole))} hold no complete checkpoint; ignored (a "
                  "run that saves moves them aside to <step>.incomplete)")
        return whole

    def _local_steps(self) -> tuple[list[int], list[int]]:
        """(every local step directory, those holding a complete checkpoint). Orbax counts any
        directory named by a step: one made or copied in by hand, empty or half full, would be
        "latest" and fail every resume. Orbax itself renames a complete step into place, both
        items inside."""
        steps = sorted(self._ocp.path.step.checkpoint_steps(self.directory))
        return steps, [s for s in steps if all(
            os.path.isdir(os.path.join(self.directory, str(s), item)) for item in (STATE, META))]

    def _set_aside_incomplete(self) -> None:
        """Rename local step directories that hold no complete checkpoint to <step>.incomplete
        (kept, not deleted), so that Orbax's writer neither counts them nor collides with them."""
        steps, whole = self._local_steps()
        for step in sorted(set(steps) - set(whole)):
            path = os.path.join(self.directory, str(step))
            aside, n = f"{path}.incomplete", 1
            while os.path.exists(aside):
                aside, n = f"{path}.incomplete{n}", n + 1
            os.rename(path, aside)

    # ----------------------------------------------------------------------- API

    def save(self, step: int, state: dict[str, Any], meta: dict | None = None, force: bool = False) -> bool:
        """Save `state` (a pytree of arrays) and `meta` (JSON-able; numpy/jax arrays and PRNG keys are
        encoded and come back as numpy arrays / keys) at `step`, if due by `save_interval_steps` or
        `force` (due: `step % save_interval_steps == 0`; never a step <= the last one saved).
        Asynchronous when `async_save`: returns once arrays are copied off the device, so
        the caller may donate or overwrite them. Returns whether a save was started."""
        ocp = self._ocp
        meta_json = _encode_meta(dict(meta or {}))  # fails here, clearly, on non-JSON meta
        step = int(step)
        if not (force or step % self._interval == 0):  # before any listing: called every step
            return False
        # Locally, our own listing (Orbax's counts step directories that hold no checkpoint),
        # and the save still in flight.
        last = self._mgr.latest_step() if self._is_gcs else max(
            (s for s in (self.latest_step(), self._pending) if s is not None), default=None)
        if last is not None and step <= last:
            return False
        self.wait()  # surfaces a failure of the previous async save as such
        if self._is_gcs:
            self._probe(f"save of step {step}")
        if not self._writer:  # a dead writer's leftovers go before our first save
            if not self._is_gcs:
                self._bounded("listing", self._set_aside_incomplete)
            reader = self._mgr
            self._mgr = self._bounded("open", lambda: self._open_manager(cleanup=True))
            self._writer = True
            self._bounded("close", reader.close)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                     META: ocp.args.JsonSave(meta_json)})
        saved = self._bounded(f"save of step {step}",
                              lambda: self._mgr.save(step, args=args, force=True))
        if saved:
            self._pending = step
            if not self._async:  # already written: check it was finalized
                self.wait()
        return bool(saved)

    def wait(self) -> None:
        """Block until the pending asynchronous save is written and finalized (or raise)."""
        step, self._pending = self._pending, None
        if step is None:
            return
        self._bounded(f"save of step {step}", self._mgr.wait_until_finished)
        # Orbax logs, and does not raise, some failures of an item's commit; check the outcome.
        if step not in self._bounded("listing", self._finalized_steps):
            raise CheckpointError(f"{self.directory}: save of step {step} failed: it was not "
                                  "finalized (see the Orbax log above)")

    def latest_step(self) -> int | None:
        """Newest finalized step in storage (read afresh), or None. A save still in flight is not
        counted until it is finalized (`wait()`)."""
        steps = self._bounded("listing", self._finalized_steps)
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Finalized steps in storage, ascending."""
        return self._bounded("listing", self._finalized_steps)

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict]:
        """Restore (state, meta) of `step` (default: latest finalized).

        `abstract_state` mirrors the saved state: `jax.ShapeDtypeStruct`s (or arrays) whose
        `sharding` and `dtype` say where and as what to restore each array (any mesh and device
        count: Orbax reads just the needed slices; dtypes are cast). Its structure is used, so
        optax NamedTuples come back as such. Without it, arrays are restored as saved onto one
        local device, with containers as Orbax's metadata gives them (dicts/lists)."""
        ocp = self._ocp
        self.wait()  # our own pending save, if any, first
        steps = self._bounded("listing", self._finalized_steps)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        if step is None:
            step = steps[-1]
        elif int(step) not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step} (have {steps})")
        step = int(step)
        if abstract_state is None:
            tree = self._bounded(f"restore of step {step}",
                                 lambda: self._mgr.item_metadata(step)[STATE].tree)
            abstract_state = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_default_sharding()), tree)
        else:
            abstract_state = jax.tree.map(_abstract_leaf, abstract_state)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                     META: ocp.args.JsonRestore()})
        out = self._bounded(f"restore of step {step}", lambda: self._mgr.restore(step, args=args))
        return out[STATE], _decode_meta(out[META] or {})

    def restore_item(self, key: str, abstract: Any, step: int | None = None) -> Any:
        """One top-level entry of the saved state (e.g. "params") alone, the others (optimizer
        state, anchor: 3x the parameters for AdamW) never read. `abstract` as in `restore`; its
        shapes must be the saved ones (checked first: Orbax would pad or cut a different shape)."""
        ocp = self._ocp
        self.wait()
        steps = self._bounded("listing", self._finalized_steps)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step} (have {steps})")
        saved = self._bounded(f"restore of step {step}",
                              lambda: self._mgr.item_metadata(step)[STATE].tree)
        if key not in saved:
            raise ValueError(f"{self.directory}: checkpoint has no {key!r} item")
        abstract = jax.tree.map(lambda a: _abstract_leaf(
            a if isinstance(a, jax.ShapeDtypeStruct | jax.Array)
            else jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)), abstract)
        try:
            same = (jax.tree.map(lambda m: tuple(m.shape), saved[key])
                    == jax.tree.map(lambda a: tuple(a.shape), abstract))
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ShapeMismatch(f"{self.directory}: the checkpoint's {key!r} do not match the "
                                "expected structure and shapes")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(
            sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract)

        def read() -> Any:
            # A reader of its own: the partial restore needs the PyTree handler (same format).
            mgr = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(
                    create=False, cleanup_tmp_directories=False),
                item_handlers={STATE: ocp.PyTreeCheckpointHandler()})
            try:
                args = ocp.args.PyTreeRestore({key: abstract}, restore_args={key: restore_args},
                                              partial_restore=True)
                return mgr.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE][key]
            finally:
                mgr.close()

        return self._bounded(f"restore of {key!r} at step {step}", read)

    def close(self) -> None:
        """Wait for pending writes, then release Orbax's threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._failed is not None:
            return  # a write is stuck on dead storage: do not wait for it
        try:
            self.wait()
        finally:
            self._bounded("close", self._mgr.close)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close, waiting for a save in flight, also when the block raised: a retry in the same
        process would otherwise list the steps while the save of the last one is still being
        written, resume from the one before and collide with it. A failure of that wait is
        printed, not raised, so the block's own error is the one that propagates."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # noqa: BLE001
            print(f"checkpoint: while stopping after {exc_type.__name__}: {_one_line(e)}")


# --------------------------------------------------------------------------- preemption


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Callable[[], bool]:
    """Set a flag on SIGTERM (the trainer polls it, saves, and exits); returns `is_preempted()`.

    The handler only sets the flag: no I/O happens in signal context. A Python handler installed
    before is still called. In a multi-process run `is_preempted()` is a collective (an all-gather of
    the flags), so every process must call it at the same points; then all processes agree and save
    the same step even if only some of them received the signal. `is_preempted.uninstall()` puts the
    previous handlers back. Off the main thread (where Python cannot install signal handlers) it
    warns and returns a flag that only `is_preempted.set()` can raise.
    """
    flag = threading.Event()
    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            prev = signal.getsignal(sig)

            def handler(signum, frame, _prev=prev):
                flag.set()
                if callable(_prev):
                    _prev(signum, frame)

            signal.signal(sig, handler)
            previous[sig] = prev
    except ValueError:  # not the main thread
        import logging

        logging.getLogger(__name__).warning("install_preemption_handler: not on the main thread, "
                                            "SIGTERM will not be caught")

    def is_preempted() -> bool:
        if jax.process_count() == 1:
            return flag.is_set()
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(flag.is_set()))
        return bool(np.asarray(flags).any())

    def uninstall() -> None:
        for sig, prev in previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        previous.clear()

    is_preempted.uninstall = uninstall
    is_preempted.set = flag.set
    return is_preempted
