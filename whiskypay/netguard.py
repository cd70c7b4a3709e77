"""Webhook connections: refused to loopback, private, link-local and reserved addresses (SSRF guard), and bounded.

The check runs on the socket after it connected, on the peer address the kernel reports, so a DNS answer
that changes between a check and the connect (DNS rebinding) cannot slip through: there is no earlier
check to fool. Redirects are never followed and proxies from the environment are ignored.

Every connection also resolves and connects within one budget (`connect_within`), and hands its socket to the
running attempt so that `whiskypay.deadline` can end the attempt at its deadline, whatever the server does.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from typing import Any, cast

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ClosedPoolError, ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from whiskypay.deadline import Resolver, current_attempt
from whiskypay.errors import RefusedHost


def is_public_address(address: str) -> bool:
    """Return True if address is a globally routable unicast IPv4/IPv6 address (IPv4-mapped IPv6 unwrapped).

    Loopback, private, shared (CGNAT), link-local, IPv6 site-local (fec0::/10), unique-local, multicast, reserved,
    documentation and unspecified addresses are not public; neither are 6to4 and Teredo addresses.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None or ip.teredo is not None:
            return False
        elif ip.is_site_local:  # fec0::/10: deprecated (RFC 3879), still routed inside some networks
            return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    )


def _checked(sock: socket.socket, host: str) -> socket.socket:
    peer = sock.getpeername()[0]
    if not is_public_address(peer):
        sock.close()
        raise RefusedHost(
            f"callback host {host} resolved to non-public address {peer}; refused "
            "(set WHISKYPAY_ALLOW_PRIVATE_CALLBACKS=true only for development)",
            host=host,
        )
    return sock


def resolve_within(host: str, port: int, timeout_s: float, *, resolver: Resolver = socket.getaddrinfo) -> list[Any]:
    """Return resolver's addresses for host:port (TCP), or raise `socket.timeout` after timeout_s seconds.

    getaddrinfo cannot be interrupted, so a name runs in a thread of its own; a resolver that hangs leaves that
    (daemon) thread behind, not the caller. An IP literal is resolved inline.
    """
    family = allowed_gai_family()
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        pass
    else:
        return resolver(host, port, family, socket.SOCK_STREAM)
    answer: list[Any] = []
    done = threading.Event()

    def resolve() -> None:
        try:
            answer.append(resolver(host, port, family, socket.SOCK_STREAM))
        except BaseException as exc:
            answer.append(exc)
        finally:
            done.set()

    threading.Thread(target=resolve, name="whiskypay-resolve", daemon=True).start()
    if not done.wait(max(timeout_s, 0.0)):
        raise TimeoutError(f"resolving {host} took longer than {timeout_s:.1f} s")
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return list(answer[0])


def connect_within(
    host: str, port: int, timeout_s: float, *, resolver: Resolver = socket.getaddrinfo,
    socket_options: Any = None, source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """Open a TCP connection to host:port within timeout_s seconds in all: resolution and every address tried.

    Like urllib3's `create_connection`, it tries each address in turn, but they share one budget: a host with
    many unreachable addresses does not get one connect timeout per address.
    """
    deadline = time.monotonic() + timeout_s
    infos = resolve_within(host, port, timeout_s, resolver=resolver)
    error: OSError | None = None
    for family, socktype, proto, _, address in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, socktype, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(remaining)
            if source_address:
                sock.bind(source_address)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.settimeout(timeout_s)
        return sock
    if error is not None and time.monotonic() < deadline:
        raise error
    raise TimeoutError(f"connecting to {host} took longer than {timeout_s:.1f} s")


class _BoundedHTTPConnection(HTTPConnection):
    """A connection that resolves and connects within its connect timeout and the attempt's deadline, and
    hands its socket to the running attempt (`whiskypay.deadline`), also when it is reused."""

    #: Refuse non-public peers (the SSRF guard).
    guarded = False

    def _new_conn(self) -> socket.socket:
        scope = current_attempt()
        budget = self.timeout if isinstance(self.timeout, int | float) else 30.0
        if scope is not None:
            budget = min(budget, scope.remaining())
        try:
            sock = connect_within(
                self._dns_host, self.port, budget, resolver=scope.resolver if scope else socket.getaddrinfo,
                socket_options=self.socket_options, source_address=self.source_address,
            )
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. (connect timeout={budget})") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {type(exc).__name__}") from exc
        if self.guarded:
            _checked(sock, self.host)
        if scope is not None:
            try:
                scope.use(sock)
            except BaseException:
                sock.close()
                raise
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        scope = current_attempt()
        if scope is not None and self.sock is not None:  # a kept-alive connection (a new one was handed over)
            scope.use(self.sock)
        super().request(*args, **kwargs)


class _BoundedHTTPSConnection(_BoundedHTTPConnection, HTTPSConnection):
    pass


class _GuardedHTTPConnection(_BoundedHTTPConnection):
    guarded = True


