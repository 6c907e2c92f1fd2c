"""HTTP plumbing of the embedded Hub on the stdlib server: request parsing (raw path segments,
query, streamed Content-Length or chunked bodies), responses with a known length (bytes or a
chunk iterator), and the rendering of HubError as the Hub does (status, JSON ``{"error": ...}``,
``X-Error-Code`` / ``X-Error-Message`` headers)."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import BadRequest, HubError

log = logging.getLogger("deltahub.localhub")
CHUNK = 1 << 20
DRAIN_LIMIT = 1 << 20  # unread request bytes we still read to keep a connection alive


class BodyReader:
    """Reads a request body exactly once, from Content-Length or chunked transfer encoding.
    ``complete`` tells whether the whole body arrived; a short body raises ConnectionError."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
        self.left = 0 if self.chunked else int(headers.get("Content-Length") or 0)
        self.complete = not self.chunked and self.left == 0
        self._chunk_left = 0

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise ConnectionError("request body ended early")
        return data

    def iter_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """Yield the body in pieces of at most ``size`` bytes."""
        if self.chunked:
            while not self.complete:
                if self._chunk_left == 0:
                    line = self.rfile.readline(65537)
                    if not line.endswith(b"\n"):
                        raise ConnectionError("request body ended early")
                    try:
                        self._chunk_left = int(line.split(b";")[0].strip(), 16)
                    except ValueError:
                        raise ConnectionError("malformed chunked request body") from None
                    if self._chunk_left == 0:
                        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        self.complete = True
                        return
                data = self._read_exact(min(size, self._chunk_left))
                self._chunk_left -= len(data)
                if self._chunk_left == 0:
                    self._read_exact(2)  # CRLF after each chunk
                yield data
        else:
            while self.left > 0:
                data = self.rfile.read(min(size, self.left))
                if not data:
                    raise ConnectionError("request body ended early")
                self.left -= len(data)
                if self.left == 0:
                    self.complete = True
                yield data

    def read_all(self, limit: int) -> bytes:
        out = bytearray()
        for chunk in self.iter_chunks():
            out += chunk
            if len(out) > limit:
                raise HubError(f"Request body larger than {limit} bytes", status=413)
        return bytes(out)

    def iter_lines(self, limit: int) -> Iterator[bytes]:
        """Split the body on newlines (NDJSON); one line may be at most ``limit`` bytes."""
        buf = b""
        for chunk in self.iter_chunks():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            yield from (line for line in lines if line.strip())
            if len(buf) > limit:
                raise HubError(f"NDJSON line longer than {limit} bytes", status=413)
        if buf.strip():
            yield buf

    def drain(self) -> bool:
        """Discard what is left of a small body; False if the connection must be closed instead."""
        if self.complete:
            return True
        if not self.chunked and self.left > DRAIN_LIMIT:
            return False
        try:
            seen = 0
            for chunk in self.iter_chunks():
                seen += len(chunk)
                if seen > DRAIN_LIMIT:
                    return False
        except (OSError, ValueError):
            return False
        return True


@dataclass
class Request:
    method: str
    segments: list[str]  # unquoted path segments; "a%2Fb" stays one segment "a/b"
    query: dict[str, list[str]]
    headers: Any
    body: BodyReader
    base_url: str
    principal: Any = None

    def arg(self, name: str, default: str | None = None) -> str | None:
        vals = self.query.get(name)
        return vals[-1] if vals else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def json(self, limit: int = 64 << 20) -> Any:
        raw = self.body.read_all(limit)
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"Invalid JSON body: {e}") from None

    def form_or_json(self, limit: int = 16 << 20) -> dict[str, list]:
        """application/x-www-form-urlencoded (repeated keys -> lists) or a JSON object."""
        raw = self.body.read_all(limit)
        ctype = (self.headers.get("Content-Type") or "").lower()
        if "json" in ctype:
            try:
                data = json.loads(raw or b"{}")
            except ValueError as e:
                raise BadRequest(f"Invalid JSON body: {e}") from None
            return {k: v if isinstance(v, list) else [v] for k, v in data.items()}
        return parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: Iterable[bytes] | None = None  # sent instead of body; ``length`` bytes
    length: int | None = None


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(obj).encode()
    return Response(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)


def error_response(err: HubError) -> Response:
    payload: dict[str, Any] = {"error": err.message}
    payload.update(err.extra)
    headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_response(payload, err.status, headers)


def _header_safe(text: str) -> str:
    return " ".join(text.encode("ascii", "replace").decode().split())[:1000]


def make_handler(app: Any, dispatch: Callable[[Any, Request], Response]) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``app`` that routes every request through ``dispatch``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "deltahub-localhub"
        timeout = 300  # seconds a stalled client may hold a connection

        def _handle(self) -> None:
            split = urlsplit(self.path)
            host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
            body = BodyReader(self.rfile, self.headers)
            req = Request(
                method=self.command,
                segments=[unquote(s) for s in split.path.split("/")[1:]],
                query=parse_qs(split.query, keep_blank_values=True),
                headers=self.headers,
                body=body,
                base_url=f"http://{host}",
            )
            try:
                resp = dispatch(app, req)
            except HubError as e:
                resp = error_response(e)
            except (ConnectionError, TimeoutError) as e:  # client gone or stalled mid-body
                log.info("%s %s: %s", self.command, self.path, e)
                self.close_connection = True
                return
            except Exception as e:
                log.error("%s %s failed:\n%s", self.command, self.path, traceback.format_exc())
                resp = error_response(HubError(f"Internal error: {type(e).__name__}: {e}"))
            if not body.drain():
                resp.headers["Connection"] = "close"
                self.close_connection = True
            try:
                self._send(resp)
            except (ConnectionError, TimeoutError) as e:  # client went away during the answer
                log.info("%s %s: %s", self.command, self.path, e)
                self.close_connection = True

        def _send(self, resp: Response) -> None:
            length = resp.length if resp.stream is not None else len(resp.body)
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self.command == "HEAD":
                return
            if resp.stream is None:
                self.wfile.write(resp.body)
                return
            sent = 0
            for chunk in resp.stream:
                self.wfile.write(chunk)
                sent += len(chunk)
            if sent != length:  # the object changed under us: never pretend the body was complete
                self.close_connection = True

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return Handler
