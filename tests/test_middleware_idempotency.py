"""Tier 3: IdempotentEnqueue alone on a WhiskyPayRedisBroker (whose enqueue call reserves the event id), throwaway
actors."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import MiddlewareError

from middleware.idempotency import IdempotentEnqueue
from tests.conftest import WhiskyPayBrokerFactory
from tests.helpers import queued

QUEUE = "q"


def reservations(client: redis.Redis) -> dict[str, tuple[str, int]]:
    """Return the keys that expire (only reservations do: queue keys never), as {key: (holder, ttl in s)}."""
    found = {}
    for key in client.keys("*"):
        ttl = int(client.ttl(key))
        if ttl > 0:
            found[key.decode()] = (client.get(key).decode(), ttl)
    return found


def actor_on(broker: dramatiq.Broker, name: str = "cb") -> dramatiq.Actor[Any, Any]:
    return dramatiq.actor(lambda **kw: None, broker=broker, actor_name=name, queue_name=QUEUE)


def test_given_an_event_id_was_sent_when_another_message_with_it_is_sent_then_send_raises_and_nothing_is_enqueued(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis
) -> None:
    broker = whiskypay_broker(IdempotentEnqueue(window_s=60))
    actor = actor_on(broker)
    first = actor.send(event_id="evt_1", plan="pro")
    # When a second message with the same event_id is sent, then Dramatiq's contract makes send() raise
    with pytest.raises(MiddlewareError, match="evt_1"):
        actor.send(event_id="evt_1", plan="pro")
    # And only the first is in the queue; the one reservation holds its id for at most the window
    assert queued(redis_client, QUEUE) == 1
    [(holder, ttl)] = reservations(redis_client).values()
    assert holder == first.message_id and 0 < ttl <= 60


def test_given_a_reserved_event_id_when_its_own_message_is_enqueued_again_then_it_passes(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis
) -> None:
    # Given a message that reserved its event_id
    broker = whiskypay_broker(IdempotentEnqueue(window_s=60))
    message = actor_on(broker).send(event_id="evt_1")
    # When the same message is enqueued again (a retry, or its delayed copy coming due), then it is accepted
    broker.enqueue(message)
    broker.enqueue(message, delay=10_000)
    assert queued(redis_client, QUEUE) == 2
    assert queued(redis_client, f"{QUEUE}.DQ") == 1


@pytest.mark.parametrize("kwargs", [{}, {"event_id": None}, {"event_id": ""}], ids=["absent", "none", "empty"])
def test_given_no_usable_event_id_when_sent_twice_then_both_are_enqueued_and_nothing_is_reserved(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis, kwargs: dict[str, Any]
) -> None:
    broker = whiskypay_broker(IdempotentEnqueue(window_s=60))
    actor = actor_on(broker)
    actor.send(**kwargs)
    actor.send(**kwargs)
    assert queued(redis_client, QUEUE) == 2
    assert reservations(redis_client) == {}


def test_given_two_actors_when_each_sends_the_same_event_id_then_both_are_enqueued(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis
) -> None:
    broker = whiskypay_broker(IdempotentEnqueue(window_s=60))
    actor_on(broker, "first").send(event_id="evt_1")
    actor_on(broker, "second").send(event_id="evt_1")
    assert queued(redis_client, QUEUE) == 2
    assert len(reservations(redis_client)) == 2


def test_given_the_window_passed_when_the_event_id_is_sent_again_then_it_is_enqueued(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis
) -> None:
    # Given a one-second window and a sent event
    broker = whiskypay_broker(IdempotentEnqueue(window_s=1))
    actor = actor_on(broker)
    actor.send(event_id="evt_1")
    # When the window has passed, then the same event id is accepted again
    time.sleep(1.1)
    second = actor.send(event_id="evt_1")
    assert queued(redis_client, QUEUE) == 2
    [(holder, _)] = reservations(redis_client).values()
    assert holder == second.message_id


def test_given_actor_names_and_event_ids_that_share_a_spelling_when_sent_then_each_gets_its_own_reservation(
    whiskypay_broker: WhiskyPayBrokerFactory, redis_client: redis.Redis
) -> None:
    # Given two actors and event ids whose plain "actor:event" spelling is the same ("a:b:c")
    broker = whiskypay_broker(IdempotentEnqueue(window_s=60))
    actor_on(broker, "a:b").send(event_id="c")
    actor_on(broker, "a").send(event_id="b:c")
    # Then both were enqueued, each under its own (length-prefixed) key
    assert queued(redis_client, QUEUE) == 2
    expected = ["whiskypay:whiskypay.events:1.a:0.:3.b:c", "whiskypay:whiskypay.events:3.a:b:0.:1.c"]
    assert sorted(reservations(redis_client)) == expected


def test_given_a_broker_without_redis_when_an_event_id_is_sent_twice_then_both_are_enqueued() -> None:
    broker = StubBroker(middleware=[IdempotentEnqueue(window_s=60)])
    try:
        actor = actor_on(broker)
        actor.send(event_id="evt_1")
        actor.send(event_id="evt_1")
        assert broker.queues[QUEUE].qsize() == 2
        assert isinstance(Message.decode(broker.queues[QUEUE].get()), Message)
    finally:
        broker.close()
