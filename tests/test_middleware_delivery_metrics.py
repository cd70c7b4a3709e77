"""Tier 2: DeliveryMetrics alone (with Dramatiq's Retries) on a StubBroker, throwaway actors and a real Worker."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import prometheus_client  # noqa: F401  imported first here: this process keeps its samples in memory
import pytest
from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries, SkipMessage, prometheus

from middleware.delivery_metrics import DeliveryMetrics
from tests.helpers import wait_until
from whiskypay.errors import Deferred
from whiskypay.outcomes import METRIC_OUTCOMES

QUEUE = "q"
DELIVERED, RETRIED, DEAD_LETTERED, PARKED, DEFERRED = METRIC_OUTCOMES


class FailUnprocessed(Middleware):
    """Fail every message before it runs, the way PayloadValidation drops an invalid one."""

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        message.fail()
        raise SkipMessage()


class SkipUnprocessed(Middleware):
    """Skip every message without failing it, the way periodiq drops a stale tick."""

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        raise SkipMessage()


class Run:
    """A StubBroker with DeliveryMetrics (booted as in a worker process) plus the given middleware, and a Worker."""

    def __init__(self, *middleware: Middleware, queues: tuple[str, ...] = (QUEUE,)) -> None:
        ticks = itertools.count()
        self.metrics = DeliveryMetrics(queues=queues, clock=lambda: next(ticks) * 0.25)  # each reading 250 ms on
        self.broker = StubBroker(middleware=[*middleware, self.metrics])
        self.broker.emit_after("process_boot")
        self.worker = Worker(self.broker, worker_timeout=20, worker_threads=1)

    def actor(self, fn: Any, queue: str = QUEUE) -> dramatiq.Actor[Any, Any]:
        return dramatiq.actor(fn, broker=self.broker, actor_name=f"job_{queue}", queue_name=queue)

    def drain(self, queue: str = QUEUE) -> None:
        self.worker.start()
        self.broker.join(queue, fail_fast=False, timeout=10_000)
        self.worker.join()

    def deliveries(self) -> dict[str, float]:
        """Return {outcome: count} of QUEUE's whiskypay_deliveries_total samples."""
        return {
            sample.labels["outcome"]: sample.value
            for family in self.metrics.deliveries.collect()
            for sample in family.samples
            if sample.name == "whiskypay_deliveries_total" and sample.labels["queue"] == QUEUE
        }

    def timings(self) -> tuple[float, float]:
        """Return (count, sum in s) of QUEUE's whiskypay_delivery_seconds."""
        samples = {
            sample.name: sample.value
            for family in self.metrics.delivery_seconds.collect()
            for sample in family.samples
            if sample.labels.get("queue") == QUEUE
        }
        return samples.get("whiskypay_delivery_seconds_count", 0.0), samples.get("whiskypay_delivery_seconds_sum", 0.0)

    def close(self) -> None:
        self.worker.stop()
        self.broker.close()


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # after_process_boot points prometheus_client at the multiprocess directory: keep that inside this test
    monkeypatch.setattr(prometheus, "DB_PATH", str(tmp_path / "prometheus"))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prometheus"))
    made: list[Run] = []

    def _run(*middleware: Middleware, **kwargs: Any) -> Run:
        made.append(Run(*middleware, **kwargs))
        return made[-1]

    yield _run
    for each in made:
        each.close()


def flaky(failures: int) -> Any:
    """Return an actor function that raises on its first `failures` calls."""
    calls = itertools.count()

    def fn() -> None:
        if next(calls) < failures:
            raise RuntimeError("merchant answered 503")

    return fn


def settled(run: Run, expected: dict[str, float]) -> dict[str, float]:
    """Wait until the counts reach expected (the ack hooks run just after the queue drained), then return them."""
    wait_until(lambda: run.deliveries() == expected, timeout_s=5, what=f"counts {expected}")
    time.sleep(0.05)
    return run.deliveries()


