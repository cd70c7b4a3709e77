"""MerchantBreakers: a merchant that stops answering is tripped, parked, probed, released in order, given up on.

Per callback (send_callback message), with its merchant (merchant_id, else `host=<its host>`; `whiskypay.merchants`):

- before_process_message: a merchant the local view knows nothing about (every healthy one) costs a dict lookup,
  no Redis call. If its breaker is open, the message is parked (one script: `BreakerStore.park`) and `Parked` is
  raised: not attempted, no attempt counted, the worker thread free at once. The message that is the merchant's
  probe passes. So does every message of a closed merchant, unless half the threshold already failed in a row
  and this process has enough attempts in flight to it to reach the threshold if they all fail: then it is
  parked too (the keeper releases it within a tick if they do not), so a merchant that goes down gets at most
  WHISKYPAY_BREAKER_FAILURES attempts from a process before it trips.
- after_process_message (this middleware is last in the list, so its after-hook runs before QueueRetryPolicy's):
  an outage failure (5xx, 408, 429, timeout, connection error) is counted in Redis; if that opened the breaker,
  or found it open, the message is parked with its last error and marked `parked`, and QueueRetryPolicy leaves
  it alone (no retry, no attempt spent: a probe, or any attempt that ends parked, never costs its retry budget).
  A reply (2xx, or a 4xx that is not 408/429) of a merchant with a record resets its count; a probe's closes the
  breaker (one log line: the resolution).
- A keeper thread per worker process (consuming callbackQueue) refreshes the view every second, takes the probe of
  each open merchant when due (one per interval across all workers: `BreakerStore.take_probe`), releases a closed
  merchant's parked callbacks oldest first at release_rate per second, and dead-letters those parked longer than
  park_max_ms (one Sentry event per merchant and outage). Opening sends one Sentry event per merchant.

A Redis error in any of this never loses a callback: the message is attempted, or retried, as without breakers
(`whiskypay.redis_errors` classifies it: a transient one is logged once; a configuration one, NOPERM or
WRONGTYPE, is also reported to Sentry once, since it will not clear by itself).

Parameters:
  failures: Consecutive outage failures that open a merchant's breaker (WHISKYPAY_BREAKER_FAILURES).
  probe_interval_ms: Time between probes of an open merchant (WHISKYPAY_BREAKER_PROBE_INTERVAL_MS).
  release_rate: Parked callbacks released per second once a breaker closes (WHISKYPAY_BREAKER_RELEASE_RATE).
  park_max_ms: The longest a callback stays parked before it is dead-lettered (WHISKYPAY_PARK_MAX_MS).
  callback_queue: The queue whose workers run the keeper.
  tick_s, refresh_s: How often the keeper tends the merchants with parked callbacks (a Redis call only for those)
    / reads the whole view from Redis.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name
from dramatiq.logging import get_logger

from middleware.ledger import DeliveryLedger
from whiskypay.breakers import BreakerStore, BreakerView, Expired, dead_letter_data
from whiskypay.errors import Deferred, Parked
from whiskypay.ledger import MessageView, set_job_state
from whiskypay.merchants import CALLBACK_ACTOR, Breaker, is_outage, merchant_of, park_limit_reason
from whiskypay.outcomes import record_failure
from whiskypay.redaction import url_host
from whiskypay.redis_errors import (
    call_through_transient,
    classify_redis_error,
    describe,
    report_configuration_error,
)


class MerchantBreakers(Middleware):
    """Trip, park, probe, release and give up on failing merchants (see the module docstring)."""

    def __init__(
        self,
        *,
        failures: int,
        probe_interval_ms: int,
        release_rate: float,
        park_max_ms: int,
        callback_queue: str = "callbackQueue",
        tick_s: float = 0.02,
        refresh_s: float = 1.0,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.failures = failures
        self.probe_interval_ms = probe_interval_ms
        self.release_rate = release_rate
        self.park_max_ms = park_max_ms
        self.callback_queue = callback_queue
        self.tick_s = tick_s
        self.refresh_s = refresh_s
        #: From this many failures in a row, a process parks a callback rather than start an attempt that, with those
        #: it has in flight to the merchant, could pass the threshold (fewer: a busy healthy merchant's one 503
        #: must not hold back its traffic).
        self.suspect_after = max(1, failures // 2)
        #: How often one merchant's parked callbacks are checked against park_max_ms, in milliseconds.
        self.expire_check_ms = min(60_000, max(100, park_max_ms // 10))
        self.view = BreakerView()
        self.store: BreakerStore | None = None
        self._lock = threading.Lock()
        self._inflight: Counter[str] = Counter()
        self._attempting: dict[str, str] = {}
        self._probes: set[str] = set()
        self._expire_due: dict[str, float] = {}
        self._stop = threading.Event()
        #: Set when this process's view may have gained parked callbacks: wakes an idle keeper at once.
        self._nudge = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis_error_logged = False
        self._configuration_reported = False
        #: Marks park-limit dead letters `failed` in the delivery ledger (set at boot when the ledger is on).
        self.ledger: Callable[[list[Expired]], None] | None = None

    # ---------------------------------------------------------------------------------------------------------------
    # lifecycle

    def store_for(self, broker: Broker) -> BreakerStore | None:
        """Return the breaker store on broker's Redis (None for a broker without one)."""
        if self.store is None and isinstance(broker, RedisBroker):
            self.store = BreakerStore(broker.client, broker.namespace)
        return self.store

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        store = self.store_for(broker)
        if store is None:
            return
        waker = getattr(broker, "waker", None)
        if waker is not None:
            waker.listen(store.channel, self._heard)
        ledger = next((m for m in broker.middleware if isinstance(m, DeliveryLedger)), None)
        if ledger is not None and isinstance(broker, RedisBroker):
            config, client = ledger.config(broker), broker.client

            def mark_failed(rows: list[Expired]) -> None:
                for row in rows:
                    try:
                        set_job_state(client, config, MessageView(json.loads(row.data)), "failed")
                    except (redis.RedisError, ValueError) as exc:  # the ledger must never hold up a dead letter
                        self.logger.debug("Could not mark %s failed in the ledger (%s).", row.redis_id,
                                          type(exc).__name__)

            self.ledger = mark_failed
        try:
            self.refresh()
        except redis.RedisError as exc:
            self._redis_failed("reading the merchant breakers", exc)
        queues = worker.consumer_whitelist
        if not queues or self.callback_queue in queues:
            self._stop.clear()
            self._thread = threading.Thread(target=self._keep, name="whiskypay-breakers", daemon=True)
            self._thread.start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stop.set()
        self._nudge.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _heard(self, data: bytes) -> None:
        self.view.apply(data, now_ms=int(time.time() * 1000), probe_interval_ms=self.probe_interval_ms)
        self._nudge.set()

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        # Either kind, the callback is attempted or retried as without breakers (nothing is lost and no thread
        # waits); a configuration error is also reported once (Sentry and the log), since it will not clear.
        if classify_redis_error(exc) == "configuration":
            if not self._configuration_reported:
                self._configuration_reported = True
                report_configuration_error(
                    exc, what=what, logger=self.logger,
                    consequence="merchant breakers are off in this worker (callbacks are attempted and retried as "
                                "without them)",
                )
            return
        level = self.logger.debug if self._redis_error_logged else self.logger.warning
        self._redis_error_logged = True
        level("Redis refused %s (%s); callbacks are attempted and retried as without breakers meanwhile.",
              what, describe(exc))

    def _parked_anyway(self, store: BreakerStore, merchant: str, redis_id: str, exc: redis.RedisError) -> bool:
        """Return True if a park whose reply was lost (exc) parked the callback after all.

        A dropped connection or a timeout may come after the script ran: attempting or retrying the callback then
        would deliver it twice (once now, once when its parked copy is released). So ask, waiting out a transient
        error; an error reply (the script did not run) or a configuration error answers False.
        """
        if not isinstance(exc, redis.ConnectionError | redis.TimeoutError) or isinstance(
            exc, redis.AuthenticationError | redis.exceptions.BusyLoadingError
        ):
            return False
        try:
            return call_through_transient(
                lambda: store.is_parked(merchant, redis_id), what=f"checking whether merchant {merchant}'s "
                f"callback {redis_id} was parked", logger=self.logger,
            )
        except redis.RedisError:
            return False

    # ---------------------------------------------------------------------------------------------------------------
    # per message

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.actor_name != CALLBACK_ACTOR:
            return
        merchant = merchant_of(message.kwargs)
        if merchant is None:
            return
        known = self.view.get(merchant)
        if known is not None:
            with self._lock:
                force = (
                    known.state == "closed"
                    and known.failures >= self.suspect_after
                    and known.failures + self._inflight[merchant] >= self.failures
                )
            if known.state == "open" or force:
                self._park_or_probe(broker, message, merchant, known, force=force)
        with self._lock:
            self._inflight[merchant] += 1
            self._attempting[message.message_id] = merchant

    def _park_or_probe(
        self, broker: Broker, message: MessageProxy, merchant: str, known: Breaker, *, force: bool
    ) -> None:
        store = self.store_for(broker)
        if store is None:
            return
        redis_id = message.options.get("redis_message_id", message.message_id)
        try:
            outcome = store.park(
                merchant, redis_id=redis_id, data=message.encode(), score=message.message_timestamp,
                host=url_host(message.kwargs.get("callback_url")) or "-", queue=q_name(message.queue_name),
                force=force,
            )
        except redis.RedisError as exc:
            if not self._parked_anyway(store, merchant, redis_id, exc):
                self._redis_failed(f"parking a callback of merchant {merchant}", exc)
                return
            outcome = "parked"
        if outcome == "parked":
            self.view.update(merchant, parked=known.parked + 1)
            self._nudge.set()
            raise Parked(f"merchant {merchant} is unreachable (its breaker is open): parked", merchant=merchant)
        if outcome == "closed":
            self.view.update(merchant, state="closed")  # the view was behind: attempt it
        elif outcome == "probe":
            with self._lock:
                self._probes.add(message.message_id)
            self.logger.info("Probing merchant %s with callback %s.", merchant, message.message_id)

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        with self._lock:
            merchant = self._attempting.pop(message.message_id, None)
            if merchant is None:
                return  # not a callback, or parked before it ran
            probe = message.message_id in self._probes
            self._probes.discard(message.message_id)
        try:
            store = self.store_for(broker)
            if store is None or isinstance(exception, Deferred | Parked):
                return
            if exception is None or _answered(exception):
                if self.view.get(merchant) is not None or probe:
                    self._answered(store, message, merchant, probe=probe)
                return
            if is_outage(exception):
                self._failed(store, message, merchant, exception, probe=probe)
        finally:
            # Only once its outcome is in the view: until then it counts as in flight, so another thread cannot
            # start an attempt between the two that would pass the threshold.
            with self._lock:
                self._inflight[merchant] -= 1
                if self._inflight[merchant] <= 0:
                    del self._inflight[merchant]

    def _answered(self, store: BreakerStore, message: MessageProxy, merchant: str, *, probe: bool) -> None:
        try:
            done = store.succeed(merchant, redis_id=message.options.get("redis_message_id", ""))
        except redis.RedisError as exc:
            self._redis_failed(f"resetting merchant {merchant}'s breaker", exc)
            return
        if done == 2:
            self.view.update(merchant, state="closed", failures=0, since_ms=None, next_probe_at_ms=None, held=False)
            known = self.view.get(merchant)
            self.logger.warning(
                "Merchant %s answered %s: breaker closed; its %s parked callback(s) are released oldest first, "
                "%g per second.", merchant, "the probe" if probe else "again", known.parked if known else "?",
                self.release_rate,
            )
        elif done == 1:
            self.view.update(merchant, failures=0)

    def _failed(
        self, store: BreakerStore, message: MessageProxy, merchant: str, exception: BaseException, *, probe: bool
    ) -> None:
        record_failure(message, exception)
        host = url_host(message.kwargs.get("callback_url")) or "-"
        error = str(message.options.get("traceback", type(exception).__name__))
        redis_id = message.options.get("redis_message_id", message.message_id)
        try:
            outcome = store.fail(
                merchant, threshold=self.failures, probe_interval_ms=self.probe_interval_ms, error=error, host=host,
                queue=q_name(message.queue_name), redis_id=redis_id, data=message.encode(),
                score=message.message_timestamp,
            )
        except redis.RedisError as exc:
            self._redis_failed(f"counting a failure of merchant {merchant}", exc)
            if self._parked_anyway(store, merchant, redis_id, exc):
                message.options["parked"] = True  # not retried as well: its parked copy is released later
            return
        known = self.view.get(merchant)
        # Threads apply their counts in any order: keep the highest, so the in-flight rule never counts too few.
        failures = max(outcome.failures, known.failures if known else 0)
        changes: dict[str, Any] = {"failures": failures, "last_error": error, "host": host}
        if outcome.parked:
            changes.update(state="open", parked=(known.parked if known else 0) + 1,
                           next_probe_at_ms=outcome.next_probe_at_ms)
            message.options["parked"] = True
        self.view.update(merchant, **changes)
        if outcome.opened:
            self._report_open(merchant, host, outcome.failures, error)
        elif probe:
            self.logger.info("Probe of merchant %s failed (%s); its breaker stays open.", merchant, error)

    # ---------------------------------------------------------------------------------------------------------------
    # reports

    def _report_open(self, merchant: str, host: str, failures: int, error: str) -> None:
        summary = (
            f"merchant {merchant} unreachable: breaker opened after {failures} failed attempts in a row ({error}); "
            f"its callbacks are parked and probed every {self.probe_interval_ms} ms"
        )
        self.logger.warning("Breaker opened: %s.", summary)
        import sentry_sdk

        with sentry_sdk.new_scope() as scope:
            scope.set_tag("merchant", merchant)
            scope.set_tag("host", host)
            scope.fingerprint = ["merchant-breaker-open", merchant]
            sentry_sdk.capture_message(summary, level="error")

    def _report_park_limit(self, merchant: str, host: str, count: int, reason: str) -> None:
        import sentry_sdk

        with sentry_sdk.new_scope() as scope:
            scope.set_tag("merchant", merchant)
            scope.set_tag("host", host)
            scope.set_tag("dead_lettered", count)
            scope.fingerprint = ["merchant-park-limit", merchant]
            sentry_sdk.capture_message(f"{count} parked callback(s) dead-lettered: {reason}", level="error")

    # ---------------------------------------------------------------------------------------------------------------
    # the keeper

    def refresh(self) -> None:
        """Replace the local view with the breakers in Redis."""
        if self.store is None:
            return
        taken_at = self.view.clock()
        breakers = self.store.snapshot()
        self.view.replace_all(breakers, taken_at=taken_at)

    def _keep(self) -> None:
        # Ticks every tick_s while some merchant has parked callbacks; otherwise it only refreshes the view each
        # refresh_s (an idle worker would wake 50 times a second for nothing), and a park or an announcement in
        # this process nudges it awake at once.
        next_refresh = time.monotonic() + self.refresh_s  # before_worker_boot has just refreshed
        while not self._stop.is_set():
            busy = any(breaker.parked > 0 for breaker in self.view.all())
            self._nudge.wait(self.tick_s if busy else max(0.0, next_refresh - time.monotonic()))
            self._nudge.clear()
            if self._stop.is_set():
                break
            try:
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.refresh_s
                    self.refresh()
                self.tend(now_ms=int(time.time() * 1000))
            except redis.RedisError as exc:
                self._redis_failed("tending the merchant breakers", exc)
            except Exception:  # never let the keeper die: the next tick tries again
                self.logger.exception("Tending the merchant breakers failed.")

    def tend(self, *, now_ms: int) -> None:
        """Probe, release and expire what is due for every merchant with parked callbacks (the keeper's tick)."""
        store = self.store
        if store is None:
            return
        for breaker in self.view.all():
            if breaker.parked <= 0:
                continue
            queue = breaker.queue or self.callback_queue
            if breaker.state == "open":
                if not breaker.held and (breaker.next_probe_at_ms is None or now_ms >= breaker.next_probe_at_ms):
                    taken, after = store.take_probe(
                        breaker.merchant, queue=queue, probe_interval_ms=self.probe_interval_ms
                    )
                    self.view.update(breaker.merchant, next_probe_at_ms=after or now_ms + self.probe_interval_ms,
                                     parked=breaker.parked - int(taken))
            else:
                released, left = store.release(breaker.merchant, queue=queue, rate=self.release_rate,
                                                tick_s=self.tick_s)
                if left >= 0:
                    self.view.update(breaker.merchant, parked=left)
                if released:
                    self.logger.debug("Released %d parked callback(s) of %s; %d left.", released, breaker.merchant,
                                      left)
            self._expire(store, breaker, queue, now_ms)

    def _expire(self, store: BreakerStore, breaker: Breaker, queue: str, now_ms: int) -> None:
        if now_ms < self._expire_due.get(breaker.merchant, 0):
            return
        self._expire_due[breaker.merchant] = now_ms + self.expire_check_ms
        found = store.expired(breaker.merchant, limit_ms=self.park_max_ms, check_interval_ms=self.expire_check_ms)
        if not found or not found[3]:
            return
        now, since, reported, rows = found
        episode = since if since is not None else min(row.parked_at_ms for row in rows)
        reason = ""
        letters = []
        for row in rows:
            reason = park_limit_reason(
                breaker.merchant, parked_at_ms=row.parked_at_ms, since_ms=since, limit_ms=self.park_max_ms, now_ms=now
            )
            letters.append((row.redis_id, dead_letter_data(row.data, reason=reason, failed_at_ms=now)))
        report = reported != episode
        moved = store.dead_letter(breaker.merchant, queue=queue, letters=letters,
                                  reported_since=episode if report else None)
        if moved and self.ledger is not None:
            self.ledger(rows)
        if moved:
            self.view.update(breaker.merchant, parked=max(0, breaker.parked - moved))
            self.logger.warning("Dead-lettered %d parked callback(s) of merchant %s: %s.", moved, breaker.merchant,
                                reason)
            if report:
                self._report_park_limit(breaker.merchant, breaker.host or "-", moved, reason)


def _answered(exception: BaseException) -> bool:
    """Return True if the failed attempt got a reply that says the merchant is up (a 4xx other than 408/429)."""
    status = getattr(exception, "tags", {}).get("http_status")
    return isinstance(status, int) and not is_outage(exception)
