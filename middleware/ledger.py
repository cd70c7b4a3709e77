"""DeliveryLedger: record every webhook and email attempt in the delivery ledger (whiskypay/ledger.py)."""

from __future__ import annotations

import collections
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.logging import get_logger

from whiskypay.ledger import (
    LedgerConfig,
    LedgerOp,
    LedgerWriter,
    attempt_op,
    job_kind,
    pending_args,
    stage_pending,
    start_notes,
    take_notes,
)
from whiskypay.redis_errors import classify_redis_error
from whiskypay.settler import RECORD_BATCH_MAX, Settler

#: How often a failing ledger write is logged at warning level, in seconds (the others at debug).
ERROR_LOG_INTERVAL_S = 60.0

#: The most attempt records one script call carries (about 16 us of Redis each: a call blocks Redis 2 ms at most).
BATCH_MAX = RECORD_BATCH_MAX

#: The most attempt records a worker process holds while Redis refuses them; beyond it the oldest are dropped.
BACKLOG_MAX = 20_000


class DeliveryLedger(Middleware):
    """Enter each job as `pending` at send() and record each attempt after its ack or nack.

    At enqueue (producers only: a worker's enqueues are retries and delayed messages coming due) it stages
    the pending record, which WhiskyPayRedisBroker writes in the enqueue's own Lua call
    (ENQUEUE_WITH_LEDGER_LUA). Before an attempt it notes the attempt number (the `retries` option plus one,
    as `whiskypay failed` counts) and starts collecting what the actor reports (`whiskypay.ledger.note_attempt`).
    After the attempt, once the retry policy has decided (this middleware is listed before QueueRetryPolicy,
    so its after-hook runs after that one's), it builds the write, and in after_ack/after_nack hands it to the
    worker process's Settler (whiskypay.settler), which sends it with the acks of its next round (one script call
    for every ack and record ready meanwhile, at most BATCH_MAX records): the worker thread never waits for the
    ledger, and a ledger write that fails (logged; kept for the next round when the error may pass, up to
    BACKLOG_MAX) can neither fail nor repeat a delivery. A SIGKILLed worker loses the records it had not sent yet
    (a few milliseconds' worth). Outside a worker (no Settler) each record is written at once. A deferral (a slow
    host's cap) is not an attempt and writes nothing.

    Parameters:
      retention_s: How long records are kept, in seconds.
      max_payments: The most payments kept (the oldest are dropped beyond it).
      clock: Unix seconds; injected for tests.
    """

    def __init__(self, *, retention_s: int, max_payments: int, clock: Callable[[], float] = time.time) -> None:
        self.logger = get_logger(__name__, type(self))
        self.retention_s = retention_s
        self.max_payments = max_payments
        self.clock = clock
        self._writers: dict[int, LedgerWriter] = {}
        self._started: contextvars.ContextVar[tuple[str, int, int, float] | None] = contextvars.ContextVar(
            "whiskypay_ledger_started", default=None
        )
        self._ready: contextvars.ContextVar[tuple[str, LedgerOp] | None] = contextvars.ContextVar(
            "whiskypay_ledger_ready", default=None
        )
        self._last_error_log = 0.0
        self._errors = 0
        self._backlog: collections.deque[LedgerOp] = collections.deque()
        self._lock = threading.Lock()
        #: The worker process's Settler, which sends the records with its acks (None outside a worker).
        self._settler: Settler | None = None

    def config(self, broker: RedisBroker) -> LedgerConfig:
        """Return the ledger settings for broker's namespace."""
        return LedgerConfig(namespace=broker.namespace, retention_s=self.retention_s, max_payments=self.max_payments)

    def writer(self, broker: RedisBroker) -> LedgerWriter:
        """Return the writer on broker's client."""
        writer = self._writers.get(id(broker.client))
        if writer is None:
            writer = self._writers[id(broker.client)] = LedgerWriter(broker.client)
        return writer

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        if not isinstance(broker, RedisBroker) or getattr(broker, "enqueue_waits_for_redis", False):
            return
        args = pending_args(self.config(broker), message, now_ms=self._now_ms())
        if args is not None:
            stage_pending(message.options["redis_message_id"], args)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if job_kind(message.actor_name) is None:
            return
        retries = message.options.get("retries", 0)
        attempt = (retries if isinstance(retries, int) else 0) + 1
        start_notes()
        self._started.set((str(message.options.get("redis_message_id")), attempt, self._now_ms(),
                           time.perf_counter()))

    def _prepare(
        self, broker: Broker, message: MessageProxy, exception: BaseException | None, error: str | None = None
    ) -> None:
        self._ready.set(None)
        if not isinstance(broker, RedisBroker) or job_kind(message.actor_name) is None:
            return
        redis_id = str(message.options.get("redis_message_id"))
        started = self._started.get()
        self._started.set(None)
        notes = take_notes()
        if started is not None and started[0] == redis_id:
            _, attempt, started_ms, perf = started
            duration_ms = (time.perf_counter() - perf) * 1000
        else:  # skipped before our before-hook ran (an invalid message): its retries were not counted yet
            retries = message.options.get("retries", 0)
            attempt, started_ms, duration_ms, notes = (retries if isinstance(retries, int) else 0) + 1, \
                self._now_ms(), 0.0, []
        try:
            op = attempt_op(
                self.config(broker), message, attempt=attempt, notes=notes, exception=exception,
                failed=message.failed, now_ms=self._now_ms(), started_ms=started_ms, duration_ms=duration_ms,
                error=error,
            )
        except Exception:  # a bug here must not cost the delivery its ack
            self.logger.exception("Could not build the ledger record of %s.", message.message_id)
            return
        if op is not None:
            self._ready.set((redis_id, op))

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        self._prepare(broker, message, exception)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.failed:
            # The reason is in the options (an invalid message's "InvalidMessage: ..."), not in the SkipMessage.
            reason = message.options.get("traceback") or "skipped before it ran"
            self._prepare(broker, message, getattr(message, "_exception", None) or RuntimeError(), str(reason))

    def _write(self, broker: Broker, message: MessageProxy) -> None:
        ready = self._ready.get()
        if ready is None or not isinstance(broker, RedisBroker):
            return
        self._ready.set(None)
        redis_id, op = ready
        if redis_id != str(message.options.get("redis_message_id")):
            return
        settler = self._settler
        if settler is None:
            try:
                self.writer(broker).write(op)
            except redis.RedisError as exc:
                self._failed(1, exc)
            return
        with self._lock:
            self._backlog.append(op)
            if len(self._backlog) > BACKLOG_MAX:
                self._backlog.popleft()
                self._errors += 1
            first = len(self._backlog) == 1
        if first:
            settler.wake()

    def _failed(self, count: int, exc: BaseException) -> None:
        self._errors += count
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            self.logger.warning(
                "Could not record %d attempt(s) in the delivery ledger (%s: %s); deliveries carry on.",
                self._errors, type(exc).__name__, " ".join(str(exc).split())[:200],
            )
            self._errors = 0

    # The Rider protocol (whiskypay.settler): the worker process's Settler sends these records with its acks.

    def has_work(self) -> bool:
        return bool(self._backlog)

    def take(self, most: int) -> list[LedgerOp]:
        with self._lock:
            return [self._backlog.popleft() for _ in range(min(len(self._backlog), most))]

    def refused(self, batch: list[LedgerOp], exc: BaseException) -> None:
        if classify_redis_error(exc) == "transient":  # kept whole for the next round
            with self._lock:
                self._backlog.extendleft(reversed(batch))
        self._failed(len(batch), exc)

    def settled(self, batch: list[LedgerOp], replies: list[Any]) -> int:
        """Keep for the next round the records Redis refused for a reason that may pass; return how many were
        written. Those it refused otherwise are dropped and logged."""
        written, retry = 0, []
        for op, reply in zip(batch, replies, strict=True):
            if isinstance(reply, str) and reply.startswith("error: "):
                refused = redis.ResponseError(reply[len("error: "):])
                if classify_redis_error(refused) == "transient":
                    retry.append(op)
                self._failed(1, refused)
            else:
                written += 1
        if retry:
            with self._lock:
                self._backlog.extendleft(reversed(retry))
        return written

    def flush(self, broker: RedisBroker) -> int:
        """Send the gathered attempt records in one script call (LEDGER_BATCH_LUA) now; return how many were
        written (what the Settler's round does with them, without acks)."""
        batch = self.take(BATCH_MAX)
        if not batch:
            return 0
        try:
            replies = self.writer(broker).write_batch(batch)
        except redis.RedisError as exc:
            self.refused(batch, exc)
            return 0
        return self.settled(batch, replies)

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        settler = getattr(broker, "settler", None)
        if isinstance(settler, Settler):
            self._settler = settler
            settler.attach(self)

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        settler, self._settler = self._settler, None
        if settler is None:
            return
        # The consumers flushed their acks as they closed; send the records still waiting (a few rounds at most).
        deadline = time.monotonic() + 5
        while self._backlog and time.monotonic() < deadline:
            if not self.flush(broker) and self._backlog:  # type: ignore[arg-type]
                time.sleep(0.1)
        settler.detach(self)

    def after_ack(self, broker: Broker, message: MessageProxy) -> None:
        self._write(broker, message)

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        self._write(broker, message)