class _GuardedHTTPSConnection(_BoundedHTTPSConnection):
    guarded = True


class IdleConnections:
    """The kept-alive connections of every pool of one adapter: at most limit of them idle with a socket open.

    A connection handed back to its pool becomes the newest idle one; past the limit the oldest idle one, of
    whichever pool, is closed where it sits (its pool keeps the socket-less connection object, which reconnects
    when it is next taken, as for a connection the server dropped). So a process talking to many merchants holds
    at most limit idle sockets, plus the ones in use (one per worker thread at most), whatever the pools' sizes.

    Parameters:
      limit: The most idle connections kept open, in all.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._idle: dict[HTTPConnection, None] = {}  # insertion order: the oldest idle connection first

    def __len__(self) -> int:
        return len(self._idle)

    def parked(self, conn: HTTPConnection) -> None:
        """Count conn, about to go back into its pool, as the newest idle connection; close the oldest past limit."""
        if conn.sock is None:
            return  # closed (a body left unread, a dropped connection): no descriptor held
        with self._lock:
            self._idle[conn] = None
            while len(self._idle) > self.limit:
                oldest = next(iter(self._idle))
                del self._idle[oldest]
                # Under the lock: a thread taking this connection from its pool calls `taken` before using it,
                # so it either finds it closed (and reconnects) or it was never closed here.
                oldest.close()

    def taken(self, conn: HTTPConnection) -> None:
        """Stop counting conn: a thread took it from its pool (or the pool closed it)."""
        with self._lock:
            self._idle.pop(conn, None)


class _SharedIdlePool(HTTPConnectionPool):
    """A pool whose idle connections count against the adapter's `IdleConnections`, and that serves a request
    it gets after it was closed (a PoolManager evicts its least recently used pool when a new host comes) on a
    connection of its own, closed afterwards, instead of failing it with ClosedPoolError."""

    #: The adapter's shared limit (each GuardedAdapter makes subclasses that set it).
    idle: IdleConnections

    def _get_conn(self, timeout: float | None = None) -> Any:
        if self.pool is None:
            return self._new_conn()
        try:
            conn = super()._get_conn(timeout)
        except ClosedPoolError:  # closed between the check and the get
            return self._new_conn()
        self.idle.taken(cast(HTTPConnection, conn))
        return conn

    def _put_conn(self, conn: Any) -> None:
        pool = self.pool
        if pool is not None:
            if conn is not None:
                self.idle.parked(conn)  # before the put: once in the queue another thread may take it
            try:
                pool.put(conn, block=False)  # None too: it is the slot of a connection that was closed
                return
            except queue.Full:  # more in use at once than maxsize: not kept (block=False opens extra ones)
                pass
        if conn is not None:
            self.idle.taken(conn)
            conn.close()

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        while True:
            try:
                conn = pool.get(block=False)
            except queue.Empty:
                break
            if conn is not None:
                self.idle.taken(conn)
                conn.close()


class _BoundedHTTPPool(_SharedIdlePool):
    ConnectionCls = _BoundedHTTPConnection


class _BoundedHTTPSPool(_SharedIdlePool, HTTPSConnectionPool):
    ConnectionCls = _BoundedHTTPSConnection


class _GuardedHTTPPool(_SharedIdlePool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(_SharedIdlePool, HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections refuse non-public peers and keep to the attempt's deadline.

    Every connection resolves and connects within its connect timeout (all addresses together), and hands its
    socket to the running attempt (`whiskypay.deadline.AttemptScope.use`), which bounds the whole attempt.
    Its pools (pool_connections of them, one per scheme, host and port, the least recently used closed first;
    pool_maxsize connections kept each) share one limit on idle connections (`IdleConnections`).

    Parameters:
      allow_private(bool): Accept every address (development and tests only).
      max_idle(int | None): The most idle connections kept open across all pools; default pool_connections x
        pool_maxsize (no limit beyond the pools' own).
    """

    def __init__(self, *, allow_private: bool, max_idle: int | None = None, **kwargs: Any) -> None:
        self.allow_private = allow_private
        self.max_idle = max_idle
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, *args, **kwargs)
        self.idle = IdleConnections(self.max_idle if self.max_idle is not None else connections * maxsize)
        bases: dict[str, type[_SharedIdlePool]] = (
            {"http": _BoundedHTTPPool, "https": _BoundedHTTPSPool}
            if self.allow_private
            else {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
        )
        self.poolmanager.pool_classes_by_scheme = {
            scheme: type(base.__name__, (base,), {"idle": self.idle}) for scheme, base in bases.items()
        }
        # urllib3 (2.x) leaves an evicted pool, and every pool at clear(), to the garbage collector; ours close
        # then, so their idle connections leave the count at once and shutdown closes every connection. A thread
        # that got a pool just before it was evicted is served anyway (`_SharedIdlePool._get_conn`).
        self.poolmanager.pools.dispose_func = _close_pool


def _close_pool(pool: HTTPConnectionPool) -> None:
    pool.close()
