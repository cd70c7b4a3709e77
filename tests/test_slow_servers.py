"""Tier 1: one merchant cannot hold a worker thread: every attempt ends at its deadline, whatever the server does,
and the slow-delivery cap counts against the server reached, however its host is spelled (issue 9 items 5, 6).

Real servers on loopback, one thread per connection, that misbehave on purpose; HttpClients (the worker's own
middleware instance, without a broker) makes each attempt, and the wall time of each attempt is measured.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from middleware.http_client import HttpClients, peer_key
from whiskypay.delivery import Attempt
from whiskypay.errors import Deferred, DeliveryError

CONNECT_S = 0.4
READ_S = 0.6
#: The watchdog's tick (0.05 s) plus scheduling noise on a busy 2-core machine.
MARGIN_S = 0.5
#: Each trickle sends one byte this often: well inside the read timeout, so no socket timeout ever fires.
TRICKLE_S = 0.1
#: How long a trickling server keeps going at most (an unbounded client would still be blocked then).
TRICKLE_FOR_S = 8.0


class MisbehavingServer:
    """A TCP server on host that runs behave(connection) in a thread per connection; counts connections in flight.

    Parameters:
      behave: What to do with each accepted connection (it is closed afterwards).
      host: The loopback address to listen on.
    """

    def __init__(self, behave: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        self.behave = behave
        self.listener = socket.create_server((host, 0))
        self.host, self.port = host, self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        #: Requests received and not answered yet (a test's behaviour counts them).
        self.answering = 0
        self.max_answering = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.behave(conn)
        except OSError:
            pass  # the client hung up: what a bounded client does
        finally:
            with self.lock:
                self.in_flight -= 1
            conn.close()

    def trickle(self, conn: socket.socket, data: bytes) -> None:
        """Send data one byte per TRICKLE_S, for at most TRICKLE_FOR_S."""
        until = time.monotonic() + TRICKLE_FOR_S
        for byte in data:
            if time.monotonic() > until or self.stopped.is_set():
                return
            conn.sendall(bytes([byte]))
            time.sleep(TRICKLE_S)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


def read_request(conn: socket.socket) -> bool:
    """Read one request's head and its Content-Length body; return False if the client hung up first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = lengths[0] if lengths else 0
    while len(body) < length:
        body += conn.recv(65536)
    return True


