"""DeliveryMetrics: whiskypay_deliveries_total{queue, outcome}, whiskypay_delivery_seconds{queue} (one attempt) and
whiskypay_send_to_delivery_seconds{queue} (from send() to the delivering attempt's end) for Prometheus."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.logging import get_logger

from middleware.metrics_exporter import use_multiprocess_dir
from whiskypay.outcomes import classify

#: Histogram buckets of whiskypay_delivery_seconds, in seconds: webhooks answer in ms, slow merchants in seconds,
#: and our HTTP and SMTP timeouts end attempts at 15 to 30 s.
BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)

#: Histogram buckets of whiskypay_send_to_delivery_seconds, in seconds: from a pickup in milliseconds to a delivery
#: after a day of retries (the callback schedule's waits reach hours).
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0,
                     24 * 3600.0)


class DeliveryMetrics(Middleware):
    """Count each attempt's outcome and time it, per queue, into the Prometheus multiprocess directory.

    The outcome label is `outcomes.classify`'s: "delivered", "retried" (raised and enqueued again),
    "dead_lettered" (retries spent, a `throws` error, an invalid message) or "deferred" (not attempted: a slow
    host's cap). It is settled in after_ack/after_nack, which run once every after_process_message hook
    (QueueRetryPolicy's included) has decided `message.failed`, wherever this middleware sits in the list.
    Messages skipped without failing (periodiq's stale ticks) count as nothing. Metrics exist only in worker
    processes (after_process_boot); elsewhere every hook is a no-op. `MetricsExporter`'s fork serves them.

    A delivered message also observes its send-to-delivery latency: from its `message_timestamp` (set at send(),
    kept by every retry) to now, on the wall clock, retries and waits included.

    Parameters:
      queues: The queues counted (others, like the maintenance queue, are ignored).
      clock: Monotonic seconds, for the processing time.
      wall_clock: Unix seconds, for the send-to-delivery latency.
    """

    def __init__(
        self, *, queues: Iterable[str], clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.queues = frozenset(str(queue) for queue in queues)
        self.clock = clock
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        #: message_id -> (queue, processing started at, what it raised); filled by the worker threads, settled at
        #: ack/nack.
        self._attempts: dict[str, tuple[str, float, BaseException | None]] = {}
        self.deliveries: Any = None
        self.delivery_seconds: Any = None
        self.send_to_delivery_seconds: Any = None

    def after_process_boot(self, broker: Broker) -> None:
        use_multiprocess_dir()  # before the first import of prometheus_client, which reads it once
        import prometheus_client

        registry = prometheus_client.CollectorRegistry()
        self.deliveries = prometheus_client.Counter(
            "whiskypay_deliveries", "Processed attempts by outcome: delivered, retried, dead_lettered or deferred.",
            ["queue", "outcome"], registry=registry,
        )
        self.delivery_seconds = prometheus_client.Histogram(
            "whiskypay_delivery_seconds", "Processing time of one attempt, in seconds.",
            ["queue"], buckets=BUCKETS_S, registry=registry,
        )
        self.send_to_delivery_seconds = prometheus_client.Histogram(
            "whiskypay_send_to_delivery_seconds", "From send() to the end of the attempt that delivered, in seconds.",
            ["queue"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )

    def _queue(self, message: MessageProxy) -> str | None:
        queue = q_name(message.queue_name)
        return queue if self.deliveries is not None and queue in self.queues else None

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        queue = self._queue(message)
        if queue is not None:
            with self._lock:
                self._attempts[message.message_id] = (queue, self.clock(), None)

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        with self._lock:
            attempt = self._attempts.get(message.message_id)
            if attempt is None:
                return
            queue, started, _ = attempt
            self._attempts[message.message_id] = (queue, started, exception)
        self.delivery_seconds.labels(queue).observe(max(0.0, self.clock() - started))

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        # A skipped message that was failed (an invalid one) is settled at nack; forget the others.
        if not message.failed:
            with self._lock:
                self._attempts.pop(message.message_id, None)
        elif (queue := self._queue(message)) is not None:
            with self._lock:
                self._attempts.setdefault(message.message_id, (queue, self.clock(), None))

    def _settle(self, message: MessageProxy) -> None:
        if message.queue_name != q_name(message.queue_name):
            return  # a delayed copy handed over to its queue: same message_id as the attempt that may be running
        with self._lock:
            attempt = self._attempts.pop(message.message_id, None)
        if attempt is not None:
            queue, _, exception = attempt
            label = classify(message, exception).label
            self.deliveries.labels(queue, label).inc()
            if label == "delivered":
                sent_s = message.message_timestamp / 1000
                self.send_to_delivery_seconds.labels(queue).observe(max(0.0, self.wall_clock() - sent_s))

    def after_ack(self, broker: Broker, message: MessageProxy) -> None:
        self._settle(message)

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        self._settle(message)
