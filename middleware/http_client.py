"""HttpClients: one connection pool per worker process, shared by its threads, guarded against private addresses,
each attempt bounded by a deadline, and a cap on slow deliveries per server."""

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
    """Own the webhook connections of this worker process: one pool, shared by every worker thread.

    One requests.Session whose one `GuardedAdapter` keeps a urllib3 pool per callback host (scheme, host, port)
    for up to pool_hosts hosts, the least recently used dropped first, and in each up to the worker's thread
    count of kept-alive connections: a thread reuses whatever connection to the host another thread left idle,
    so a hundred merchants, or one busy merchant and every thread, are served on kept-alive connections. The
    pools never block: a thread that finds no idle connection opens one. At most idle_connections of them stay
    open idle in all, the oldest closed first (`whiskypay.netguard.IdleConnections`): with the ones in use (one
    per thread at most) that bounds the sockets a worker process holds for webhooks, however many merchants.

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

    The session ignores proxy and .netrc settings from the environment (trust_env off; the delivery code reads
    only its headers and adapter), never follows redirects and, unless allow_private, refuses to talk to a
    non-public peer address: the check runs on every new connection, in whichever thread and pool. It is opened
    in `before_worker_boot` (or at the first attempt outside a worker) and closed in `after_worker_shutdown`,
    after the worker threads joined.

    Parameters:
      allow_private: Accept loopback and private callback hosts (development and tests).
      connect_timeout_s, read_timeout_s: Socket timeouts of every attempt, in seconds.
      max_response_bytes: The most of a response body read, in bytes.
      host_concurrency: Requests in flight to one slow host, per process.
      slow_after_s: A request running longer than this marks its host slow, in seconds.
      pool_hosts: Callback hosts (scheme, host, port) a pool is kept for, per process.
      idle_connections: Kept-alive connections left open while idle, per process, across hosts.
      pool_maxsize: Connections kept per host; default the worker's thread count (`before_worker_boot`), 8
        (Dramatiq's default) before a worker boots.
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
        pool_hosts: int = 256,
        idle_connections: int = 256,
        pool_maxsize: int | None = None,
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
        self.pool_hosts = pool_hosts
        self.idle_connections = idle_connections
        self.pool_maxsize = pool_maxsize
        #: The worker's thread count, learned at boot.
        self.worker_threads = 8
        self._session: requests.Session | None = None
        self._lock = threading.Lock()
        self.resolver = resolver
        self.watchdog = Watchdog()

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self.worker_threads = worker.worker_threads
        self.session()

    def session(self) -> requests.Session:
        """Return this process's session (every thread shares it), creating it on first use."""
        session = self._session
        if session is None:
            with self._lock:
                session = self._session
                if session is None:
                    session = self._session = self._open()
        return session

    def _open(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        adapter = GuardedAdapter(
            allow_private=self.allow_private,
            max_idle=self.idle_connections,
            pool_connections=self.pool_hosts,
            pool_maxsize=self.pool_maxsize or self.worker_threads,
            pool_block=False,  # a thread never waits for a pool slot: with no idle connection it opens one
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = "WhiskyPay-Webhooks/1"
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
        """Make one webhook attempt on this process's pool (see `whiskypay.delivery.post_webhook`).

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
            session, self._session = self._session, None
        if session is not None:
            session.close()  # every pool and every connection it kept
        self.watchdog.stop()
