"""Local paths and `gs://` URLs behind a few helpers (google-cloud-storage, imported lazily)."""

from __future__ import annotations

import os

CACHE_DIR = os.environ.get("CATJAX_CACHE", os.path.expanduser("~/.cache/catjax"))


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def split_gcs(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url}: not a gs://bucket/path URL")
    return bucket, key


def _client():
    try:
        from google.cloud import storage
    except ImportError:
        raise ImportError("gs:// paths need google-cloud-storage: pip install catjax[gcs]") from None
    return storage.Client()


def download(url: str, cache_dir: str | None = None) -> str:
    """Copy a gs:// file, or every object under a gs:// prefix, into the local cache.

    Returns the local path. Files already cached with the same size are not fetched again.
    """
    bucket_name, key = split_gcs(url)
    root = os.path.join(cache_dir or os.path.join(CACHE_DIR, "gcs"), bucket_name)
    bucket = _client().bucket(bucket_name)
    blobs = [b for b in bucket.list_blobs(prefix=key.rstrip("/")) if not b.name.endswith("/")]
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
        if os.path.exists(dest) and os.path.getsize(dest) == blob.size:
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        blob.download_to_filename(dest + ".part")
        os.replace(dest + ".part", dest)
    return local


def upload_dir(local_dir: str, url: str) -> None:
    """Copy every file under `local_dir` to the gs:// prefix `url`."""
    bucket_name, key = split_gcs(url)
    bucket = _client().bucket(bucket_name)
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_dir)
            bucket.blob(f"{key.rstrip('/')}/{rel}").upload_from_filename(path)
