"""Tier 2: each option of Dramatiq 2.2's Retries middleware, as documented, against QueueRetryPolicy.

Dramatiq's own retry tests are not in its source distribution; these are ours, one per documented behaviour
(Retries' docstring and code: max_retries, min_backoff, max_backoff, retry_when, on_retry_exhausted, throws,
the `retries` count, Retry(delay=...), log levels), on a StubBroker carrying QueueRetryPolicy alone, with a
real Worker. The queue "q" has a policy of its own (2 retries, 10 ms), to show the options win over it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq import Retry, Worker
from dramatiq.brokers.stub import StubBroker

from middleware.retry_policy import QueueRetryPolicy
from whiskypay.retrying import RetryPolicy, attempts_made

QUEUE = "q"
LOGGER = "middleware.retry_policy.QueueRetryPolicy"


class Attempts:
    """A thread-safe record of an actor's attempts: monotonic times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.times: list[float] = []

    def add(self) -> int:
        with self._lock:
            self.times.append(time.monotonic())
            return len(self.times)

    @property
    def count(self) -> int:
        return len(self.times)


def make_broker(**middleware_options: Any) -> StubBroker:
    return StubBroker(
        middleware=[
            QueueRetryPolicy(policies={QUEUE: RetryPolicy(attempts=3, backoff_ms=10)}, **middleware_options)
        ]
    )


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    stub = make_broker()
    yield stub
    stub.flush_all()
    stub.close()


@pytest.fixture
def worker(broker: StubBroker) -> Iterator[Worker]:
    started = Worker(broker, worker_timeout=20, worker_threads=2)
    started.start()
    yield started
    started.stop()


def drain(broker: StubBroker, worker: Worker) -> None:
    broker.join(QUEUE, fail_fast=False, timeout=10_000)
    worker.join()


# ---------------------------------------------------------------------------------------------------------------
# max_retries, and the `retries` count
# ---------------------------------------------------------------------------------------------------------------


def test_max_retries_gives_that_many_retries_after_the_first_attempt(broker: StubBroker, worker: Worker) -> None:
    # Given an always-failing actor with max_retries=3 (the queue's own policy allows 2)
    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=3, min_backoff=1)
    def fails() -> None:
        attempts.add()
        raise RuntimeError("down")

    # When one message is sent and the queue drains
    fails.send()
    drain(broker, worker)
    # Then it ran 4 times, and the dead letter counts retries as Dramatiq does: one per failure, the last too
    assert attempts.count == 4
    [dead] = broker.dead_letters
    assert dead.options["retries"] == 4
    assert dead.options["attempts"] == 4 == attempts_made(dead.options)


def test_a_messages_max_retries_and_backoffs_override_the_actors(broker: StubBroker, worker: Worker) -> None:
    # Given an actor with 99 retries and 5 s waits
    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=99, min_backoff=5_000, max_backoff=50_000)
    def fails() -> None:
        attempts.add()
        raise RuntimeError("down")

    # When a message is sent with max_retries=4 and tight backoffs
    fails.send_with_options(max_retries=4, min_backoff=5, max_backoff=50)
    drain(broker, worker)
    # Then the message's options decided: 5 attempts, quickly
    assert attempts.count == 5
    assert attempts.times[-1] - attempts.times[0] < 2.0


def test_max_retries_none_retries_past_the_queue_policy_until_success(broker: StubBroker, worker: Worker) -> None:
    # Given an actor with max_retries=None (for ever) that fails 6 times, on a queue allowing 2 retries
    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=None, min_backoff=1, max_backoff=5)
    def eventually() -> None:
        if attempts.add() <= 6:
            raise RuntimeError("not yet")

    # When sent and drained, then it succeeded on the 7th attempt and nothing was dead-lettered
    eventually.send()
    drain(broker, worker)
    assert attempts.count == 7
    assert broker.dead_letters == []


