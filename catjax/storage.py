"""Local paths and `gs://` URLs behind a few helpers (google-cloud-storage, imported lazily).

A job's workdir may be `gs://bucket/path`. Checkpoints go there directly (Orbax); every other file a
job writes (metrics.jsonl, TensorBoard events, records.jsonl, summaries, plots, exports) goes
through a `Workdir`: for a local directory it is that directory, untouched; for gs:// it is a
private local mirror (a temporary directory) that the job reads and writes as usual, `pull`ing the
files it resumes from out of the bucket when it starts and `push`ing each file after writing it.

Failures: every GCS request made here has a timeout (`timeout_s`, 60 s) and is retried per
`GCS_RETRIES` on transient errors (connection refused or reset, timeouts, HTTP 408/429/5xx): 6
attempts, backoff 1 s doubling to 16 s (the policy of catjax.checkpoint), so about 30 s when the
bucket refuses or answers 5xx, at most 6 timeouts + 31 s when it does not answer. The client
library's own retries are off (`retry=None`), so nothing else waits longer. Then, or at once on any
other error (no permission, no credentials), `StorageError` is raised with a one-line message; the
command line prints it and exits with status 1, as for checkpoint failures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

CACHE_DIR = os.environ.get("CATJAX_CACHE", os.path.expanduser("~/.cache/catjax"))
GCS_RETRIES = {"max_retries": 6, "initial_delay_s": 1.0, "max_delay_s": 16.0, "timeout_s": 60.0}
_T = TypeVar("_T")


class StorageError(RuntimeError):
    """A gs:// object could not be read or written (bucket unreachable, no permission, ...)."""


def set_retries(max_retries: int = 6, initial_delay_s: float = 1.0, max_delay_s: float = 16.0,
                timeout_s: float = 60.0) -> None:
    """Retry policy and per-request timeout of the GCS requests made here (process-wide)."""
    GCS_RETRIES.update(max_retries=max_retries, initial_delay_s=initial_delay_s,
                       max_delay_s=max_delay_s, timeout_s=timeout_s)


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def split_gcs(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url}: not a gs://bucket/path URL")
    return bucket, key


_CLIENTS: dict[str | None, Any] = {}


def _client():
    try:
        from google.cloud import storage
    except ImportError:
        raise ImportError("gs:// paths need google-cloud-storage: pip install catjax[gcs]") from None
    # One client per endpoint (tests switch emulators): a client resolves credentials when made.
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host not in _CLIENTS:
        _CLIENTS[host] = _bounded("GCS client", storage.Client)
    return _CLIENTS[host]


def _retryable(e: BaseException) -> bool:
    import requests

    try:
        from google.auth.exceptions import TransportError
    except ImportError:  # pragma: no cover - google-auth comes with google-cloud-storage
        TransportError = ConnectionError  # noqa: N806
    if isinstance(e, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout
                  | TransportError):
        return True
    return getattr(e, "code", None) in (408, 429, 500, 502, 503, 504)


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    msg = msg[:limit] + "..." if len(msg) > limit else msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _bounded(what: str, fn: Callable[[], _T]) -> _T:
    """`fn()` (GCS requests made with `retry=None`: the retries are ours, so bounded), retried per
    `GCS_RETRIES` on transient errors; a failure is a one-line `StorageError` naming `what`."""
    r = GCS_RETRIES
    attempts, delay = max(1, int(r["max_retries"])), float(r["initial_delay_s"])
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            transient = _retryable(e)
            if transient and attempt < attempts:
                time.sleep(delay)
                delay = min(2 * delay, float(r["max_delay_s"]))
                continue
            why = f"GCS unreachable after {attempts} attempts: " if transient else ""
            raise StorageError(f"{what}: {why}{_one_line(e)}") from e
    raise AssertionError("unreachable")


def _kw() -> dict:
    return {"retry": None, "timeout": float(GCS_RETRIES["timeout_s"])}


