"""Tier 2: HttpClients against a real local HTTP server: the process's session, its guards, the slow-host cap."""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import pytest
import requests
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

from middleware.http_client import HttpClients
from tests.helpers import wait_until
from whiskypay.delivery import Attempt
from whiskypay.devstack import HttpReceiver, Response
from whiskypay.errors import Deferred, DeliveryError, HttpStatusError, RefusedHost

BODY = b'{"plan":"pro"}'


def clients(**overrides: Any) -> HttpClients:
    options: dict[str, Any] = dict(
        allow_private=True, connect_timeout_s=2, read_timeout_s=2, max_response_bytes=65_536,
        host_concurrency=1, slow_after_s=0.3,
    )
    return HttpClients(**{**options, **overrides})


def in_thread(fn: Any) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def pools(session: requests.Session) -> int:
    """Return how many connection pools the session's adapter keeps open."""
    return len(session.get_adapter("http://127.0.0.1/").poolmanager.pools)  # type: ignore[attr-defined]


def test_given_two_threads_when_they_post_then_they_share_the_process_session(receiver: HttpReceiver) -> None:
    http = clients()
    http.post(receiver.url(), BODY, {})
    mine = http.session()
    theirs: list[requests.Session] = []

    def post() -> None:
        http.post(receiver.url(), BODY, {})
        theirs.append(http.session())

    in_thread(post).join()
    assert theirs == [mine]
    assert pools(mine) == 1


def test_given_a_merchant_when_posted_to_then_it_sees_our_user_agent_and_the_body_and_we_get_its_status(
    receiver: HttpReceiver,
) -> None:
    receiver.respond("/hook", Response(status=202))
    attempt = clients().post(receiver.url(), BODY, {"webhook-id": "evt_1"})
    assert isinstance(attempt, Attempt) and attempt.status == 202
    [hit] = receiver.requests("/hook")
    assert hit.body == BODY and hit.headers["webhook-id"] == "evt_1"
    assert hit.headers["user-agent"] == "WhiskyPay-Webhooks/1"


def test_given_a_redirect_when_posted_then_it_is_not_followed_and_fails_with_its_status(
    receiver: HttpReceiver,
) -> None:
    receiver.respond("/moved", Response(status=302, headers={"Location": receiver.url("/elsewhere")}))
    with pytest.raises(HttpStatusError) as raised:
        clients().post(receiver.url("/moved"), BODY, {})
    assert raised.value.tags["http_status"] == 302
    assert receiver.requests("/elsewhere") == []


def test_given_a_proxy_in_the_environment_when_posted_then_it_is_ignored(
    receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given proxy variables pointing at a port nothing listens on
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    # When a webhook is posted, then it goes straight to the merchant
    assert clients().post(receiver.url(), BODY, {}).status == 200
    assert len(receiver.requests("/hook")) == 1


def test_given_private_hosts_are_not_allowed_when_posting_to_loopback_then_it_is_refused_unsent(
    receiver: HttpReceiver,
) -> None:
    with pytest.raises(RefusedHost):
        clients(allow_private=False).post(receiver.url(), BODY, {})
    assert receiver.requests() == []


def test_given_a_merchant_slower_than_the_read_timeout_when_posted_then_the_attempt_fails_in_time(
    receiver: HttpReceiver,
) -> None:
    receiver.respond("/hook", Response(status=200, delay_s=1.0))
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"timed out waiting for 127\.0\.0\.1"):
        clients(read_timeout_s=0.3).post(receiver.url(), BODY, {})
    assert time.monotonic() - started < 0.9


def test_given_a_slow_request_in_flight_when_another_goes_to_its_server_then_it_is_deferred_and_others_flow(
    receiver: HttpReceiver,
) -> None:
    # Given one request to a server (127.0.0.1) running past slow_after_s (0.3 s), with host_concurrency 1
    receiver.respond("/slow", Response(status=200, delay_s=0.8))
    http = clients(read_timeout_s=2)
    slow = in_thread(lambda: http.post(receiver.url("/slow"), BODY, {}))
    receiver.wait_for(1, path="/slow")
    time.sleep(0.4)
    # When another request goes to that server, also by another name, then it is deferred by one read timeout, unsent
    for url in (receiver.url("/fast"), f"http://localhost:{receiver.port}/fast"):
        with pytest.raises(Deferred) as raised:
            http.post(url, BODY, {})
        assert raised.value.delay == 2_000 and raised.value.tags["server"] == f"127.0.0.1:{receiver.port}"
    assert raised.value.tags["host"] == "localhost"
    assert receiver.requests("/fast") == []
    # And another server (127.0.0.2) is not capped
    with HttpReceiver(host="127.0.0.2") as other:
        assert http.post(other.url("/fast"), BODY, {}).status == 200
    slow.join(5)


def test_given_a_host_marked_slow_then_it_stays_capped_until_one_of_its_requests_is_fast_again(
    receiver: HttpReceiver,
) -> None:
    receiver.respond("/slow", Response(status=200, delay_s=0.5))
    http = clients()
    # Given a slow request that has ended: its host is still slow
    http.post(receiver.url("/slow"), BODY, {})
    # When a new request to it is in flight (not yet slow itself), then the next one is deferred at once
    second = in_thread(lambda: http.post(receiver.url("/slow"), BODY, {}))
    receiver.wait_for(2, path="/slow")
    with pytest.raises(Deferred):
        http.post(receiver.url("/fast"), BODY, {})
    second.join(5)
    # And once a request to it is fast, a request next to an in-flight one passes again
    http.post(receiver.url("/fast"), BODY, {})
    third = in_thread(lambda: http.post(receiver.url("/slow"), BODY, {}))
    receiver.wait_for(3, path="/slow")
    assert http.post(receiver.url("/fast"), BODY, {}).status == 200
    third.join(5)


def test_given_a_worker_that_delivered_when_it_shuts_down_then_the_pool_is_closed(receiver: HttpReceiver) -> None:
    # Given a stub worker of 3 threads, two of which posted at once through the process's pool
    http = clients()
    broker = StubBroker(middleware=[http])
    both_posted = threading.Barrier(2, timeout=5)

    def deliver() -> None:
        http.post(receiver.url(), BODY, {})
        both_posted.wait()  # keep this thread busy so the other message goes to another thread

    dramatiq.actor(deliver, broker=broker, actor_name="deliver", queue_name="q")
    worker = Worker(broker, worker_timeout=20, worker_threads=3)
    worker.start()
    try:
        broker.actors["deliver"].send()
        broker.actors["deliver"].send()
        broker.join("q", fail_fast=True, timeout=10_000)
        session = http.session()
        adapter = session.get_adapter("http://127.0.0.1/")
        # Then the pool was sized at boot for every worker thread, and it keeps both connections
        assert pools(session) == 1
        pool = adapter.poolmanager.connection_from_url(  # type: ignore[attr-defined]
            receiver.url(), pool_kwargs={"cert_reqs": "CERT_REQUIRED"}  # the key whiskypay.delivery uses
        )
        assert pool.pool.maxsize == 3
        assert len(adapter.idle) == 2  # type: ignore[attr-defined]
    finally:
        # When the worker shuts down (after_worker_shutdown)
        worker.stop()
        broker.close()
    # Then the pool and its connections are closed
    assert pools(session) == 0 and len(adapter.idle) == 0  # type: ignore[attr-defined]
    wait_until(lambda: receiver.open_connections() == 0, what="the receiver to see both connections closed")
