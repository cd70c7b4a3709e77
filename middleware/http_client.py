"""HttpClients: one pooled requests.Session per worker thread, guarded against private addresses, each attempt
bounded by a deadline, and a cap on slow deliveries per server."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import threading
import time
from urllib.parse import urlsplit

import requests
from dramatiq import Broker, Middleware, Worker
from dramatiq.logging import get_logger

from whiskypay.deadline import Resolver, Watchdog
from whiskypay.delivery import Attempt, post_webhook
from whiskypay.errors import Deferred, WhiskyPayError
from whiskypay.netguard import GuardedAdapter


def peer_key(peer: tuple[str, int]) -> str:
    """Return "address:port" ("[v6]:port") of a connected peer: the server a slow-delivery cap counts against."""
    address, port = peer
    if ":" in address:
        mapped = ipaddress.IPv6Address(address.split("%", 1)[0]).ipv4_mapped
        if mapped is None:
            return f"[{address}]:{port}"
        address = str(mapped)  # the same IPv4 server, reached over an IPv6 socket
    return f"{address}:{port}"


class HttpClients(Middleware):
    """Own the webhook HTTP sessions of this worker process: one per thread, reused across messages.

    Every attempt ends within connect_timeout_s + read_timeout_s (plus the watchdog's tick), whatever the server
    does: name resolution, connect (all of a host's addresses together), TLS handshake, headers and body share
    that one deadline (`whiskypay.deadline`).

    It also keeps one slow merchant from taking every worker thread. The cap counts against the server: the
    peer address and port the connection reached, however the callback URL spells its host (subdomains, case,
    a trailing dot, the IP literal, many merchants on one platform). A server is slow while one of its requests
    has run longer than slow_after_s, or after one did (until one of its requests is fast again); a slow server
    gets at most host_concurrency requests in flight in this process, and its other messages are deferred by
    one read timeout (`Deferred`: re-enqueued later without counting an attempt; QueueRetryPolicy bounds how
    long). The check runs once the connection reached its peer, before the request is sent. Fast servers are
    not capped.

    Sessions ignore proxy and .netrc settings from the environment (trust_env off), never follow redirects
    (the delivery code passes allow_redirects=False) and, unless allow_private, refuse to talk to a
    non-public peer address. All are closed in `after_worker_shutdown`, after the worker threads joined.

    Parameters:
      allow_private: Accept loopback and private callback hosts (development and tests).
      connect_timeout_s, read_timeout_s: Socket timeouts of every attempt, in seconds.
      max_response_bytes: The most of a response body read, in bytes.
      host_concurrency: Requests in flight to one slow host, per process.
      slow_after_s: A request running longer than this marks its host slow, in seconds.
      pool_size: Connections kept per host and session.
      resolver: The name resolver (`socket.getaddrinfo`; injected in tests).
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_response_bytes: int,
        host_concurrency: int = 2,
        slow_after_s: float = 1.0,
        pool_size: int = 4,
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.allow_private = allow_private
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_response_bytes = max_response_bytes
        self.host_concurrency = host_concurrency
        self.slow_after_s = slow_after_s
        self._inflight: dict[str, dict[int, float]] = {}
        self._slow_hosts: set[str] = set()
        self._tokens = itertools.count()
        self.pool_size = pool_size
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self.resolver = resolver
        self.watchdog = Watchdog()

    def session(self) -> requests.Session:
        """Return the calling thread's session, creating it on first use."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            adapter = GuardedAdapter(
                allow_private=self.allow_private, pool_connections=self.pool_size, pool_maxsize=self.pool_size
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = "WhiskyPay-Webhooks/1"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _admit(self, server: str, host: str) -> int:
        now = time.monotonic()
        with self._lock:
            flights = self._inflight.setdefault(server, {})
            slow = server in self._slow_hosts or any(now - started > self.slow_after_s for started in flights.values())
            if slow and len(flights) >= self.host_concurrency:
                raise Deferred(
                    f"{len(flights)} slow deliveries to {host}'s server {server} in flight; deferred",
                    delay_ms=int(self.read_timeout_s * 1000),
                    host=host,
                    server=server,
                )
            token = next(self._tokens)
            flights[token] = now
            return token

    def _release(self, server: str, token: int, *, slow: bool) -> None:
        with self._lock:
            flights = self._inflight.get(server, {})
            flights.pop(token, None)
            if not flights:
                self._inflight.pop(server, None)
            if slow:
                self._slow_hosts.add(server)
            else:
                self._slow_hosts.discard(server)

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """Make one webhook attempt on the calling thread's session (see `whiskypay.delivery.post_webhook`).

        Raises `Deferred` instead when the server it connected to is slow and already has host_concurrency
        requests in flight.
        """
        host = urlsplit(url).hostname or "?"
        flight: list[tuple[str, int]] = []

        def admit(peer: tuple[str, int]) -> None:
            server = peer_key(peer)
            flight.append((server, self._admit(server, host)))

        duration_ms: float | None = None
        with self.watchdog.attempt(
            self.connect_timeout_s + self.read_timeout_s, resolver=self.resolver, on_peer=admit
        ) as scope:
            try:
                attempt = post_webhook(
                    self.session(),
                    url,
                    body,
                    headers,
                    connect_timeout_s=self.connect_timeout_s,
                    read_timeout_s=self.read_timeout_s,
                    max_response_bytes=self.max_response_bytes,
                    scope=scope,
                )
                duration_ms = attempt.duration_ms
                return attempt
            except WhiskyPayError as exc:
                duration_ms = exc.duration_ms
                raise
            finally:
                for server, token in flight:  # none when it was deferred, or never reached its server
                    self._release(server, token, slow=(duration_ms or 0.0) > self.slow_after_s * 1000)

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self.watchdog.stop()
