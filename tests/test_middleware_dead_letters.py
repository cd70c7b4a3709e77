"""Tier 3: DeadLetterReasons on a plain RedisBroker (it rewrites the stored message) with a real dramatiq Worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker

from middleware.dead_letters import DeadLetterReasons
from tests.conftest import RedisBrokerFactory
from tests.helpers import dead_letters, wait_until

QUEUE = "q"


class FailOnError(Middleware):
    """Fail a message whose attempt raised, without writing a reason (as for a `throws` error or an unknown actor)."""

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        if exception is not None:
            message.fail()


class WriteOwnReason(Middleware):
    """Write a reason onto a failing message first, as QueueRetryPolicy does for the errors it classifies."""

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        if exception is not None:
            message.options["traceback"] = "HttpStatusError: HTTP 503 from merchant.example"
            message.options["failure_class"] = "HttpStatusError"


@pytest.fixture
def run(redis_broker: RedisBrokerFactory) -> Iterator[Any]:
    """Factory ``run(*middleware, fn=...)``: a broker with only those middleware, and a started Worker."""
    workers: list[Worker] = []

    def _run(*middleware: Middleware, fn: Any) -> dramatiq.Actor[Any, Any]:
        broker = redis_broker(*middleware)
        actor = dramatiq.actor(fn, broker=broker, actor_name="job", queue_name=QUEUE)
        worker = Worker(broker, worker_timeout=50, worker_threads=1)
        worker.start()
        workers.append(worker)
        return actor

    yield _run
    for worker in workers:
        worker.stop()


def boom(**kwargs: Any) -> None:
    raise ValueError("card declined for buyer@example.com")


def one_dead_letter(client: redis.Redis) -> dict[str, Any]:
    [letter] = wait_until(lambda: dead_letters(client, QUEUE), timeout_s=10, what="a dead letter")
    return letter


def test_given_a_failed_message_without_a_reason_when_dead_lettered_then_it_carries_its_error_and_time(
    run: Any, redis_client: redis.Redis
) -> None:
    # Given an actor that raises, and a middleware that fails the message without writing why
    actor = run(DeadLetterReasons(), FailOnError(), fn=boom)
    before_ms = int(time.time() * 1000)
    # When its message fails
    sent = actor.send(plan="pro")
    letter = one_dead_letter(redis_client)
    # Then the dead letter names the error (address masked), its class and when it failed
    assert letter["message_id"] == sent.message_id
    options = letter["options"]
    assert options["traceback"].startswith("ValueError: card declined for ")
    assert "buyer@example.com" not in options["traceback"]
    assert options["failure_class"] == "ValueError"
    assert before_ms <= options["failed_at"] <= int(time.time() * 1000)


def test_given_a_reason_written_by_another_middleware_when_dead_lettered_then_it_is_kept(
    run: Any, redis_client: redis.Redis
) -> None:
    # WriteOwnReason is listed last, so its after-hook runs before FailOnError fails the message
    run(DeadLetterReasons(), FailOnError(), WriteOwnReason(), fn=boom).send()
    options = one_dead_letter(redis_client)["options"]
    assert options["traceback"] == "HttpStatusError: HTTP 503 from merchant.example"
    assert options["failure_class"] == "HttpStatusError"
    assert "failed_at" in options


def test_given_a_stored_message_failed_without_any_exception_when_nacked_then_its_stored_copy_says_so(
    redis_broker: RedisBrokerFactory, redis_client: redis.Redis
) -> None:
    # Given a message in the queue's store, failed with no exception on it
    broker = redis_broker()
    dramatiq.actor(lambda: None, broker=broker, actor_name="job", queue_name=QUEUE)
    stored = broker.enqueue(Message(queue_name=QUEUE, actor_name="job", args=(), kwargs={}, options={}))
    message = MessageProxy(stored)
    message.fail()
    # When the hook runs before the nack
    DeadLetterReasons().before_nack(broker, message)
    # Then the stored copy (what the nack moves to the dead letters) carries the reason
    raw = redis_client.hget(f"whiskypay:{QUEUE}.msgs", stored.options["redis_message_id"])
    options = Message.decode(raw).options
    assert (options["traceback"], options["failure_class"]) == ("failed without an error", "Unknown")
    assert isinstance(options["failed_at"], int)


def test_given_a_message_that_succeeds_when_processed_then_nothing_is_dead_lettered(
    run: Any, redis_client: redis.Redis
) -> None:
    done: list[int] = []
    run(DeadLetterReasons(), FailOnError(), fn=lambda **kw: done.append(1)).send()
    wait_until(lambda: done, what="the message to run")
    time.sleep(0.2)
    assert dead_letters(redis_client, QUEUE) == []


def test_given_a_broker_without_redis_when_a_message_is_nacked_then_its_options_are_untouched() -> None:
    broker = StubBroker(middleware=[])
    try:
        message = MessageProxy(
            Message(queue_name=QUEUE, actor_name="job", args=(), kwargs={}, options={"redis_message_id": "r1"})
        )
        DeadLetterReasons().before_nack(broker, message)
        assert message.options == {"redis_message_id": "r1"}
    finally:
        broker.close()
