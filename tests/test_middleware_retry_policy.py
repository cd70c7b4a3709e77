"""Tier 2: QueueRetryPolicy alone on a StubBroker, with throwaway actors and a real dramatiq Worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import current_millis

from middleware.retry_policy import QueueRetryPolicy
from whiskypay.errors import HttpStatusError
from whiskypay.redaction import error_summary
from whiskypay.retrying import RetryPolicy

QUEUE = "q"


class Calls:
    """A thread-safe log of an actor's attempts, with their monotonic times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.times: list[float] = []

    def record(self) -> int:
        with self._lock:
            self.times.append(time.monotonic())
            return len(self.times)

    @property
    def count(self) -> int:
        return len(self.times)


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    """A StubBroker with only QueueRetryPolicy: "q" allows 3 attempts 10 ms apart; other queues use 2 attempts."""
    broker = StubBroker(
        middleware=[
            QueueRetryPolicy(
                policies={QUEUE: RetryPolicy(attempts=3, backoff_ms=10)},
                default=RetryPolicy(attempts=2, backoff_ms=10),
                retry_after_max_ms=200,
            )
        ]
    )
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture
def stub_worker(stub_broker: StubBroker) -> Iterator[Worker]:
    worker = Worker(stub_broker, worker_timeout=20, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


def drain(broker: StubBroker, worker: Worker, queue: str = QUEUE) -> None:
    broker.join(queue, fail_fast=False, timeout=10_000)
    worker.join()


def middleware(broker: StubBroker) -> QueueRetryPolicy:
    return next(m for m in broker.middleware if isinstance(m, QueueRetryPolicy))


def test_an_always_failing_message_is_tried_exactly_attempts_times_then_dead_lettered(
    stub_broker: StubBroker, stub_worker: Worker
) -> None:
    # Given an actor on "q" (3 attempts) that always fails
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE)
    def always_fails() -> None:
        calls.record()
        raise RuntimeError("merchant down")

    # When one message is sent and the queue drains
    always_fails.send()
    drain(stub_broker, stub_worker)
    # Then it was tried 3 times and dead-lettered once, with its retry count and failure recorded
    assert calls.count == 3
    assert len(stub_broker.dead_letters) == 1
    dead = stub_broker.dead_letters[0]
    assert dead.options["attempts"] == 3
    assert dead.options["retries"] == 3  # Dramatiq's count: one per failure, the last one too
    assert dead.options["failure_class"] == "RuntimeError"
    assert dead.options["traceback"] == "RuntimeError: merchant down"


def test_a_queue_without_a_policy_uses_the_default(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given an always-failing actor on a queue with no policy of its own (default: 2 attempts)
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name="other")
    def fails_elsewhere() -> None:
        calls.record()
        raise RuntimeError("nope")

    # When sent and drained, then it was tried twice
    fails_elsewhere.send()
    drain(stub_broker, stub_worker, "other")
    assert calls.count == 2
    assert len(stub_broker.dead_letters) == 1


def test_a_message_that_succeeds_on_a_retry_is_not_dead_lettered(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given an actor that fails once, then succeeds
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE)
    def flaky() -> None:
        if calls.record() == 1:
            raise RuntimeError("blip")

    # When sent and drained, then two attempts were made and nothing is dead
    flaky.send()
    drain(stub_broker, stub_worker)
    assert calls.count == 2
    assert stub_broker.dead_letters == []


def test_an_exception_listed_in_throws_is_tried_once(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given an actor that declares ValueError as permanent, and raises it
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE, throws=(ValueError,))
    def permanent() -> None:
        calls.record()
        raise ValueError("410 gone")

    # When sent and drained
    permanent.send()
    drain(stub_broker, stub_worker)
    # Then one attempt was made and the message is dead, with no retry counted
    assert calls.count == 1
    assert len(stub_broker.dead_letters) == 1
    assert stub_broker.dead_letters[0].options.get("retries", 0) == 0
    assert stub_broker.dead_letters[0].options["traceback"] == "ValueError: 410 gone"


def test_an_actors_max_retries_overrides_the_queue_policy(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given an always-failing actor on "q" (3 attempts) declaring max_retries=0
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE, max_retries=0)
    def no_retries() -> None:
        calls.record()
        raise RuntimeError("x")

    # When sent and drained, then exactly one attempt was made
    no_retries.send()
    drain(stub_broker, stub_worker)
    assert calls.count == 1
    assert len(stub_broker.dead_letters) == 1


def test_a_messages_max_retries_overrides_the_actor(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given an always-failing actor declaring max_retries=5
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE, max_retries=5, min_backoff=10)
    def five_retries() -> None:
        calls.record()
        raise RuntimeError("x")

    # When one message is sent with max_retries=1 and drained
    five_retries.send_with_options(max_retries=1)
    drain(stub_broker, stub_worker)
    # Then exactly two attempts were made
    assert calls.count == 2
    assert len(stub_broker.dead_letters) == 1


