"""Tier 2/3: WhiskyPayActor's send(): delays, duplicate event ids, and named failures that free the event id."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Broker, Message, Middleware
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import current_millis

from middleware.idempotency import IdempotentEnqueue
from tests.conftest import WhiskyPayBrokerFactory
from tests.helpers import queued
from whiskypay.actor import EnqueueError, WhiskyPayActor
from whiskypay.devstack import free_port
from whiskypay.redis_broker import WhiskyPayRedisBroker
from whiskypay.schemas import InvalidPayload

QUEUE = "q"


def actor_on(broker: Broker) -> WhiskyPayActor:
    actor = dramatiq.actor(
        lambda **kw: None, broker=broker, actor_class=WhiskyPayActor, actor_name="cb", queue_name=QUEUE
    )
    assert isinstance(actor, WhiskyPayActor)
    return actor


def expiring_keys(client: redis.Redis) -> list[bytes]:
    """Return the keys with a TTL: the event id reservations."""
    return [key for key in client.keys("*") if int(client.ttl(key)) > 0]


class RefuseEveryEnqueue(Middleware):
    """Make every send() fail the way PayloadValidation does, after the middleware listed before it ran."""

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        raise InvalidPayload(f"{message.actor_name}: plan: must not be blank")


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    broker = StubBroker(middleware=[])
    yield broker
    broker.close()


def test_given_a_timedelta_delay_when_sent_then_the_message_waits_on_the_delay_queue_that_long(
    stub_broker: StubBroker,
) -> None:
    before = current_millis()
    actor_on(stub_broker).send_with_options(kwargs={"plan": "pro"}, delay=timedelta(seconds=2))
    assert stub_broker.queues[QUEUE].qsize() == 0
    [raw] = list(stub_broker.queues[f"{QUEUE}.DQ"].queue)
    eta = Message.decode(raw).options["eta"]
    assert before + 2_000 <= eta <= current_millis() + 2_000


def test_given_an_event_id_already_sent_when_sent_again_then_send_returns_the_first_message_without_enqueuing(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis
) -> None:
    actor = actor_on(whiskypay_broker(IdempotentEnqueue(window_s=60)))
    first = actor.send(event_id="evt_1", plan="pro")
    again = actor.send(event_id="evt_1", plan="pro")
    assert again.kwargs["event_id"] == "evt_1" and again.message_id == first.message_id
    assert queued(redis_client, QUEUE) == 1


def test_given_an_invalid_payload_after_the_reservation_hook_when_sent_then_it_raises_and_reserves_nothing(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis
) -> None:
    # Given a broker whose validation runs after IdempotentEnqueue named the reservation
    refuse = RefuseEveryEnqueue()
    broker = whiskypay_broker(IdempotentEnqueue(window_s=60), refuse)
    actor = actor_on(broker)
    # When a send is refused, then InvalidPayload reaches the caller and no reservation is left behind
    with pytest.raises(InvalidPayload, match="plan"):
        actor.send(event_id="evt_1", plan="")
    assert expiring_keys(redis_client) == []
    # And the corrected send with the same event id is enqueued
    broker.middleware.remove(refuse)
    actor.send(event_id="evt_1", plan="pro")
    assert queued(redis_client, QUEUE) == 1


def test_given_redis_fails_at_enqueue_when_sent_then_enqueue_error_names_the_setting_and_reserves_nothing(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker whose enqueue call (which takes the reservation too) hits a dropped connection
    broker = whiskypay_broker(IdempotentEnqueue(window_s=60))
    actor = actor_on(broker)

    def connection_lost(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(broker, "do_enqueue", connection_lost)
    # When a payment is sent, then EnqueueError says what to check, without the library's text
    with pytest.raises(EnqueueError, match="WHISKYPAY_REDIS_URL") as raised:
        actor.send(event_id="evt_1", plan="pro")
    assert "ConnectionError" in str(raised.value) and "reset by peer" not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    # And the gateway's retry of the same event is not swallowed as a duplicate
    assert expiring_keys(redis_client) == []
    monkeypatch.undo()
    actor.send(event_id="evt_1", plan="pro")
    assert queued(redis_client, QUEUE) == 1


def test_given_no_redis_listening_when_sent_then_enqueue_error_is_raised_without_the_password() -> None:
    # Given a broker whose Redis URL (with a password) points at a port nothing listens on
    client = redis.Redis.from_url(f"redis://:hunter2@127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    broker = WhiskyPayRedisBroker(client=client, namespace="whiskypay", middleware=[IdempotentEnqueue(window_s=60)])
    try:
        # When a payment with an event id is sent (its one enqueue call fails), then EnqueueError is raised
        with pytest.raises(EnqueueError) as raised:
            actor_on(broker).send(event_id="evt_1", plan="pro")
        assert "hunter2" not in str(raised.value)
    finally:
        broker.close()
