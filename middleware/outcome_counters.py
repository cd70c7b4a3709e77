"""OutcomeCounters: count delivered and dead-lettered messages per queue, for `whiskypay status`."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import redis
from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.logging import get_logger

from whiskypay import keys
from whiskypay.outcomes import classify

#: The counters' hash fields (`keys.outcome_counters`) of the outcomes counted; others count as neither.
FIELDS = {"delivered": "completed", "dead_lettered": "failed"}

#: The per-minute hash's fields (`keys.minute_outcomes`, the dashboard's chart): every attempt that failed counts.
MINUTE_FIELDS = {"delivered": "delivered", "retried": "failed", "dead_lettered": "failed"}


class OutcomeCounters(Middleware):
    """HINCRBY `completed` when a message is delivered and `failed` when it is dead-lettered (`outcomes.classify`).

    Dramatiq keeps no count of completed messages, so this does. A message with a `merchant_id` is counted for
    its merchant too (`keys.merchant_outcome_counters`, for `whiskypay status --merchant`). An attempt that is
    retried or deferred counts as neither. Listed before the middleware that decide `message.failed`, so its
    after-hooks run after theirs.
    Each delivered or failed attempt is also counted in its minute's hash (`keys.minute_outcomes`, kept two
    hours), for the dashboard's delivered / failed per minute chart.

    Counts are added up in memory and written by a background thread every flush_interval_s (and at worker
    shutdown), so counting costs no Redis round trip per message; a killed worker loses at most that
    interval's counts. Outside a worker (tests calling the hooks) a count past the interval also flushes.
    A Redis error here never breaks processing: the counts Redis did not apply are kept for the next flush (one
    MULTI/EXEC per flush, so a refused flush applied nothing and none is counted twice), logged once.

    Parameters:
      clock: Unix seconds, for `started_at` and the flush interval; injected for tests.
      flush_interval_s: The longest time a count waits in memory, in seconds.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, flush_interval_s: float = 1.0) -> None:
        self.logger = get_logger(__name__, type(self))
        self.clock = clock
        self.flush_interval_s = flush_interval_s
        self._pending: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._last_flush = clock()
        self._error_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _count(self, broker: Broker, message: MessageProxy, exception: BaseException | None) -> None:
        label = classify(message, exception).label
        field, per_minute = FIELDS.get(label), MINUTE_FIELDS.get(label)
        if per_minute is None or not isinstance(broker, RedisBroker):
            return
        merchant_id = message.kwargs.get("merchant_id") if isinstance(message.kwargs, dict) else None
        minute = keys.minute_outcomes(broker.namespace, message.queue_name, int(self.clock()) // 60)
        with self._lock:
            self._pending[minute, per_minute] += 1
            if field is not None:
                self._pending[keys.outcome_counters(broker.namespace, message.queue_name), field] += 1
            if field is not None and isinstance(merchant_id, str):
                per_merchant = keys.merchant_outcome_counters(broker.namespace, message.queue_name)
                self._pending[per_merchant, keys.merchant_outcome_field(field, merchant_id)] += 1
        if self.clock() - self._last_flush >= self.flush_interval_s:
            self.flush(broker)

    def flush(self, broker: Broker) -> None:
        """Write the counts gathered so far to Redis (one MULTI/EXEC); keep those Redis did not apply."""
        if not isinstance(broker, RedisBroker) or not self._flushing.acquire(blocking=False):
            return  # another thread is flushing
        try:
            with self._lock:
                pending, self._pending = self._pending, Counter()
                self._last_flush = self.clock()
            if not pending:
                return
            # MULTI/EXEC, not a plain pipeline: a command Redis refuses while queueing (NOPERM, OOM, READONLY...)
            # aborts the whole EXEC, so a failed flush applied nothing and its counts can be kept whole. A command
            # that fails inside EXEC (WRONGTYPE) fails alone: only its count is kept. Either way no count is
            # written twice (a plain pipeline applied the commands before the refused one, then re-added them).
            pipe = broker.client.pipeline(transaction=True)
            counted: list[tuple[int, tuple[str, str], int]] = []  # (reply index, (key, field), count)
            for (key, field), count in pending.items():
                counted.append((len(pipe), (key, field), count))
                pipe.hincrby(key, field, count)
                if keys.is_minute_outcomes(key):
                    pipe.expire(key, keys.MINUTE_OUTCOMES_TTL_S)
                elif field in FIELDS.values():  # a queue's own hash; the per-merchant one has no started_at
                    pipe.hsetnx(key, "started_at", int(self.clock()))
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:  # EXECABORT or no connection: nothing applied; keep it all for later
                self._keep(pending, exc)
                return
            failed: Counter[tuple[str, str]] = Counter(
                {entry: count for index, entry, count in counted if isinstance(replies[index], Exception)}
            )
            if failed:
                self._keep(failed, next(reply for reply in replies if isinstance(reply, Exception)))
        finally:
            self._flushing.release()

    def _keep(self, counts: Counter[tuple[str, str]], exc: BaseException) -> None:
        """Keep counts that did not reach Redis for the next flush (a count must never fail or retry a message)."""
        with self._lock:
            self._pending.update(counts)
        if not self._error_logged:
            self._error_logged = True
            names = ", ".join(sorted({key for key, _ in counts}))
            self.logger.debug("Could not count outcomes in %s: %s", names, type(exc).__name__)

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        self._count(broker, message, exception)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.failed:
            self._count(broker, message, None)

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        def flush_periodically() -> None:
            while not self._stop.wait(self.flush_interval_s):
                self.flush(broker)

        self._stop.clear()
        self._thread = threading.Thread(target=flush_periodically, name="whiskypay-counters", daemon=True)
        self._thread.start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush(broker)
