"""A local GCS for tests: `gcp-storage-emulator` on 127.0.0.1, patched so tensorstore (Orbax) works.

Use the `gcs_emulator` fixture (import it into a test module) or `GcsEmulator` directly:

    from tests.gcs_emulator import gcs_emulator  # noqa: F401  (pytest fixture)

    def test_x(gcs_emulator):
        url = gcs_emulator.url            # "gs://catjax-test"
        gcs_emulator.stop(); gcs_emulator.start()   # same port, objects kept

The stock emulator lacks three behaviours tensorstore relies on (see shared/docs/ENVIRONMENT.md, "Checkpoints
and GCS"); `patch_emulator()` adds them to its object handlers:
  1. the `x-goog-generation` (and `x-goog-metageneration`) header on media downloads;
  2. `ifGenerationMatch` / `ifGenerationNotMatch` on downloads (412 / 304), also on metadata GETs;
  3. `startOffset` / `endOffset` on object listing (without it a tensorstore range delete removes
     every object in the bucket).
It also honours `ifGenerationMatch` on uploads and deletes (412), as real GCS does.

The fixture points google-cloud-storage and gcsfs (`STORAGE_EMULATOR_HOST`) and tensorstore
(`TENSORSTORE_GCS_HTTP_URL`, `GOOGLE_AUTH_TOKEN_FOR_TESTING`) at the emulator through `monkeypatch`,
so they are restored afterwards, and clears gcsfs' cached filesystems on both sides.
`FSSPEC_GS_TOKEN=anon` is deliberately not set (gcsfs then hangs on the HTTP emulator).
"""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import sys
import threading
from http import HTTPStatus

import pytest

BUCKET = "catjax-test"
_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
_patched = False


def _precondition_failed(request, response, obj) -> bool:
    """Apply ifGenerationMatch / ifGenerationNotMatch to a read; True if the response is decided."""
    gen = None if obj is None else str(obj["generation"])
    match = request.query.get("ifGenerationMatch")
    if match is not None and match[0] != (gen or "0"):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return True
    not_match = request.query.get("ifGenerationNotMatch")
    if not_match is not None and gen is not None and not_match[0] == gen:
        response.status = HTTPStatus.NOT_MODIFIED
        return True
    return False


