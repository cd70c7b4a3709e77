"""HttpReceiver: a webhook receiver on 127.0.0.1 that records every request and plays scripted responses."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Received:
    """One HTTP request seen by ``HttpReceiver``."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        """Return the body decoded as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Response:
    """A scripted HTTP response."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0


def _path_key(path: str) -> str:
    return urlsplit(path).path or "/"


class _ReceiverHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    receiver: HttpReceiver


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "WhiskyPayReceiver/1.0"
    timeout = 30
    server: _ReceiverHTTPServer

    def log_message(self, *args: Any) -> None:
        """Stay quiet (no per-request stderr line)."""

    def setup(self) -> None:
        super().setup()
        self.server.receiver._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.receiver._track(self.connection, add=False)

    def _read_body(self) -> bytes | None:
        """Return the request body, or None if the client went away before sending all of it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    return None
                chunks.append(chunk)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        return body if len(body) == length else None

    def _handle(self) -> None:
        body = self._read_body()
        if body is None:
            # Like any real server, a request cut off mid-body (its client was killed) is not a request.
            self.close_connection = True
            return
        received = Received(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        receiver = self.server.receiver
        receiver._record(received)
        resp = receiver._next_response(received)
        if resp.delay_s > 0 and receiver._stopping.wait(resp.delay_s):
            self.close_connection = True
            return
        try:
            self.send_response(resp.status)
            lower = {k.lower() for k in resp.headers}
            for name, value in resp.headers.items():
                self.send_header(name, value)
            if "content-length" not in lower:
                self.send_header("Content-Length", str(len(resp.body)))
            if resp.body and "content-type" not in lower:
                self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            if resp.body and self.command != "HEAD":
                self.wfile.write(resp.body)
            self.wfile.flush()
        except OSError:  # client went away (e.g. timed out during delay_s)
            self.close_connection = True


for _method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
    setattr(_ReceiverHandler, f"do_{_method}", _ReceiverHandler._handle)  # http.server dispatches on do_<METHOD>


class HttpReceiver:
    """A real threaded HTTP server on 127.0.0.1 that records requests and plays scripted responses.

    Parameters:
        port: port to bind; 0 (default) picks a free one.
        host: the loopback address to bind: two receivers on 127.0.0.2 and 127.0.0.3 are two servers (two
            spellings of one address are one server to the slow-delivery cap).
    """

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1") -> None:
        self._requested_port = port
        self.host = host
        self.port: int = 0
        self._lock = threading.Condition()
        self._received: list[Received] = []
        self._scripts: dict[str, list[Response]] = {}
        self._handlers: dict[str, Callable[[Received], Response]] = {}
        self._conns: set[socket.socket] = set()
        #: TCP connections accepted since start (a client reusing kept-alive connections opens few).
        self.accepted = 0
        self._stopping = threading.Event()
        self._server: _ReceiverHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- internals used by the handler ------------------------------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
                self.accepted += 1
            else:
                self._conns.discard(conn)

    def _record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)
            self._lock.notify_all()

    def _next_response(self, received: Received) -> Response:
        key = _path_key(received.path)
        with self._lock:
            handler = self._handlers.get(received.path) or self._handlers.get(key)
            script = self._scripts.get(received.path) or self._scripts.get(key)
            if handler is None and script:
                return script.pop(0) if len(script) > 1 else script[0]
        if handler is None:
            return Response()
        try:
            return handler(received)
        except Exception as exc:
            return Response(500, body=f"receiver handler raised {exc!r}".encode())

    # -- public API -------------------------------------------------------------------------------------------------
    def start(self) -> Self:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _ReceiverHTTPServer((self.host, self._requested_port), _ReceiverHandler)
        server.receiver = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"http-receiver-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; never waits for handlers that are still sleeping."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def url(self, path: str = "/hook") -> str:
        """Return ``http://127.0.0.1:PORT{path}``.

        Parameters:
            path: request path, starting with "/".
        """
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host}:{self.port}{path}"

    def respond(self, path: str, *responses: Response) -> None:
        """Script the responses for ``path``: consumed in order, the last one repeats forever.

        With no responses the path goes back to the default (200, empty body).

        Parameters:
            path: request path (query string ignored when matching).
            responses: responses to play.
        """
        with self._lock:
            self._handlers.pop(path, None)
            if responses:
                self._scripts[path] = list(responses)
            else:
                self._scripts.pop(path, None)

    def set_handler(self, path: str, fn: Callable[[Received], Response]) -> None:
        """Answer requests to ``path`` with ``fn(received)`` (runs in the request's thread).

        Parameters:
            path: request path (query string ignored when matching).
            fn: callback building the response.
        """
        with self._lock:
            self._scripts.pop(path, None)
            self._handlers[path] = fn

    def open_connections(self) -> int:
        """Return how many client connections are open now (accepted, not yet closed by either side)."""
        with self._lock:
            return len(self._conns)

    def requests(self, path: str | None = None) -> list[Received]:
        """Return the requests received so far, oldest first.

        Parameters:
            path: only those to this path (exact, or ignoring the query string).
        """
        with self._lock:
            return self._matching(path)

    def _matching(self, path: str | None) -> list[Received]:
        if path is None:
            return list(self._received)
        return [r for r in self._received if r.path == path or _path_key(r.path) == path]

    def wait_for(self, count: int, path: str | None = None, timeout_s: float = 10) -> list[Received]:
        """Wait until at least ``count`` requests arrived and return them all.

        Parameters:
            count: minimum number of requests.
            path: only count requests to this path.
            timeout_s: give up after this long with an AssertionError listing what arrived.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                got = self._matching(path)
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(r.method, r.path, r.body[:200]) for r in self._received]
                    raise AssertionError(
                        f"expected {count} request(s) to {path or 'any path'} within {timeout_s}s, "
                        f"got {len(got)}; all received: {seen}"
                    )
                self._lock.wait(remaining)

    def clear(self) -> None:
        """Forget recorded requests (scripted responses stay)."""
        with self._lock:
            self._received.clear()

    def reset(self) -> None:
        """Forget recorded requests, scripted responses and handlers."""
        with self._lock:
            self._received.clear()
            self._scripts.clear()
            self._handlers.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