def test_a_succeeding_retry_keeps_the_count_of_failures_so_far(broker: StubBroker) -> None:
    # Given a message that failed twice before (retries=2) and now fails a third time, with retries left
    actor = dramatiq.actor(lambda: None, broker=broker, actor_name="counted", queue_name=QUEUE, max_retries=5)
    message = dramatiq.broker.MessageProxy(actor.message_with_options(retries=2))
    middleware = broker.middleware[0]
    assert isinstance(middleware, QueueRetryPolicy)
    # When the policy handles the failure
    middleware.after_process_message(broker, message, exception=RuntimeError("x"))
    # Then retries went to 3 and this was attempt 3
    assert message.options["retries"] == 3 and message.options["attempts"] == 3
    assert not message.failed


# ---------------------------------------------------------------------------------------------------------------
# min_backoff, max_backoff, Retry(delay=...)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actor_options", "message_options"),
    [({"min_backoff": 0}, {}), ({"max_backoff": 0}, {}), ({"min_backoff": 10_000}, {"min_backoff": 0}),
     ({"min_backoff": 10_000}, {"max_backoff": 0})],
    ids=["actor-zero-min", "actor-zero-max", "message-zero-min", "message-zero-max"],
)
def test_a_zero_backoff_retries_without_waiting(
    broker: StubBroker, worker: Worker, actor_options: dict[str, int], message_options: dict[str, int]
) -> None:
    # Given an always-failing actor with 10 retries and a zero min or max backoff (on the actor or the message)
    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=10, **actor_options)
    def fails() -> None:
        attempts.add()
        raise RuntimeError("down")

    # When sent and drained
    fails.send_with_options(**message_options)
    drain(broker, worker)
    # Then all 11 attempts ran back to back
    assert attempts.count == 11
    assert attempts.times[-1] - attempts.times[0] < 1.0


def test_min_backoff_is_the_first_wait_and_doubles_up_to_max_backoff(broker: StubBroker, worker: Worker) -> None:
    # Given an actor failing 4 times with min_backoff=100 ms and max_backoff=250 ms
    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=4, min_backoff=100, max_backoff=250)
    def fails() -> None:
        if attempts.add() <= 4:
            raise RuntimeError("down")

    # When sent and drained
    fails.send()
    drain(broker, worker)
    # Then the waits were 100, 200, 250, 250 ms (exact: no jitter; the StubBroker worker adds a few ms)
    gaps = [b - a for a, b in zip(attempts.times, attempts.times[1:], strict=False)]
    for gap, expected in zip(gaps, (0.1, 0.2, 0.25, 0.25), strict=True):
        assert expected <= gap < expected + 0.5, gaps


def test_retry_with_a_delay_waits_that_long_and_counts_as_a_retry(broker: StubBroker, worker: Worker) -> None:
    # Given an actor that raises Retry(delay=150) once, allowed one retry
    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=1)
    def later() -> None:
        if attempts.add() == 1:
            raise Retry(delay=150)

    # When sent and drained, then the second attempt came 150 ms or more later, and it succeeded
    later.send()
    drain(broker, worker)
    assert attempts.count == 2
    assert 0.15 <= attempts.times[1] - attempts.times[0] < 1.0
    assert broker.dead_letters == []


def test_a_retry_exception_spends_retries_like_any_failure(broker: StubBroker, worker: Worker) -> None:
    # Given an actor that always raises Retry, with max_retries=0
    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=0)
    def again() -> None:
        attempts.add()
        raise Retry()

    # When sent and drained, then it ran once and was dead-lettered
    again.send()
    drain(broker, worker)
    assert attempts.count == 1
    assert len(broker.dead_letters) == 1


# ---------------------------------------------------------------------------------------------------------------
# retry_when
# ---------------------------------------------------------------------------------------------------------------


