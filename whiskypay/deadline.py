"""A deadline for one webhook attempt, enforced on its socket whatever the server does.

Socket timeouts bound each read, not the attempt: a server that sends one byte per read timeout (of headers,
of a body with or without Content-Length, of an endless chunked body, of a TLS handshake) holds the thread as
long as it likes. Here each attempt runs inside an `AttemptScope`. The connection classes of
`whiskypay.netguard` hand the scope the socket they connected or reuse (`AttemptScope.use`), and one
`Watchdog` thread per process shuts that socket down when the attempt's deadline passes: the blocked read
returns at once, and the attempt fails as timed out. Name resolution runs against the same deadline
(`whiskypay.netguard.resolve_within`), so a slow resolver cannot stretch an attempt either.

SMTP uses the same mechanism (`whiskypay.smtp.smtp_exchange`): each exchange with the relay is one attempt, its
socket handed over as the connection opens (or, for a reused connection, as the exchange starts).

The watchdog shuts down a duplicate of the socket's file descriptor, owned by the scope until the attempt ends:
shutdown acts on the connection shared by both descriptors, and a descriptor number reused by another thread's
socket in the meantime can never be hit.
"""

from __future__ import annotations

import contextvars
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: A `socket.getaddrinfo`-like resolver.
Resolver = Callable[..., list[tuple[Any, ...]]]

#: Called with the connected peer's (address, port) once per attempt; may raise to stop the attempt before the
#: request is sent (the slow-server cap raises `Deferred`).
PeerHook = Callable[[tuple[str, int]], None]

_current: contextvars.ContextVar[AttemptScope | None] = contextvars.ContextVar("whiskypay_attempt", default=None)


def current_attempt() -> AttemptScope | None:
    """Return the attempt running on this thread (or context), or None outside `Watchdog.attempt`."""
    return _current.get()


class AttemptScope:
    """One attempt: its deadline, the socket it uses, and what to do once it knows its peer.

    Parameters:
      deadline: When the attempt must be over, in `time.monotonic()` seconds.
      resolver: The name resolver its connection uses.
      on_peer: Called once with the connected peer; see PeerHook.
    """

    def __init__(self, deadline: float, *, resolver: Resolver, on_peer: PeerHook | None) -> None:
        self.deadline = deadline
        self.resolver = resolver
        self.on_peer = on_peer
        self.expired = False
        self.peer: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._used = False
        self._closed = False

    def remaining(self) -> float:
        """Return the seconds left before the deadline (0 or less once it passed)."""
        return self.deadline - time.monotonic()

    def use(self, sock: socket.socket) -> None:
        """Watch the attempt's connected socket and run on_peer, once per attempt (later calls do nothing)."""
        with self._lock:
            if self._used or self._closed:
                return
            self._used = True
            self._watched.append(socket.socket(fileno=os.dup(sock.fileno())))
            if self.expired:
                self._shutdown_watched()
        peer = sock.getpeername()
        self.peer = (str(peer[0]), int(peer[1]))
        if self.on_peer is not None:
            self.on_peer(self.peer)

    def expire(self) -> None:
        """Mark the deadline passed and shut the watched socket down (the watchdog calls this)."""
        with self._lock:
            if self._closed:
                return
            self.expired = True
            self._shutdown_watched()

    def _shutdown_watched(self) -> None:
        for watched in self._watched:
            try:
                watched.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected (any more): nothing to interrupt

    def close(self) -> None:
        """End the attempt: the watchdog leaves it alone from now on, and the duplicate descriptor is closed."""
        with self._lock:
            self._closed = True
            watched, self._watched = self._watched, []
        for duplicate in watched:
            duplicate.close()


class Watchdog:
    """One thread per process that ends attempts at their deadline (see the module docstring).

    While attempts are open it looks at them every tick_s (they are few: one per worker thread at most), so an
    attempt ends at most tick_s after its deadline; once none has been open for linger_s it sleeps until the next
    one. A new attempt wakes it only from that sleep: waking it for every attempt (a thread switch each time)
    cost a tenth of a busy worker's CPU per webhook (BENCHMARKS.md). It starts with the first attempt and stops
    with `stop()` (HttpClients and SmtpClients, which have one each, call it at worker shutdown).

    Parameters:
      tick_s: How often open attempts are checked, in seconds.
      linger_s: How long it keeps ticking with no attempt open before it sleeps, in seconds.
    """

    def __init__(self, *, tick_s: float = 0.05, linger_s: float = 1.0) -> None:
        self.tick_s = tick_s
        self.linger_s = linger_s
        self._cond = threading.Condition()
        self._open: set[AttemptScope] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._sleeping = False  # in the wait without a timeout; read and written under _cond

    @contextmanager
    def attempt(
        self, seconds: float, *, resolver: Resolver = socket.getaddrinfo, on_peer: PeerHook | None = None
    ) -> Iterator[AttemptScope]:
        """Run the body as one attempt that must end within seconds; yield its scope.

        Parameters:
          seconds: The attempt's whole budget: name resolution, connect, TLS, request and response.
          resolver: The name resolver (injected in tests).
          on_peer: See PeerHook.
        """
        scope = AttemptScope(time.monotonic() + seconds, resolver=resolver, on_peer=on_peer)
        with self._cond:
            self._open.add(scope)
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="whiskypay-attempt-watchdog", daemon=True)
                self._thread.start()
            elif self._sleeping:
                self._cond.notify()  # a ticking watchdog finds this scope within tick_s by itself
        token = _current.set(scope)
        try:
            yield scope
        finally:
            _current.reset(token)
            with self._cond:
                self._open.discard(scope)
            scope.close()

    def _run(self) -> None:
        with self._cond:
            quiet_since = time.monotonic()
            while not self._stopping:
                now = time.monotonic()
                if self._open:
                    quiet_since = now
                    for scope in [scope for scope in self._open if scope.deadline <= now]:
                        self._open.discard(scope)
                        scope.expire()
                elif now - quiet_since >= self.linger_s:
                    self._sleeping = True
                    try:
                        self._cond.wait()
                    finally:
                        self._sleeping = False
                    quiet_since = time.monotonic()
                    continue
                self._cond.wait(self.tick_s)

    def stop(self) -> None:
        """Stop the thread (attempts still running are no longer bounded by it)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