def _current(storage, bucket, name):
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def patch_emulator() -> None:
    """Add the behaviours tensorstore needs to the emulator's handlers (idempotent, process-wide)."""
    global _patched
    if _patched:
        return
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    orig_download, orig_get, orig_ls = objects.download, objects.get, objects.ls
    orig_insert, orig_delete = objects.insert, objects.delete

    def download(request, response, storage, *args, **kwargs):
        obj = _current(storage, request.params["bucket_name"], request.params["object_id"])
        if obj is None:
            response.status = HTTPStatus.NOT_FOUND
            return
        gen = request.query.get("generation")
        if gen is not None and gen[0] != str(obj["generation"]):
            response.status = HTTPStatus.NOT_FOUND
            return
        if _precondition_failed(request, response, obj):
            return
        orig_download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
            response["x-goog-stored-content-length"] = str(obj["size"])

    def get(request, response, storage, *args, **kwargs):
        if request.query.get("alt", [""])[0] == "media":
            return download(request, response, storage, *args, **kwargs)
        if not request.query.get("softDeleted"):
            obj = _current(storage, request.params["bucket_name"], request.params["object_id"])
            if obj is not None and _precondition_failed(request, response, obj):
                return
        return orig_get(request, response, storage, *args, **kwargs)

    def ls(request, response, storage, *args, **kwargs):
        orig_ls(request, response, storage, *args, **kwargs)
        start = request.query.get("startOffset", [None])[0]
        end = request.query.get("endOffset", [None])[0]
        if response.status != HTTPStatus.OK or (start is None and end is None):
            return
        import json

        body = json.loads(response._content)

        def keep(name):
            return (start is None or name >= start) and (end is None or name < end)

        body["items"] = [o for o in body.get("items") or [] if keep(o["name"])]
        body["prefixes"] = [p for p in body.get("prefixes") or [] if keep(p)]
        response.json(body)

    def _write_precondition(request, response, storage, name) -> bool:
        match = request.query.get("ifGenerationMatch")
        if match is None or name is None:
            return False
        obj = _current(storage, request.params["bucket_name"], name)
        if match[0] != (str(obj["generation"]) if obj is not None else "0"):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return True
        return False

    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name", [None])[0]
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("meta") or request.data).get("name")
        if "upload_id" not in request.query and _write_precondition(request, response, storage, name):
            return
        return orig_insert(request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        if _write_precondition(request, response, storage, request.params["object_id"]):
            return
        return orig_delete(request, response, storage, *args, **kwargs)

    swap = {orig_download: download, orig_get: get, orig_ls: ls, orig_insert: insert,
            orig_delete: delete}
    objects.download, objects.get, objects.ls = download, get, ls  # `get` calls `download` by name
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn in swap:
                handlers[method] = swap[fn]
    # The router also falls back to `objects.insert` directly for some upload URLs.
    objects.insert = insert
    _patched = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _HTTPServer(http.server.HTTPServer):
    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up on a response (tensorstore cancels reads); not our problem
        super().handle_error(request, client_address)


def _handler_class():
    from gcp_storage_emulator.server import RequestHandler, Router

    class Handler(RequestHandler):
        """The emulator's handler plus request logging and a simulated outage (see `GcsEmulator`)."""

        def __init__(self, emulator, *args, **kwargs):
            self.emulator = emulator
            super().__init__(emulator.storage, *args, **kwargs)

        def _route(self, method):
            emu = self.emulator
            emu.requests.append(f"{method} {self.path}")
            if emu.outage:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            Router(self).handle(method)
            if method in ("POST", "PUT") and emu._writes_left is not None:
                emu._writes_left -= 1
                if emu._writes_left <= 0:
                    emu.outage, emu._writes_left = True, None

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def do_DELETE(self):
            self._route("DELETE")

        def do_PATCH(self):
            self._route("PATCH")

    return Handler


class GcsEmulator:
    """In-process emulator on 127.0.0.1 with one bucket.

    `stop()` / `start()` close and reopen the port (connections are refused meanwhile) and keep the
    stored objects. `fail_after_writes(n)` answers every request with 503 once `n` more uploads have
    been served (n=0: at once), until `recover()`: a store that goes away in the middle of a save.
    `requests` logs "METHOD /path?query" of every request received.
    """

    def __init__(self, bucket: str = BUCKET, port: int | None = None):
        from gcp_storage_emulator.handlers import buckets
        from gcp_storage_emulator.storage import Storage

        patch_emulator()
        self.bucket = bucket
        self.port = port or _free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.storage = Storage(use_memory_fs=True)
        buckets.create_bucket(bucket, self.storage)
        self.requests: list[str] = []
        self.outage = False
        self._writes_left: int | None = None
        self._httpd = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> None:
        if self._httpd is None:
            self._httpd = _HTTPServer(("127.0.0.1", self.port),
                                      functools.partial(_handler_class(), self))
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"gcs-emulator-{self.port}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(10)
            self._httpd = self._thread = None

    def fail_after_writes(self, n: int = 0) -> None:
        if n <= 0:
            self.outage = True
        else:
            self._writes_left = n

    def recover(self) -> None:
        self.outage, self._writes_left = False, None

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """{name: content} of the live objects in the bucket (read from the store, works while stopped)."""
        files, _ = self.storage.get_file_list(self.bucket, prefix or None, None, None)
        return {f["name"]: self.storage.get_file(self.bucket, f["name"]) for f in files}

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.host, "TENSORSTORE_GCS_HTTP_URL": self.host,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy"}


def _clear_gcsfs_cache() -> None:
    """Forget gcsfs instances (and their cached listings), including the one etils.epath keeps."""
    try:
        import gcsfs
    except ImportError:
        return
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        from etils.epath import backend

        type(backend.fsspec_backend)._get_filesystem.cache_clear()
    except (ImportError, AttributeError):
        pass


@pytest.fixture
def gcs_emulator(monkeypatch):
    """A running, patched emulator with one empty bucket; env vars point every client at it."""
    # Installed by `make test` (extra `gcs`): a missing package fails here, it is never skipped.
    import gcp_storage_emulator  # noqa: F401
    import gcsfs  # noqa: F401

    emu = GcsEmulator()
    emu.start()
    for k, v in emu.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FSSPEC_GS_TOKEN", raising=False)
    loggers = [logging.getLogger(n) for n in ("gcsfs", "api.object", "gcp_storage_emulator")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    _clear_gcsfs_cache()
    try:
        yield emu
    finally:
        emu.stop()
        _clear_gcsfs_cache()
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """Just the `gs://bucket` URL of a fresh emulator bucket."""
    return gcs_emulator.url