def test_retry_when_decides_instead_of_max_retries(broker: StubBroker, worker: Worker) -> None:
    # Given a predicate retrying RuntimeErrors up to 3 times, on an actor that also says max_retries=0
    calls: list[tuple[int, str]] = []

    def should_retry(retries: int, exception: BaseException) -> bool:
        calls.append((retries, type(exception).__name__))
        return retries < 3 and isinstance(exception, RuntimeError)

    attempts = Attempts()

    @dramatiq.actor(broker=broker, queue_name=QUEUE, retry_when=should_retry, max_retries=0, min_backoff=1)
    def raises(runtime: bool) -> None:
        attempts.add()
        raise RuntimeError("r") if runtime else ValueError("v")

    # When a message raising ValueError is sent, then it is not retried
    raises.send(False)
    drain(broker, worker)
    assert attempts.count == 1 and calls == [(0, "ValueError")]
    # When a message raising RuntimeError is sent, then it is retried 3 times (4 attempts), the predicate seeing
    # the retries made before each failure
    calls.clear()
    raises.send(True)
    drain(broker, worker)
    assert attempts.count == 1 + 4
    assert calls == [(0, "RuntimeError"), (1, "RuntimeError"), (2, "RuntimeError"), (3, "RuntimeError")]
    assert len(broker.dead_letters) == 2


def test_the_middlewares_retry_when_applies_unless_the_actor_has_its_own() -> None:
    # Given a middleware-wide predicate that never retries
    broker = make_broker(retry_when=lambda retries, exception: False)
    worker = Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        plain, own = Attempts(), Attempts()

        @dramatiq.actor(broker=broker, queue_name=QUEUE)
        def uses_default() -> None:
            plain.add()
            raise RuntimeError("x")

        @dramatiq.actor(broker=broker, queue_name=QUEUE, retry_when=lambda retries, exception: retries < 1,
                        min_backoff=1)
        def has_own() -> None:
            own.add()
            raise RuntimeError("x")

        # When both are sent and drained
        uses_default.send()
        has_own.send()
        drain(broker, worker)
        # Then the first ran once (no retry, though the queue allows 2), the second twice (its own predicate)
        assert plain.count == 1 and own.count == 2
    finally:
        worker.stop()
        broker.close()


# ---------------------------------------------------------------------------------------------------------------
# on_retry_exhausted
# ---------------------------------------------------------------------------------------------------------------


def test_on_retry_exhausted_sends_the_failed_message_and_counts_to_the_named_actor(
    broker: StubBroker, worker: Worker
) -> None:
    # Given an always-failing actor with 2 retries whose exhaustion goes to a callback actor
    received: list[tuple[dict[str, Any], dict[str, Any]]] = []

    @dramatiq.actor(broker=broker, queue_name=QUEUE)
    def exhausted(message_data: dict[str, Any], retry_info: dict[str, Any]) -> None:
        received.append((message_data, retry_info))

    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=2, min_backoff=1, on_retry_exhausted="exhausted")
    def fails() -> None:
        raise RuntimeError("down")

    # When one message is sent and the queue drains
    sent = fails.send()
    drain(broker, worker)
    # Then the callback got the message (its `retries` past max_retries, as in Dramatiq) and Retries' counts
    [(message_data, retry_info)] = received
    assert message_data["message_id"] == sent.message_id
    assert retry_info == {"retries": 2, "max_retries": 2}
    assert message_data["options"]["retries"] > retry_info["max_retries"]  # a callback testing this fires
    assert len(broker.dead_letters) == 1


def test_on_retry_exhausted_as_a_message_option_and_after_retry_when_says_no(
    broker: StubBroker, worker: Worker
) -> None:
    # Given a predicate that refuses at once, and a callback named by the message (not the actor)
    received: list[dict[str, Any]] = []

    @dramatiq.actor(broker=broker, queue_name=QUEUE)
    def on_give_up(message_data: dict[str, Any], retry_info: dict[str, Any]) -> None:
        received.append(retry_info)

    @dramatiq.actor(broker=broker, queue_name=QUEUE, retry_when=lambda retries, exception: False)
    def fails() -> None:
        raise RuntimeError("down")

    # When sent with on_retry_exhausted and drained, then the callback got the counts (max_retries: the queue's)
    fails.send_with_options(on_retry_exhausted="on_give_up")
    drain(broker, worker)
    assert received == [{"retries": 0, "max_retries": 2}]


# ---------------------------------------------------------------------------------------------------------------
# throws, and what is logged at which level
# ---------------------------------------------------------------------------------------------------------------


class Expected1(Exception):
    pass