def download(url: str, cache_dir: str | None = None) -> str:
    """Copy a gs:// file, or every object under a gs:// prefix, into the local cache.

    Returns the local path. A cached file is fetched again unless it is the object's current
    generation and size (recorded under `<cache>/.generations/`, apart from the files, which
    stay a clean copy): an object rewritten with the same size (a re-exported model, an edited
    dataset) is not served stale. (A cache filled before stamps existed is fetched once more.)
    """
    bucket_name, key = split_gcs(url)
    cache = cache_dir or os.path.join(CACHE_DIR, "gcs")
    root = os.path.join(cache, bucket_name)
    bucket = _client().bucket(bucket_name)
    listed = _bounded(f"{url}: listing", lambda: list(bucket.list_blobs(prefix=key.rstrip("/"), **_kw())))
    blobs = [b for b in listed if not b.name.endswith("/")]
    exact = [b for b in blobs if b.name == key]
    if exact:  # a single file
        blobs, local = exact, os.path.join(root, key)
    else:
        prefix = key.rstrip("/") + "/"
        blobs = [b for b in blobs if b.name.startswith(prefix)]
        local = os.path.join(root, key.rstrip("/"))
    if not blobs:
        raise FileNotFoundError(f"{url}: no such object or prefix")
    for blob in blobs:
        dest = os.path.join(root, blob.name)
        stamp, stamp_path = f"{blob.generation}:{blob.size}", os.path.join(
            cache, ".generations", bucket_name, blob.name)
        if (os.path.exists(dest) and os.path.getsize(dest) == blob.size
                and _read_text(stamp_path) == stamp):
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.makedirs(os.path.dirname(stamp_path), exist_ok=True)
        # A listed blob downloads its listed generation (the request names it): an object
        # rewritten meanwhile fails in one line (not found) instead of mixing two versions.
        _bounded(f"gs://{bucket_name}/{blob.name}: download",
                 lambda b=blob, d=dest: b.download_to_filename(d + ".part", **_kw()))
        os.replace(dest + ".part", dest)
        with open(stamp_path, "w") as f:
            f.write(stamp)
    return local


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def upload_dir(local_dir: str, url: str) -> None:
    """Copy every file under `local_dir` to the gs:// prefix `url`."""
    bucket_name, key = split_gcs(url)
    bucket = _client().bucket(bucket_name)
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            name = _join(key, os.path.relpath(path, local_dir))
            _bounded(f"gs://{bucket_name}/{name}: upload",
                     lambda n=name, p=path: bucket.blob(n).upload_from_filename(p, **_kw()))


def _join(prefix: str, rel: str) -> str:
    rel = rel.replace(os.sep, "/")
    return f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel


class Workdir:
    """A job's output directory: `local` is where the job reads and writes its files.

    A local workdir is used as it is (`pull` and `push` do nothing). For `gs://bucket/path`, `local`
    is a private temporary directory (made on first use, removed by `close()` or when the object is
    collected): `pull(name)` fetches the bucket's copy of a file a job resumes from, and
    `push(*names)` uploads files after they are written, so the bucket is current after each step
    or batch and a job that dies loses at most the write in progress.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.remote = is_gcs(self.path)
        self._local: str | None = None if self.remote else self.path
        self._sent: dict[str, tuple[int, int]] = {}  # file -> (size, mtime) pushed, for directories
        self._cleanup: weakref.finalize | None = None
        if self.remote:
            self._bucket, self._prefix = split_gcs(self.path)

    @property
    def local(self) -> str:
        if self._local is None:
            self._local = tempfile.mkdtemp(prefix="catjax-workdir-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._local, True)
        return self._local

    def file(self, name: str) -> str:
        """The local path of `name` (relative to the workdir), to open, write or read."""
        return os.path.join(self.local, name)

    def url(self, name: str) -> str:
        """Where `name` is kept: the gs:// URL, or the local path (for messages)."""
        if self.remote:
            return f"gs://{self._bucket}/{_join(self._prefix, name)}"
        return os.path.join(self.path, name)

    def pull(self, name: str) -> bool:
        """Fetch file `name` from the bucket into `local` (replacing a local copy); whether it
        exists. Local workdirs: whether the file exists."""
        dest = self.file(name)
        if not self.remote:
            return os.path.exists(dest)
        from google.api_core.exceptions import NotFound

        blob = _client().bucket(self._bucket).blob(_join(self._prefix, name))
        os.makedirs(os.path.dirname(dest), exist_ok=True)

        def fetch() -> bool:
            try:
                blob.download_to_filename(dest + ".part", **_kw())
                return True
            except NotFound:
                return False

        found = _bounded(f"{self.url(name)}: download", fetch)
        if found:
            os.replace(dest + ".part", dest)
        else:  # the job starts afresh, as on an empty local workdir
            for p in (dest + ".part", dest):
                if os.path.exists(p):
                    os.remove(p)
        return found

    def push(self, *names: str) -> None:
        """Upload files `name` (always) and the files under directories `name` that changed since
        they were last pushed. Local workdirs: nothing to do."""
        if not self.remote:
            return
        bucket = _client().bucket(self._bucket)
        for name in names:
            path = self.file(name)
            if os.path.isfile(path):
                files = [(path, None)]
            else:
                files = [(os.path.join(d, f), os.stat(os.path.join(d, f)))
                         for d, _, fs in os.walk(path) for f in sorted(fs)]
            for p, st in files:
                sig = None if st is None else (st.st_size, st.st_mtime_ns)
                if sig is not None and self._sent.get(p) == sig:
                    continue
                key = _join(self._prefix, os.path.relpath(p, self.local))
                _bounded(f"gs://{self._bucket}/{key}: upload",
                         lambda k=key, f=p: bucket.blob(k).upload_from_filename(f, **_kw()))
                if sig is not None:
                    self._sent[p] = sig

    def close(self) -> None:
        """Remove the local mirror of a gs:// workdir (after the last push)."""
        if self._cleanup is not None:
            self._cleanup()
            self._local, self._cleanup = None, None
