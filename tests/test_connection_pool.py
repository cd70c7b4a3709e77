"""Tier 2: the worker process's one webhook pool (HttpClients), counted on the server side.

Every worker thread shares one pool per callback host, so a connection one thread left idle is the next thread's,
for one busy merchant and for a hundred; the pools never make a thread wait; idle connections are bounded across
hosts; and a new connection in a pool that has been serving a public peer is still checked (the SSRF guard).
Real HTTP servers on loopback (`devstack.HttpReceiver`) count the TCP connections they accept.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from middleware.http_client import HttpClients
from tests.helpers import wait_until
from whiskypay import netguard
from whiskypay.devstack import HttpReceiver, Response
from whiskypay.errors import RefusedHost

BODY = b'{"plan":"pro"}'


def clients(**overrides: Any) -> HttpClients:
    options: dict[str, Any] = dict(
        allow_private=True, connect_timeout_s=2, read_timeout_s=2, max_response_bytes=65_536, pool_maxsize=8
    )
    return HttpClients(**{**options, **overrides})


def run_threads(count: int, target: Callable[[int], object], *, one_by_one: bool = False) -> None:
    """Run target(i) for i in range(count), each on its own thread; all at once, or each after the last ended."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
        if one_by_one:
            thread.join(10)
    for thread in threads:
        thread.join(10)
    assert errors == []


@pytest.fixture
def merchants() -> Iterator[list[HttpReceiver]]:
    """Twenty merchants: one HTTP server on each of 127.0.0.2 to 127.0.0.21."""
    receivers = [HttpReceiver(host=f"127.0.0.{2 + index}").start() for index in range(20)]
    try:
        yield receivers
    finally:
        for receiver in receivers:
            receiver.stop()


def test_threads_posting_to_one_merchant_in_turn_share_one_kept_alive_connection(receiver: HttpReceiver) -> None:
    # Given the process's pool and one merchant
    http = clients()
    # When 8 threads, one after another, each post 3 webhooks
    run_threads(8, lambda _: [http.post(receiver.url(), BODY, {}) for _ in range(3)], one_by_one=True)
    # Then all 24 arrived over the one connection the first thread opened
    assert len(receiver.requests("/hook")) == 24
    assert receiver.accepted == 1


def test_threads_posting_at_once_open_one_connection_each_at_most_and_reuse_them(receiver: HttpReceiver) -> None:
    # Given a merchant that answers after 0.3 s, and 6 threads posting at once, twice
    receiver.respond("/slow", *[Response(status=200, delay_s=0.3)] * 12)
    http = clients()
    all_in_flight = threading.Barrier(6, timeout=10)

    def post_twice(_: int) -> None:
        for _ in range(2):
            all_in_flight.wait()
            http.post(receiver.url("/slow"), BODY, {})

    run_threads(6, post_twice)
    # Then the second round reused the first round's 6 connections
    assert len(receiver.requests("/slow")) == 12
    assert receiver.accepted == 6


def test_a_thread_never_waits_for_a_pool_slot(receiver: HttpReceiver) -> None:
    # Given a pool that keeps one connection per host, and 4 threads posting at once to a merchant taking 0.4 s
    receiver.respond("/slow", *[Response(status=200, delay_s=0.4)] * 4)
    http = clients(pool_maxsize=1)
    started = time.monotonic()
    run_threads(4, lambda _: http.post(receiver.url("/slow"), BODY, {}))
    # Then they ran side by side (one after another would take 1.6 s), on a connection each
    assert time.monotonic() - started < 1.2
    assert receiver.accepted == 4


def test_threads_posting_round_robin_to_twenty_merchants_reuse_one_connection_per_merchant(
    merchants: list[HttpReceiver],
) -> None:
    # Given the process's pool, 20 merchants, and 8 threads that each post to all of them, one thread after another
    http = clients()

    def post_to_all(index: int) -> None:
        for offset in range(len(merchants)):
            merchant = merchants[(index + offset) % len(merchants)]
            http.post(merchant.url(), BODY, {})

    run_threads(8, post_to_all, one_by_one=True)
    # Then each merchant got its 8 webhooks over the one connection the first thread opened
    assert [len(merchant.requests("/hook")) for merchant in merchants] == [8] * 20
    assert [merchant.accepted for merchant in merchants] == [1] * 20