@pytest.fixture
def servers() -> Iterator[Callable[..., MisbehavingServer]]:
    started: list[MisbehavingServer] = []

    def start(behave: Callable[[MisbehavingServer, socket.socket], None], host: str = "127.0.0.1") -> MisbehavingServer:
        server: MisbehavingServer = MisbehavingServer(lambda conn: behave(server, conn), host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def clients(**overrides: Any) -> HttpClients:
    options: dict[str, Any] = dict(allow_private=True, connect_timeout_s=CONNECT_S, read_timeout_s=READ_S,
                                   max_response_bytes=65536)  # fmt: skip
    return HttpClients(**{**options, **overrides})


def timed_attempt(http: HttpClients, url: str, give_up_s: float = 6.0) -> tuple[float, object]:
    """Make one attempt in a thread; return (wall seconds, Attempt or exception), or (inf, None) if still blocked."""
    outcome: list[object] = []

    def attempt() -> None:
        try:
            outcome.append(http.post(url, b"{}", {}))
        except Exception as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(give_up_s)
    return (time.monotonic() - started, outcome[0]) if outcome else (float("inf"), None)


# The ways a server can make one attempt last: each sends the next byte well within the read timeout.
BEHAVIOURS: dict[str, Callable[[MisbehavingServer, socket.socket], None]] = {
    "trickled headers": lambda s, c: (read_request(c), s.trickle(c, b"HTTP/1.1 200 OK\r\n" + b"X-Slow: y\r\n" * 999)),
    "trickled body with Content-Length": lambda s, c: (
        read_request(c), c.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 100000\r\n\r\n"), s.trickle(c, b"x" * 999)),
    "trickled body without Content-Length": lambda s, c: (
        read_request(c), c.sendall(b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\n"), s.trickle(c, b"x" * 999)),
    "endless chunked body": lambda s, c: (
        read_request(c), c.sendall(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n"),
        s.trickle(c, b"1\r\nx\r\n" * 999)),
    # A TLS record header announcing 16 KiB, then its bytes one at a time: the handshake never completes.
    "trickled TLS handshake": lambda s, c: s.trickle(c, b"\x16\x03\x03\x40\x00" + b"\x00" * 999),
}


@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
def test_every_attempt_ends_within_connect_plus_read_timeout_whatever_the_server_does(
    servers: Callable[..., MisbehavingServer], behaviour: str
) -> None:
    # Given a server that keeps an attempt alive by sending a byte every 0.1 s (read timeout 0.6 s)
    server = servers(BEHAVIOURS[behaviour])
    scheme = "https" if "TLS" in behaviour else "http"
    # When one attempt is made
    elapsed, outcome = timed_attempt(clients(), f"{scheme}://127.0.0.1:{server.port}/hook?token=T0KEN")
    # Then it ended within connect + read timeout and a small margin, as a timed-out failure or with the
    # status that arrived in time
    assert elapsed < CONNECT_S + READ_S + MARGIN_S, f"{behaviour}: {elapsed:.2f} s"
    assert isinstance(outcome, DeliveryError | Attempt), outcome
    assert "T0KEN" not in str(outcome)


def test_a_slow_name_resolution_counts_against_the_connect_timeout() -> None:
    # Given a resolver that takes 5 s to answer
    def slow_resolver(*args: Any) -> list[Any]:
        time.sleep(5)
        return socket.getaddrinfo(*args)

    # When one attempt is made to a host name
    elapsed, outcome = timed_attempt(clients(resolver=slow_resolver), "http://slow-dns.merchant.test/hook")
    # Then it failed as a timeout within the connect timeout (and the margin)
    assert elapsed < CONNECT_S + MARGIN_S, f"{elapsed:.2f} s"
    assert isinstance(outcome, DeliveryError) and "timed out" in str(outcome), outcome


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept queue is full: a new connect to it hangs (the SYN is dropped)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.05)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


def test_a_host_with_many_unreachable_addresses_gets_one_connect_timeout_in_all(black_hole: int) -> None:
    # Given a host name with ten addresses whose connects all hang
    def ten_addresses(host: str, port: int, *args: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", black_hole))] * 10

    # When one attempt is made
    elapsed, outcome = timed_attempt(clients(resolver=ten_addresses), "http://many.merchant.test/hook")
    # Then it gave up after one connect timeout in all, not one per address
    assert elapsed < CONNECT_S + MARGIN_S, f"{elapsed:.2f} s"
    assert isinstance(outcome, DeliveryError), outcome


def test_a_server_that_answers_in_time_is_unaffected(servers: Callable[..., MisbehavingServer]) -> None:
    # Given a server that answers 200 with a 20 KiB body at once, on a kept-alive connection
    def answer(server: MisbehavingServer, conn: socket.socket) -> None:
        for _ in range(3):
            read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000)

    server = servers(answer)
    http = clients()
    # When one thread makes three attempts one after the other, then each is delivered, over one connection
    for _ in range(3):
        assert http.post(f"http://127.0.0.1:{server.port}/hook", b"{}", {}).status == 200
    assert server.requests == 1
    http.after_worker_shutdown(None, None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Item 6: the cap counts against the server
# ----------------------------------------------------------------------------------------------------------------

#: One server at 127.0.0.2, spelled seven ways the system resolver reads (IPv4 shorthand, decimal, hex, octal,
#: IPv4-mapped IPv6): seven different "hosts" to anything keyed by the URL.
SPELLINGS = ["127.0.0.2", "127.2", "2130706434", "0x7f000002", "0177.0.0.2", "127.0.2", "[::ffff:127.0.0.2]"]


def test_the_peer_key_is_the_address_and_port_with_ipv4_mapped_addresses_unwrapped() -> None:
    assert peer_key(("127.0.0.2", 443)) == "127.0.0.2:443"
    assert peer_key(("::ffff:127.0.0.2", 443)) == "127.0.0.2:443"
    assert peer_key(("2001:db8::1", 443)) == "[2001:db8::1]:443"


def test_the_slow_delivery_cap_counts_one_server_however_its_host_is_spelled(
    servers: Callable[..., MisbehavingServer],
) -> None:
    release = threading.Event()

    def slow(server: MisbehavingServer, conn: socket.socket) -> None:
        if not read_request(conn):
            return  # a deferred delivery: connected, then hung up without a request
        with server.lock:
            server.answering += 1
            server.max_answering = max(server.max_answering, server.answering)
        release.wait(5)
        with server.lock:
            server.answering -= 1
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def fast(server: MisbehavingServer, conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    # Given a slow server on 127.0.0.2 and a fast one on 127.0.0.3, and a cap of 2 slow deliveries per server
    slow_server, fast_server = servers(slow, host="127.0.0.2"), servers(fast, host="127.0.0.3")
    http = clients(host_concurrency=2, slow_after_s=0.2, read_timeout_s=5.0)
    port = slow_server.port
    # And the slow one is known to be slow (one delivery took longer than slow_after_s)
    threading.Timer(0.3, release.set).start()
    _, first = timed_attempt(http, f"http://127.0.0.2:{port}/hook")
    assert isinstance(first, Attempt)
    release.clear()
    # When seven deliveries to it start at once, each URL spelling its host differently
    outcomes: list[object] = []
    threads = [threading.Thread(target=lambda h=host: outcomes.append(timed_attempt(http, f"http://{h}:{port}/x")[1]))
               for host in SPELLINGS]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    in_flight_during = slow_server.answering
    # Then the fast server on another address is not capped meanwhile
    _, other = timed_attempt(http, f"http://127.0.0.3:{fast_server.port}/hook")
    release.set()
    for thread in threads:
        thread.join(10)
    # And the slow server never had more than 2 requests in flight: the other 5 were deferred, naming the server
    assert isinstance(other, Attempt)
    assert in_flight_during == 2 and slow_server.max_answering == 2
    deferred = [outcome for outcome in outcomes if isinstance(outcome, Deferred)]
    assert len(deferred) == 5 and sum(isinstance(outcome, Attempt) for outcome in outcomes) == 2
    assert all(outcome.tags["server"] == f"127.0.0.2:{port}" for outcome in deferred)
    http.after_worker_shutdown(None, None)  # type: ignore[arg-type]
