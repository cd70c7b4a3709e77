"""Tier 3: OutcomeCounters on a plain RedisBroker (it counts into Redis) with throwaway actors and a real Worker.

The hook-level cases (a Redis error while counting, the flush interval) are in tests/test_ops_cli.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries, SkipMessage

from middleware.outcome_counters import OutcomeCounters
from tests.conftest import RedisBrokerFactory
from tests.helpers import NAMESPACE, dead_letters, wait_until
from whiskypay.errors import Deferred

QUEUE = "q"
#: The counters' hash of QUEUE, and its fields (`whiskypay status` reads them; they keep their names).
STATS = f"{NAMESPACE}:whiskypay.stats:{QUEUE}"
COMPLETED, FAILED = b"completed", b"failed"
STARTED_AT = 1_780_000_000


class FailUnprocessed(Middleware):
    """Fail every message before it runs, the way PayloadValidation drops an invalid one."""

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        message.fail()
        raise SkipMessage()


@pytest.fixture
def run(redis_broker: RedisBrokerFactory) -> Iterator[Any]:
    """Factory ``run(*middleware, fn=...)`` -> (actor, worker): OutcomeCounters listed first, as in build_broker."""
    workers: list[Worker] = []

    def _run(*middleware: Middleware, fn: Any, flush_interval_s: float = 0.05) -> tuple[Any, Worker]:
        counters = OutcomeCounters(clock=lambda: STARTED_AT + time.monotonic(), flush_interval_s=flush_interval_s)
        broker = redis_broker(counters, *middleware)
        actor = dramatiq.actor(fn, broker=broker, actor_name="job", queue_name=QUEUE)
        worker = Worker(broker, worker_timeout=50, worker_threads=2)
        worker.start()
        workers.append(worker)
        return actor, worker

    yield _run
    for worker in workers:
        worker.stop()


def counts(client: redis.Redis) -> dict[bytes, int]:
    return {field: int(value) for field, value in client.hgetall(STATS).items() if field != b"started_at"}


def test_given_messages_that_succeed_when_processed_then_the_background_flush_counts_them_completed(
    run: Any, redis_client: redis.Redis
) -> None:
    # Given a worker whose counters flush every 50 ms in the background
    actor, _ = run(fn=lambda: None)
    # When three messages succeed, then "completed" reaches 3 without any further message
    for _ in range(3):
        actor.send()
    wait_until(lambda: counts(redis_client) == {COMPLETED: 3}, what="3 completed")
    assert int(redis_client.hget(STATS, "started_at")) >= STARTED_AT


def test_given_a_message_retried_then_dead_lettered_when_processed_then_only_its_end_is_counted(
    run: Any, redis_client: redis.Redis
) -> None:
    # Given an actor that always fails, with one retry
    def boom() -> None:
        raise RuntimeError("merchant answered 503")

    actor, _ = run(Retries(max_retries=1, min_backoff=1, max_backoff=1), fn=boom)
    # When its message is tried twice and dead-lettered, then one "failed" is counted and the retry is not
    actor.send()
    wait_until(lambda: dead_letters(redis_client, QUEUE), what="the dead letter")
    wait_until(lambda: counts(redis_client) == {FAILED: 1}, what="1 failed")
    time.sleep(0.2)
    assert counts(redis_client) == {FAILED: 1}


def test_given_a_retry_then_a_dead_letter_and_a_success_then_each_attempt_counts_in_its_minute(
    run: Any, redis_client: redis.Redis
) -> None:
    # Given an actor that fails its first call of each message twice, with one retry, and one that succeeds
    def boom() -> None:
        raise RuntimeError("merchant answered 503")

    failing, _ = run(Retries(max_retries=1, min_backoff=1, max_backoff=1), fn=boom)
    # When one message is retried then dead-lettered
    failing.send()
    wait_until(lambda: dead_letters(redis_client, QUEUE), what="the dead letter")
    wait_until(lambda: counts(redis_client) == {FAILED: 1}, what="1 failed")
    # Then the minute's hash (for the dashboard's chart) counts both failed attempts, and expires within 2 hours
    [minute_key] = [key for key in redis_client.scan_iter(f"{NAMESPACE}:whiskypay.stats.minute:{QUEUE}:*")]
    assert minute_key.decode().rsplit(":", 1)[1].isdigit()
    assert redis_client.hgetall(minute_key) == {b"failed": b"2"}
    assert 0 < redis_client.ttl(minute_key) <= 2 * 60 * 60
    # And the queue's own hash never expires
    assert redis_client.ttl(STATS) == -1


def test_given_a_deferred_attempt_then_a_success_when_processed_then_one_completed_is_counted(
    run: Any, redis_client: redis.Redis
) -> None:
    calls = itertools.count()

    def deferred_once() -> None:
        if next(calls) == 0:
            raise Deferred("2 slow deliveries to merchant.example in flight; deferred", delay_ms=1)

    actor, _ = run(Retries(max_retries=3, min_backoff=1, max_backoff=1), fn=deferred_once)
    actor.send()
    wait_until(lambda: counts(redis_client) == {COMPLETED: 1}, what="1 completed")
    time.sleep(0.2)
    assert counts(redis_client) == {COMPLETED: 1}


def test_given_a_message_failed_before_it_ran_when_skipped_then_it_is_counted_failed(
    run: Any, redis_client: redis.Redis
) -> None:
    actor, _ = run(FailUnprocessed(), fn=lambda: None)
    actor.send()
    wait_until(lambda: counts(redis_client) == {FAILED: 1}, what="1 failed")


def test_given_counts_waiting_in_memory_when_the_worker_stops_then_they_are_written(
    run: Any, redis_client: redis.Redis
) -> None:
    # Given counters that would flush only after an hour, and two messages done
    done: list[int] = []
    actor, worker = run(fn=lambda: done.append(1), flush_interval_s=3600)
    actor.send()
    actor.send()
    wait_until(lambda: len(done) == 2, what="both messages to run")
    time.sleep(0.1)
    assert counts(redis_client) == {}
    # When the worker shuts down, then they are written
    worker.stop()
    assert counts(redis_client) == {COMPLETED: 2}


def test_given_a_broker_without_redis_when_messages_complete_then_nothing_is_counted_or_raised(
    redis_client: redis.Redis,
) -> None:
    counters = OutcomeCounters(flush_interval_s=0)
    broker = StubBroker(middleware=[])
    try:
        message = MessageProxy(Message(queue_name=QUEUE, actor_name="job", args=(), kwargs={}, options={}))
        counters.after_process_message(broker, message)
        counters.flush(broker)
        assert redis_client.keys("*") == []
    finally:
        broker.close()