def test_idle_connections_are_bounded_across_merchants_oldest_closed_first(merchants: list[HttpReceiver]) -> None:
    # Given a pool that keeps at most 3 idle connections in all
    http = clients(idle_connections=3)
    six = merchants[:6]
    # When one webhook goes to each of 6 merchants in turn
    for merchant in six:
        http.post(merchant.url(), BODY, {})
    # Then the 3 oldest connections were closed and the 3 newest are kept
    wait_until(
        lambda: [merchant.open_connections() for merchant in six] == [0, 0, 0, 1, 1, 1],
        what="the three oldest idle connections closed",
    )
    # And the newest are reused, while an evicted merchant gets a new connection
    http.post(six[-1].url(), BODY, {})
    http.post(six[0].url(), BODY, {})
    assert [merchant.accepted for merchant in six] == [2, 1, 1, 1, 1, 1]


def test_a_pool_dropped_for_a_new_host_closes_its_connections_and_still_serves_a_thread_holding_it(
    merchants: list[HttpReceiver],
) -> None:
    # Given a pool manager that keeps pools for 2 hosts, and a thread that got the first host's pool
    http = clients(pool_hosts=2)
    first, second, third = merchants[:3]
    http.post(first.url(), BODY, {})
    adapter = http.session().get_adapter(first.url())
    held = adapter.poolmanager.connection_from_url(  # type: ignore[attr-defined]
        first.url(), pool_kwargs={"cert_reqs": "CERT_REQUIRED"}  # the key whiskypay.delivery uses
    )
    # When two other hosts are posted to, then the first host's pool is closed with its connection
    http.post(second.url(), BODY, {})
    http.post(third.url(), BODY, {})
    wait_until(lambda: first.open_connections() == 0, what="the dropped pool's connection closed")
    # And the thread holding the dropped pool is served on a connection of its own, closed after
    response = held.urlopen("POST", "/hook", body=BODY, retries=False, assert_same_host=False)
    assert response.status == 200
    assert first.accepted == 2
    wait_until(lambda: first.open_connections() == 0, what="the one-off connection closed")


def test_a_pool_serving_a_public_peer_still_refuses_a_new_connection_to_a_private_one(
    receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a merchant host whose name resolves to a "public" server (127.0.0.2, taken as public here), and the
    # production guard (private peers refused)
    with HttpReceiver(host="127.0.0.2") as public:
        monkeypatch.setattr(netguard, "is_public_address", lambda address: address == "127.0.0.2")
        answers = {"merchant.test": ("127.0.0.2", public.port)}

        def resolve(host: str, port: int, family: int, socktype: int) -> list[tuple[Any, ...]]:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", answers[host])]

        http = clients(allow_private=False, resolver=resolve)
        url = f"http://merchant.test:{public.port}/hook"
        # And two threads in turn posted over one kept-alive connection, the last answer closing it
        public.respond("/hook", Response(status=200), Response(status=200, headers={"Connection": "close"}))
        run_threads(2, lambda _: http.post(url, BODY, {}), one_by_one=True)
        assert public.accepted == 1
        wait_until(lambda: public.open_connections() == 0, what="the merchant to close the connection")
        # When the name now resolves to a private server (DNS rebinding) and the pool needs a new connection
        answers["merchant.test"] = ("127.0.0.1", receiver.port)
        # Then it is refused, in another thread too, and the private server never sees a request
        with pytest.raises(RefusedHost):
            http.post(url, BODY, {})
        refused: list[BaseException] = []

        def post_refused(_: int) -> None:
            with pytest.raises(RefusedHost) as raised:
                http.post(url, BODY, {})
            refused.append(raised.value)

        run_threads(1, post_refused)
        assert len(refused) == 1
        assert receiver.requests() == []
        wait_until(lambda: receiver.accepted == 2, what="two connections (checked, closed unsent)")
        assert len(public.requests("/hook")) == 2