class Expected2(Exception):
    pass


@pytest.mark.parametrize(
    ("raised", "throws"),
    [(Expected1, Expected1), (Expected1, (Expected1,)), (Expected2, (Expected1, Expected2))],
    ids=["class", "tuple", "second-of-tuple"],
)
def test_a_throws_exception_fails_at_once_logged_at_info_without_on_retry_exhausted(
    broker: StubBroker, worker: Worker, caplog: pytest.LogCaptureFixture, raised: type[Exception], throws: Any
) -> None:
    # Given an actor declaring throws, with an exhaustion callback
    attempts = Attempts()
    received: list[object] = []

    @dramatiq.actor(broker=broker, queue_name=QUEUE)
    def exhausted(message_data: dict[str, Any], retry_info: dict[str, Any]) -> None:
        received.append(retry_info)

    @dramatiq.actor(broker=broker, queue_name=QUEUE, throws=throws, on_retry_exhausted="exhausted")
    def permanent() -> None:
        attempts.add()
        raise raised("expected")

    # When sent and drained
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        permanent.send()
        drain(broker, worker)
    # Then it ran once, was dead-lettered without counting a retry, and the callback was not sent
    assert attempts.count == 1
    [dead] = broker.dead_letters
    assert dead.options.get("retries", 0) == 0 and dead.options["attempts"] == 1
    assert received == []
    # And our middleware logged it at INFO, never at WARNING or above (as Dramatiq's "Aborting message")
    ours = [record for record in caplog.records if record.name == LOGGER]
    assert [record.levelno for record in ours] == [logging.INFO]


def test_a_retry_is_logged_at_info_and_giving_up_at_warning(
    broker: StubBroker, worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an always-failing actor with one retry
    @dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=1, min_backoff=1)
    def fails() -> None:
        raise RuntimeError("down")

    # When sent and drained
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        fails.send()
        drain(broker, worker)
    # Then the retry was INFO and giving up WARNING, as in Dramatiq
    ours = [(record.levelno, record.getMessage().split(" ")[0]) for record in caplog.records if record.name == LOGGER]
    assert ours == [(logging.INFO, "Retrying"), (logging.WARNING, "Giving")]


# ---------------------------------------------------------------------------------------------------------------
# the constructor: Retries' options for queues without a policy of their own
# ---------------------------------------------------------------------------------------------------------------


def test_the_constructors_retries_options_apply_to_queues_without_a_policy() -> None:
    # Given a middleware built with Retries' options, and a queue "q" that has its own policy (2 retries)
    middleware = QueueRetryPolicy(
        policies={QUEUE: RetryPolicy(attempts=3, backoff_ms=10)}, max_retries=20, min_backoff=15_000,
        max_backoff=60_000,
    )
    # Then other queues get them, and "q" keeps its own
    assert middleware.default == RetryPolicy(attempts=21, backoff_ms=15_000, max_backoff_ms=60_000)
    assert middleware.policies[QUEUE].max_retries == 2


def test_every_retries_actor_option_is_declared() -> None:
    # Given Dramatiq's own Retries, when our middleware's declared actor options are compared, then none is missing
    from dramatiq.middleware import Retries

    assert Retries().actor_options <= QueueRetryPolicy().actor_options


# ---------------------------------------------------------------------------------------------------------------
# what operators read: attempts, also for dead letters stored before this change
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "attempts"),
    [
        ({"attempts": 5, "retries": 5}, 5),  # retries ran out (Dramatiq's count)
        ({"attempts": 1}, 1),  # a `throws` failure: no retry counted
        ({"retries": 4}, 5),  # stored before `attempts` existed: retries then excluded the final failure
        ({}, 1),  # failed before any attempt (invalid payload, poison placeholder)
        ({"retries": "x"}, 1),
        ({"attempts": 0, "retries": 2}, 3),
    ],
    ids=["exhausted", "throws", "old-dead-letter", "no-attempt", "garbage", "bad-attempts"],
)
def test_attempts_made_reads_new_and_old_dead_letters(options: dict[str, Any], attempts: int) -> None:
    assert attempts_made(options) == attempts