def test_given_an_attempt_that_succeeds_when_processed_then_one_delivery_is_counted_and_timed(run: Any) -> None:
    metrics = run()
    metrics.actor(lambda: None).send()
    metrics.drain()
    assert settled(metrics, {DELIVERED: 1}) == {DELIVERED: 1}
    # timed once, from before to after processing: one clock step of 250 ms
    assert metrics.timings() == (1, 0.25)


def test_given_one_failed_attempt_then_a_success_when_processed_then_one_retried_and_one_delivered(run: Any) -> None:
    metrics = run(Retries(max_retries=1, min_backoff=1, max_backoff=1))
    metrics.actor(flaky(1)).send()
    metrics.drain()
    assert settled(metrics, {RETRIED: 1, DELIVERED: 1}) == {RETRIED: 1, DELIVERED: 1}
    assert metrics.timings() == (2, 0.5)


def test_given_attempts_that_always_fail_when_retries_are_spent_then_the_last_counts_as_dead_lettered(
    run: Any,
) -> None:
    metrics = run(Retries(max_retries=1, min_backoff=1, max_backoff=1))
    metrics.actor(flaky(99)).send()
    metrics.drain()
    assert settled(metrics, {RETRIED: 1, DEAD_LETTERED: 1}) == {RETRIED: 1, DEAD_LETTERED: 1}
    assert metrics.timings()[0] == 2


def test_given_a_deferred_attempt_when_processed_then_it_counts_as_deferred_not_retried(run: Any) -> None:
    metrics = run(Retries(max_retries=3, min_backoff=1, max_backoff=1))
    calls = itertools.count()

    def deferred_once() -> None:
        if next(calls) == 0:
            raise Deferred("2 slow deliveries to merchant.example in flight; deferred", delay_ms=1)

    metrics.actor(deferred_once).send()
    metrics.drain()
    assert settled(metrics, {DEFERRED: 1, DELIVERED: 1}) == {DEFERRED: 1, DELIVERED: 1}


def test_given_a_message_failed_before_it_ran_when_skipped_then_it_counts_as_dead_lettered_untimed(
    run: Any,
) -> None:
    metrics = run(FailUnprocessed())
    metrics.actor(lambda: None).send()
    metrics.drain()
    assert settled(metrics, {DEAD_LETTERED: 1}) == {DEAD_LETTERED: 1}
    assert metrics.timings() == (0, 0)


def test_given_a_message_skipped_without_failing_when_processed_then_nothing_is_counted(run: Any) -> None:
    metrics = run(SkipUnprocessed())
    metrics.actor(lambda: None).send()
    metrics.drain()
    time.sleep(0.2)
    assert metrics.deliveries() == {}


def test_given_a_queue_not_listed_when_its_message_is_processed_then_nothing_is_counted(run: Any) -> None:
    metrics = run(queues=("other",))
    metrics.actor(lambda: None).send()
    metrics.drain()
    time.sleep(0.2)
    assert metrics.deliveries() == {} and metrics.timings() == (0, 0)


def test_given_a_process_that_never_booted_as_a_worker_when_hooks_run_then_they_do_nothing() -> None:
    # Given DeliveryMetrics in a gateway process (no after_process_boot: no metrics exist)
    metrics = DeliveryMetrics(queues=(QUEUE,))
    broker = StubBroker(middleware=[])
    message = MessageProxy(Message(queue_name=QUEUE, actor_name="job", args=(), kwargs={}, options={}))
    try:
        # When every hook of an attempt runs, then none raises and nothing was created
        metrics.before_process_message(broker, message)
        metrics.after_process_message(broker, message, exception=RuntimeError("x"))
        metrics.after_skip_message(broker, message)
        metrics.after_ack(broker, message)
        metrics.after_nack(broker, message)
        assert metrics.deliveries is None and metrics.delivery_seconds is None
    finally:
        broker.close()