def test_retry_with_a_delay_sets_the_next_wait(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given an actor that asks to be retried in 300 ms (the queue's own backoff is 10 ms), then succeeds
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE)
    def later() -> None:
        if calls.record() == 1:
            raise dramatiq.Retry(delay=300)

    # When sent and drained
    later.send()
    drain(stub_broker, stub_worker)
    # Then the second attempt came at least 300 ms after the first (and not absurdly later)
    assert calls.count == 2
    assert 0.3 <= calls.times[1] - calls.times[0] < 3.0
    assert stub_broker.dead_letters == []


def test_a_retry_after_longer_than_the_cap_waits_only_the_cap(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given a merchant error asking for a 60 s wait, and a middleware capped at 200 ms
    calls = Calls()

    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE)
    def throttled() -> None:
        if calls.record() == 1:
            raise HttpStatusError("HTTP 503 from m.example.com", retry_after_ms=60_000, http_status=503)

    # When sent and drained
    throttled.send()
    drain(stub_broker, stub_worker)
    # Then the retry came after about the cap, not after a minute
    assert calls.count == 2
    assert 0.2 <= calls.times[1] - calls.times[0] < 3.0


def test_the_stored_failure_text_masks_addresses_and_cuts_urls(stub_broker: StubBroker, stub_worker: Worker) -> None:
    # Given an actor whose error text names the buyer and the full callback URL
    @dramatiq.actor(broker=stub_broker, queue_name=QUEUE, max_retries=0)
    def leaky() -> None:
        raise ConnectionError("no route for buyer@example.com to https://m.example.com/hook?token=SECRET123")

    # When it fails for good
    leaky.send()
    drain(stub_broker, stub_worker)
    # Then the traceback option holds "ErrorClass: text", scrubbed
    traceback = stub_broker.dead_letters[0].options["traceback"]
    assert traceback == "ConnectionError: no route for b***@example.com to https://m.example.com/…"


def test_error_summary_is_bounded_to_1000_characters() -> None:
    # Given an exception with a huge text, when summarised, then the summary is cut at 1000 characters
    assert len(error_summary(RuntimeError("x" * 5_000))) == 1_000


def _proxy(actor: dramatiq.Actor[Any, Any], **options: Any) -> MessageProxy:
    return MessageProxy(actor.message_with_options(args=(), kwargs={}, **options))


@pytest.mark.parametrize(
    ("actor_options", "message_options", "expected"),
    [
        ({}, {}, RetryPolicy(attempts=3, backoff_ms=10)),
        ({"max_retries": 0}, {}, RetryPolicy(attempts=1, backoff_ms=10)),
        ({"max_retries": 5, "min_backoff": 50}, {"max_retries": 1}, RetryPolicy(attempts=2, backoff_ms=50)),
        ({"min_backoff": 20, "max_backoff": 40}, {}, RetryPolicy(attempts=3, backoff_ms=20, max_backoff_ms=40)),
        ({"retry_schedule": [5, 6, 7, 8]}, {}, RetryPolicy(attempts=3, backoff_ms=10, schedule=(5, 6, 7, 8))),
        ({"retry_schedule": [5, 6]}, {"max_retries": 1}, RetryPolicy(attempts=2, backoff_ms=10)),
    ],
    ids=["queue", "actor", "message-over-actor", "backoffs", "actor-schedule", "message-retries-drop-schedule"],
)
def test_policy_for_applies_actor_then_message_options_over_the_queue(
    stub_broker: StubBroker, actor_options: dict[str, Any], message_options: dict[str, Any], expected: RetryPolicy
) -> None:
    # Given an actor on "q" with some options, and a message with some options
    actor = dramatiq.actor(lambda: None, broker=stub_broker, actor_name="configured", queue_name=QUEUE, **actor_options)
    # When the effective policy is computed
    policy = middleware(stub_broker).policy_for(stub_broker, _proxy(actor, **message_options))
    # Then later layers win
    assert policy == expected


@pytest.mark.parametrize(("retries_done", "expected_ms"), [(0, 1_000), (1, 2_000), (3, 8_000)])
def test_a_retry_is_enqueued_on_the_delay_queue_after_the_exact_exponential_wait(
    retries_done: int, expected_ms: int
) -> None:
    # Given a queue policy of 1 s doubling, no jitter, and a message that already had some retries
    broker = StubBroker(middleware=[QueueRetryPolicy(policies={QUEUE: RetryPolicy(attempts=10, backoff_ms=1_000)})])
    actor = dramatiq.actor(lambda: None, broker=broker, actor_name="exp", queue_name=QUEUE)
    message = _proxy(actor, retries=retries_done)
    before = current_millis()
    # When the hook sees it fail
    middleware(broker).after_process_message(broker, message, exception=RuntimeError("x"))
    # Then it is on q.DQ with an eta that many ms ahead, and its retry count went up by one
    [encoded] = list(broker.queues[f"{QUEUE}.DQ"].queue)
    requeued = dramatiq.Message.decode(encoded)
    assert before + expected_ms <= requeued.options["eta"] <= current_millis() + expected_ms
    assert requeued.options["retries"] == retries_done + 1
    assert not message.failed
    broker.close()


def test_jitter_uses_the_injected_randomness() -> None:
    # Given a 50 % jitter policy and a random source that always returns 0.999
    broker = StubBroker(
        middleware=[
            QueueRetryPolicy(
                policies={QUEUE: RetryPolicy(attempts=3, backoff_ms=10_000, jitter=0.5)}, rand=lambda: 0.999
            )
        ]
    )
    actor = dramatiq.actor(lambda: None, broker=broker, actor_name="jit", queue_name=QUEUE)
    before = current_millis()
    # When a first failure is handled
    middleware(broker).after_process_message(broker, _proxy(actor), exception=RuntimeError("x"))
    # Then the wait is about half the backoff
    [encoded] = list(broker.queues[f"{QUEUE}.DQ"].queue)
    delay = dramatiq.Message.decode(encoded).options["eta"] - before
    assert 4_900 <= delay <= 5_100
    broker.close()


def test_a_successful_message_is_left_alone(stub_broker: StubBroker) -> None:
    # Given a message that was processed without error
    actor = dramatiq.actor(lambda: None, broker=stub_broker, actor_name="fine", queue_name=QUEUE)
    message = _proxy(actor)
    # When the hook runs, then nothing is recorded or requeued
    middleware(stub_broker).after_process_message(stub_broker, message, result=None)
    assert "retries" not in message.options and "traceback" not in message.options
    assert list(stub_broker.queues[f"{QUEUE}.DQ"].queue) == []


# ----------------------------------------------------------------------------------------------------------------
# Deferrals (not attempted, no attempt counted) are bounded by WHISKYPAY_MAX_DEFERRAL_S (issue 9 item 7)
# ----------------------------------------------------------------------------------------------------------------


def test_a_message_deferred_past_the_limit_is_dead_lettered_with_a_reason_that_says_so() -> None:
    from whiskypay.errors import Deferred

    # Given a permanently saturated merchant server: every run of its callback is deferred by 40 ms
    broker = StubBroker(middleware=[QueueRetryPolicy(policies={QUEUE: RetryPolicy(attempts=5, backoff_ms=10)},
                                                     max_deferral_ms=300)])  # fmt: skip
    runs = Calls()

    @dramatiq.actor(broker=broker, queue_name=QUEUE)
    def saturated() -> None:
        runs.record()
        raise Deferred("2 slow deliveries to m.example's server 127.0.0.2:443 in flight; deferred", delay_ms=40,
                       host="m.example", server="127.0.0.2:443")  # fmt: skip

    worker = Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        # When its message is sent
        started = time.monotonic()
        saturated.send()
        broker.join(QUEUE, fail_fast=False, timeout=5_000)
        worker.join()
    finally:
        worker.stop()
        broker.close()
    # Then it was deferred for about the limit (no attempt counted), then dead-lettered, and the reason says why
    assert time.monotonic() - started < 2.0
    [dead] = broker.dead_letters
    assert 5 <= runs.count <= 12 and dead.options["deferrals"] == runs.count
    assert dead.options.get("retries", 0) == 0
    assert dead.options["failure_class"] == "DeferredTooLong"
    reason = dead.options["traceback"]
    assert reason.startswith("DeferredTooLong: not attempted: deferred ")
    assert "WHISKYPAY_MAX_DEFERRAL_S" in reason and "127.0.0.2:443" in reason


def test_an_attempt_between_deferrals_starts_a_new_bounded_wait(stub_broker: StubBroker) -> None:
    from whiskypay.errors import Deferred

    now = [1_000.0]
    policy = QueueRetryPolicy(policies={QUEUE: RetryPolicy(attempts=5, backoff_ms=10)}, max_deferral_ms=60_000,
                              clock=lambda: now[0])  # fmt: skip
    broker = StubBroker(middleware=[policy])

    @dramatiq.actor(broker=broker, queue_name=QUEUE)
    def flaky() -> None:
        pass

    message = MessageProxy(flaky.message())
    deferred = Deferred("saturated", delay_ms=15_000, server="127.0.0.2:443")
    # Given a message deferred twice, 50 s apart (within the 60 s limit)
    policy.after_process_message(broker, message, exception=deferred)
    now[0] += 50
    policy.after_process_message(broker, message, exception=deferred)
    assert message.options["deferrals"] == 2 and message.options["deferred_since"] == 1_000_000
    # When it is then attempted and fails, and is deferred again 50 s later
    policy.after_process_message(broker, message, exception=RuntimeError("HTTP 503"))
    assert "deferred_since" not in message.options
    now[0] += 50
    policy.after_process_message(broker, message, exception=deferred)
    # Then the new wait is counted from that deferral: still not dead-lettered
    assert not message.failed and message.options["deferrals"] == 1
    assert message.options["deferred_since"] == 1_100_000
    broker.close()
