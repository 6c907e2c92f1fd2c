"""Running the embedded Hub: ``LocalHub`` (a context manager that serves from a background thread,
for tests and the demo) and ``serve`` (the foreground loop behind ``deltahub hub serve``).

    with LocalHub(root, tokens=["alice:write:hf_a"]) as hub:   # port 0 = a free port
        HfApi(endpoint=hub.url, token="hf_a").create_repo("alice/x")
        env = hub.client_env()    # HF_ENDPOINT, HF_HUB_DISABLE_XET for subprocesses
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from http.server import ThreadingHTTPServer
from pathlib import Path

from .app import HubApp, dispatch
from .auth import Auth, Token, load_signing_key
from .httpd import make_handler
from .storage import Storage

log = logging.getLogger("deltahub.localhub")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(root: str | Path, host: str, port: int, tokens: Iterable[str | Token] = ()) -> _Server:
    """Bind a server over ``root`` (created if missing); leftovers of killed uploads are removed."""
    storage = Storage(root)
    removed = storage.objects.clean_tmp()
    if removed:
        log.info("removed %d stale temp file(s) from %s", removed, storage.objects.tmp)
    app = HubApp(storage=storage, auth=Auth(tokens), secret=load_signing_key(storage.root / "upload.key"))
    server = _Server((host, port), make_handler(app, dispatch))
    server.app = app
    return server


class LocalHub:
    """A file-backed Hub-compatible server on ``host:port`` (0 = any free port), in a thread.

    Attributes once started: ``url`` (e.g. "http://127.0.0.1:41234"), ``storage``, ``port``.
    """

    def __init__(
        self, root: str | Path, *, host: str = "127.0.0.1", port: int = 0, tokens: Iterable[str | Token] = ()
    ):
        self.root = Path(root)
        self.host, self.port = host, port
        self.tokens = list(tokens)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def storage(self) -> Storage:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return self._server.app.storage

    def client_env(self) -> dict[str, str]:
        """Environment for a huggingface_hub client (set before it is imported) to use this Hub."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1"}

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self._server = make_server(self.root, self.host, self.port, self.tokens)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="localhub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server, self._thread = None, None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    root: str | Path, host: str = "127.0.0.1", port: int = 8900, tokens: Iterable[str | Token] = ()
) -> None:
    """Serve in the foreground until interrupted."""
    server = make_server(root, host, port, tokens)
    try:
        server.serve_forever()
    finally:
        server.server_close()
