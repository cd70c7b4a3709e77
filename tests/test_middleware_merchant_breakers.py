"""Tier 2: MerchantBreakers' hooks called directly (its store on the test Redis), next to QueueRetryPolicy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker

from middleware.merchant_breakers import MerchantBreakers
from middleware.retry_policy import QueueRetryPolicy
from tests.helpers import NAMESPACE
from whiskypay import keys
from whiskypay.breakers import BreakerStore
from whiskypay.errors import HttpStatusError, Parked
from whiskypay.outcomes import Outcome, classify
from whiskypay.retrying import RetryPolicy

QUEUE = "callbackQueue"


def callback(n: int, *, host: str = "shop.example", merchant_id: str | None = None) -> MessageProxy:
    kwargs: dict[str, Any] = {"callback_url": f"https://{host}/hook", "email": "b@example.com"}
    if merchant_id:
        kwargs["merchant_id"] = merchant_id
    return MessageProxy(Message(queue_name=QUEUE, actor_name="send_callback", args=(), kwargs=kwargs,
                                options={"redis_message_id": f"rid-{n}"}, message_id=f"m-{n}",
                                message_timestamp=1_000 + n))


def down(host: str = "shop.example") -> HttpStatusError:
    return HttpStatusError(f"HTTP 503 from {host}", host=host, http_status=503)


@pytest.fixture
def breakers(redis_client: redis.Redis) -> MerchantBreakers:
    middleware = MerchantBreakers(failures=2, probe_interval_ms=60_000, release_rate=50, park_max_ms=10**9)
    middleware.store = BreakerStore(redis_client, NAMESPACE)
    return middleware


@pytest.fixture
def broker(breakers: MerchantBreakers) -> Iterator[StubBroker]:
    broker = StubBroker(middleware=[
        QueueRetryPolicy(policies={QUEUE: RetryPolicy(attempts=5, backoff_ms=10)}), breakers
    ])
    broker.declare_queue(QUEUE)

    @dramatiq.actor(broker=broker, actor_name="send_callback", queue_name=QUEUE)
    def send_callback(**kwargs: Any) -> None: ...

    yield broker
    broker.close()


def after(broker: StubBroker, message: MessageProxy, exception: BaseException | None) -> None:
    """Run every after_process_message hook as the worker does (in reverse order)."""
    broker.emit_after("process_message", message, exception=exception)


def test_a_healthy_merchant_costs_no_redis_call(broker: StubBroker, breakers: MerchantBreakers,
                                                redis_client: redis.Redis) -> None:
    message = callback(1)
    broker.emit_before("process_message", message)
    after(broker, message, None)
    assert redis_client.keys("*") == [] and breakers.view.all() == []


def test_the_attempt_that_trips_the_breaker_is_parked_without_spending_a_retry(
    broker: StubBroker, breakers: MerchantBreakers
) -> None:
    # Given two callbacks in flight to a merchant with threshold 2
    first, second = callback(1), callback(2)
    broker.emit_before("process_message", first)
    broker.emit_before("process_message", second)
    # When the first fails it is retried as usual
    after(broker, first, down())
    assert first.options["retries"] == 1 and classify(first, down()) == Outcome("failed", "retried")
    # And a third is parked before it runs: one failure + one in flight could already make the threshold
    third = callback(3)
    with pytest.raises(Parked):
        broker.emit_before("process_message", third)
    # When the second fails, the breaker opens and it is parked: no retry scheduled, no attempt spent
    after(broker, second, down())
    assert "retries" not in second.options and classify(second, down()) == Outcome("failed", "parked")
    assert broker.queues[f"{QUEUE}.DQ"].qsize() == 1  # only the first one's retry
    # And from now on callbacks of this merchant are parked on arrival, not attempted
    fourth = callback(4)
    with pytest.raises(Parked) as parked:
        broker.emit_before("process_message", fourth)
    assert classify(fourth, parked.value) == Outcome("deferred", "parked")
    after(broker, fourth, parked.value)
    breaker = breakers.store.snapshot()["host=shop.example"]  # type: ignore[union-attr]
    assert (breaker.state, breaker.parked, breaker.failures) == ("open", 3, 2)
    # While a callback of another merchant, with a merchant_id, goes through untouched
    other = callback(5, merchant_id="m_other")
    broker.emit_before("process_message", other)
    after(broker, other, None)


def test_a_reply_that_is_not_an_outage_resets_the_count(broker: StubBroker, breakers: MerchantBreakers) -> None:
    first, second, third = callback(1), callback(2), callback(3)
    broker.emit_before("process_message", first)
    after(broker, first, down())
    broker.emit_before("process_message", second)
    after(broker, second, HttpStatusError("HTTP 404 from shop.example", http_status=404))
    broker.emit_before("process_message", third)
    after(broker, third, down())
    assert breakers.store.snapshot()["host=shop.example"].state == "closed"  # type: ignore[union-attr]


def test_one_failure_of_a_busy_merchant_does_not_hold_back_its_other_callbacks(redis_client: redis.Redis) -> None:
    # Given a threshold of 10 and a merchant with 12 attempts in flight in this process
    breakers = MerchantBreakers(failures=10, probe_interval_ms=60_000, release_rate=50, park_max_ms=10**9)
    breakers.store = BreakerStore(redis_client, NAMESPACE)
    broker = StubBroker(middleware=[breakers])
    in_flight = [callback(n) for n in range(12)]
    for message in in_flight:
        broker.emit_before("process_message", message)
    # When one of them fails (one failure, eleven in flight: more than the threshold if all failed)
    broker.emit_after("process_message", in_flight[0], exception=down())
    # Then the next one is still attempted: below half the threshold, failures in a row are no outage yet
    broker.emit_before("process_message", callback(99))
    assert breakers.store.snapshot()["host=shop.example"].parked == 0
    broker.close()


def test_a_redis_error_reply_in_a_breaker_call_leaves_the_callback_to_the_retry_policy(
    broker: StubBroker, breakers: MerchantBreakers, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given another program wrote a string where the merchant's breaker hash goes (WRONGTYPE on every script)
    redis_client.set(keys.breaker(NAMESPACE, "host=shop.example"), "not a hash")
    breakers.view.update("host=shop.example", state="open")  # and the view says it is open
    # When a callback of that merchant arrives and fails
    message = callback(1)
    broker.emit_before("process_message", message)  # not parked: it could not be
    after(broker, message, down())
    # Then it was attempted and is retried as without breakers, and the configuration error was reported once
    assert message.options["retries"] == 1 and "parked" not in message.options
    assert caplog.text.count("with a configuration error (ResponseError: WRONGTYPE") == 1


def lose_replies(store: BreakerStore, script: str) -> None:
    """Make store's `script` run in Redis and then lose its reply, as a connection dropped after the call does."""
    real = store._scripts[script]

    def run_then_drop(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise redis.TimeoutError("Timeout reading from socket")

    store._scripts[script] = run_then_drop  # type: ignore[assignment]


def test_a_callback_parked_on_arrival_whose_reply_was_lost_is_not_attempted_as_well(
    broker: StubBroker, breakers: MerchantBreakers
) -> None:
    # Given a merchant whose breaker is open, and a park whose reply is lost after Redis parked the callback
    for n in (1, 2):
        message = callback(n)
        broker.emit_before("process_message", message)
        after(broker, message, down())
    assert breakers.store is not None
    lose_replies(breakers.store, "park")
    # When a callback of it arrives, then it is parked (not attempted: its parked copy is delivered later)
    third = callback(3)
    with pytest.raises(Parked):
        broker.emit_before("process_message", third)
    assert breakers.store.is_parked("host=shop.example", "rid-3")


def test_a_failed_attempt_parked_whose_reply_was_lost_is_not_retried_as_well(
    broker: StubBroker, breakers: MerchantBreakers
) -> None:
    # Given a merchant one failure from its threshold, and a failure count whose reply is lost after Redis ran it
    first, second = callback(1), callback(2)
    broker.emit_before("process_message", first)
    after(broker, first, down())
    broker.emit_before("process_message", second)
    assert breakers.store is not None
    lose_replies(breakers.store, "fail")
    # When the second fails (the script opened the breaker and parked it), then it is not retried as well
    after(broker, second, down())
    assert breakers.store.is_parked("host=shop.example", "rid-2")
    assert "retries" not in second.options and classify(second, down()) == Outcome("failed", "parked")
    assert broker.queues[f"{QUEUE}.DQ"].qsize() == 1  # only the first one's retry


def test_an_idle_keeper_wakes_once_a_refresh_and_a_park_wakes_it_at_once(
    breakers: MerchantBreakers, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    # Given a keeper (refresh every 0.5 s, tick 20 ms) with no parked callbacks anywhere, counting its rounds
    breakers.refresh_s = 0.5
    rounds: list[float] = []
    monkeypatch.setattr(breakers, "tend", lambda *, now_ms: rounds.append(time.monotonic()))
    thread = threading.Thread(target=breakers._keep, daemon=True)
    thread.start()
    try:
        # When it is idle for 1.2 s, then told this process parked a callback
        time.sleep(1.2)
        idle_rounds = len(rounds)
        breakers.view.update("m_parked", state="open", parked=1)
        breakers._nudge.set()
        time.sleep(0.3)
        # Then it woke only for its refreshes while idle (not every tick: 60 rounds), and ticked once parked
        assert 1 <= idle_rounds <= 3, rounds
        assert len(rounds) - idle_rounds >= 5, rounds
    finally:
        breakers._stop.set()
        breakers._nudge.set()
        thread.join(timeout=2)
    assert not thread.is_alive()
