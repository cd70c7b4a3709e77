"""WhiskyPayRedisBroker: Dramatiq's RedisBroker with instant pickup, bounded redelivery and poison handling.

Each change keeps Dramatiq's Redis layout and delivery guarantees (acks, requeue of a dead worker's messages)
as they are:

- Wake-up instead of sleep. Stock consumers poll an empty queue with a backoff up to the worker timeout
  (measured here: pickup p50 about 300 ms, p99 about 900 ms). Here every enqueue also PUBLISHes on
  `<namespace>:wake:<queue>` (`keys.wake_channel`), inside the enqueue's own Lua call (ENQUEUE_LUA, so no extra
  round trip), and an idle consumer waits on an event that one subscriber thread per process sets. An ack or
  nack sets it too, so a consumer whose prefetch window was full refills at once. The consumer still polls
  every worker timeout (1 s by default), so messages that arrive without a publish (requeues, maintenance,
  other producers) are found as before.
- Bounded redelivery. Dramatiq requeues a dead worker's unacked messages only in "maintenance", which it
  runs at random (0.1% of commands) per queue: a SIGKILLed worker's messages came back after 914 s here.
  This broker runs maintenance for each queue at least every `maintenance_interval_ms`, so they come back
  within heartbeat_timeout + maintenance_interval + one poll.
- One enqueue call. Every enqueue is one Lua call (ENQUEUE_LUA, Dramatiq's layout): the event reservation a
  before_enqueue hook asked for (IdempotentEnqueue), the message, the wake-up PUBLISH. A refused reservation
  enqueues nothing; a failed enqueue leaves no reservation behind. A delayed message coming due is moved in
  that call: its delay-queue copy is acked there too (stock Dramatiq enqueues, then acks, in two calls, and with
  the instant wake-up another consumer ran the message in between about 1 time in 30: Dramatiq's
  test_redis_join_race_condition).
- Redis outages and error replies, classified once (whiskypay.redis_errors). A consumer that loses Redis, or
  gets a transient error reply (READONLY, OOM, BUSY, LOADING), waits and tries again instead of being
  restarted, because a restart drops the delayed retries the worker holds in memory (their acks stay with the
  live worker, so nothing would ever requeue them). In a worker process an enqueue (a retry being scheduled, a
  delayed message coming due), an ack and a nack wait the same way, because the message they carry would
  otherwise stay in this worker's acks with no retry and no dead letter. A configuration error (NOPERM,
  WRONGTYPE...) is reported to Sentry and the log once, and the worker stops taking messages: the message
  whose retry or dead letter could not be written stays unacknowledged, and comes back when the worker is
  restarted.
- Replica acknowledgements. With `min_replica_acks` N > 0 a producer's enqueue is followed by `WAIT N timeout`
  on the same connection (WAIT counts that connection's writes), in one round trip; fewer acknowledgements
  raise `NotReplicated` (an EnqueueError saying the job may still have been accepted), and the event_id
  reservation stays, so the gateway's retry with the same event_id cannot enqueue it twice. Workers' own
  enqueues (retries, delayed messages coming due) do not wait: their replication is ordered before the ack
  that follows them, so a failover never keeps the ack without the retry.
- Shutdown. A stopping consumer hands back the messages it fetched but had not handed out yet (stock
  Dramatiq leaves them to maintenance, a heartbeat timeout later).
- Poison messages. Stock Dramatiq cannot decode random bytes or wrong-shape JSON; its consumer restarts
  and the message sits unacked forever. Here it is rewritten into a readable placeholder message that
  carries the reason (and the first bytes as text, addresses masked and URLs cut: `masked_sample`) and
  dead-lettered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import uuid4

import redis
from dramatiq import Message, Middleware
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer, _scripts
from dramatiq.common import compute_backoff, current_millis, dq_name, q_name
from dramatiq.errors import DecodeError
from dramatiq.logging import get_logger
from dramatiq.middleware import MiddlewareError
from redis.commands.core import Script

from whiskypay import keys
from whiskypay.errors import DuplicateEvent, InvalidPayload, NotReplicated
from whiskypay.ledger import LEDGER_PENDING_LUA, take_pending
from whiskypay.outcomes import failure_options
from whiskypay.redaction import masked_sample
from whiskypay.redis_errors import (
    LOG_EVERY,
    call_through_transient,
    classify_redis_error,
    describe,
    report_configuration_error,
)
from whiskypay.replay import DEFAULT_REPLAY_RATE, LanePromoter
from whiskypay.settler import Settler

#: Maintenance requeues dead workers' messages; ack and nack never trigger it (as in Dramatiq).
_NO_MAINTENANCE = frozenset({"ack", "nack"})

#: How much of an undecodable message is kept (as masked text) in its dead-letter placeholder, in bytes.
POISON_SAMPLE_BYTES = 2048

#: The actor name given to the placeholder of an undecodable message.
UNDECODABLE_ACTOR = "undecodable-message"



#: The whole of one enqueue, in one call: so a reservation never exists without its message, nor a message
#: without its reservation. Extend it here (issue 11's ledger record, before the RPUSH), and keep KEYS/ARGV below
#: and WhiskyPayRedisBroker._enqueue_keys_args in step.
ENQUEUE_LUA = b"""
-- KEYS[1]  <ns>:<queue>          Dramatiq's queue: a list of redis message ids
-- KEYS[2]  <ns>:<queue>.msgs     Dramatiq's messages: redis message id -> encoded message
-- KEYS[3]  the reservation key   (IdempotentEnqueue's event_id key), or "" when the message reserves nothing
-- ARGV[1]  redis message id      (new at each enqueue: a retry or a delayed move gets another)
-- ARGV[2]  the encoded message
-- ARGV[3]  message id            (stable across retries): the reservation's holder
-- ARGV[4]  the reservation's time to live, in seconds
-- ARGV[5]  the wake channel      <ns>:wake:<queue> (QueueWaker), so an idle consumer fetches at once
-- KEYS[4]  this worker's ack set of the delay queue <ns>:__acks__.<worker>.<queue>.DQ (with KEYS[5], ARGV[6]);
--          absent when ARGV[6] is ""
-- KEYS[5]  the delay queue's messages <ns>:<queue>.DQ.msgs; absent when ARGV[6] is ""
-- ARGV[6]  for a delayed message coming due: the redis id of its delay-queue copy, acked here, or ""
-- Returns {"enqueued"}, or {"duplicate", holder} when another message holds the reservation (nothing written).
--
-- Order matters. Redis does not roll a script back, so every command that can be refused (an ACL denial,
-- WRONGTYPE, OOM and READONLY at the first write) runs before the RPUSH, the commit point: a refused call
-- leaves at most the reservation and an unlisted hash entry, which the caller removes (RELEASE_LUA).
local queue, messages, reservation = KEYS[1], KEYS[2], KEYS[3]
local redis_id, data, holder, ttl, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call("hexists", messages, redis_id) == 1 then
    return {"enqueued"}  -- this very call ran before and its reply was lost
end
-- The reservation: taken (one command in the common case), or already this message's (its own retry), or
-- another message's: then nothing is written.
if reservation ~= "" and not redis.call("set", reservation, holder, "NX", "EX", ttl) then
    local current = redis.call("get", reservation)
    if current ~= holder then
        return {"duplicate", current}
    end
end
redis.call("publish", channel, "1")
redis.call("hset", messages, redis_id, data)
redis.call("rpush", queue, redis_id)
-- A delayed message coming due is moved, not copied: its delay-queue copy is acked in this same call (after the
-- commit point: were this refused, the message is on its queue and the copy comes back, as with two calls), so
-- no consumer can run it from the queue while the copy still counts on the delay queue. Dramatiq's own ack of
-- the copy, next, finds nothing to do.
if ARGV[6] ~= "" and redis.call("srem", KEYS[4], ARGV[6]) > 0 then
    redis.call("hdel", KEYS[5], ARGV[6])
end
return {"enqueued"}
"""

#: The tail of ENQUEUE_LUA the delivery ledger's pending record is inserted before (checked at import).
_ENQUEUE_COMMIT = b"""
end
return {"enqueued"}
"""

#: ENQUEUE_LUA plus the delivery ledger's `pending` record (whiskypay.ledger.LEDGER_PENDING_LUA), in the same
#: call: after the RPUSH (the commit point), under pcall, so a refused ledger write never turns an accepted enqueue
#: into an error; the reply then carries it: {"enqueued", "ledger: <error>"}. Extra ARGV[7..]: the record's
#: arguments (whiskypay.ledger.pending_args; its message is ARGV[2], the encoded message; its keys are built from
#: the ledger prefix it carries). Without them (no ledger, a worker's enqueue) it is ENQUEUE_LUA.
_ENQUEUE_COMMIT_WITH_LEDGER = b"""
end
if #ARGV > 6 then
    local ok, problem = pcall(ledger_pending, data, ARGV, 7)
    if not ok then
        return {"enqueued", "ledger: " .. tostring(type(problem) == "table" and problem.err or problem)}
    end
end
return {"enqueued"}
"""
ENQUEUE_WITH_LEDGER_LUA = LEDGER_PENDING_LUA.encode() + ENQUEUE_LUA.replace(
    _ENQUEUE_COMMIT, _ENQUEUE_COMMIT_WITH_LEDGER
)
assert ENQUEUE_WITH_LEDGER_LUA.count(b"pcall(ledger_pending, data") == 1, "ENQUEUE_LUA's commit tail changed"

#: Undo what a refused ENQUEUE_LUA call may have left: its reservation (only if it still names this message) and
#: the message's hash entry (not in the queue's list: the RPUSH is the last command).
#: KEYS[1] the reservation key or "", KEYS[2] <ns>:<queue>.msgs; ARGV[1] the holder, ARGV[2] the redis message id.
RELEASE_LUA = b"""
if KEYS[1] ~= "" and redis.call("get", KEYS[1]) == ARGV[1] then
    redis.call("del", KEYS[1])
end
redis.call("hdel", KEYS[2], ARGV[2])
return 1
"""

#: The message option through which a before_enqueue hook hands WhiskyPayRedisBroker a Reservation. The broker
#: takes it out before encoding the message, so it is never stored.
RESERVATION_OPTION = "whiskypay_reservation"


@dataclasses.dataclass(frozen=True)
class Reservation:
    """A key the enqueue call sets to the message id (with a TTL), unless another message's id is already there.

    Parameters:
      key: The Redis key (IdempotentEnqueue's is `keys.event_reservation`).
      ttl_s: How long the reservation lasts, in seconds.
      what: What is reserved, for the DuplicateEvent text ("send_callback: event_id 'pay_1'").
    """

    key: str
    ttl_s: int
    what: str


class QueueWaker:
    """One pub/sub subscriber per process that wakes idle consumers when their queue gets a message.

    Parameters:
      client: The broker's Redis client (the subscriber opens its own connection from its pool).
      namespace: The broker namespace, prefix of the wake channels.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.logger = get_logger(__name__, type(self))
        self.client = client
        self.namespace = namespace
        self._events: dict[str, set[threading.Event]] = {}
        self._handlers: dict[str, list[Callable[[bytes], None]]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def channel(self, queue_name: str) -> str:
        """Return the wake channel of queue_name."""
        return keys.wake_channel(self.namespace, queue_name)

    def register(self, queue_name: str, event: threading.Event) -> None:
        """Set event whenever a message is published to queue_name."""
        with self._lock:
            self._events.setdefault(self.channel(queue_name), set()).add(event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="whiskypay-waker", daemon=True)
                self._thread.start()
        self._changed.set()

    def listen(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Call handler(data) in the subscriber thread for every message published on channel.

        The handler must be quick and never block (it runs between wake-ups): the merchant breakers' local view
        uses it to hear "<state> M" announcements.
        """
        with self._lock:
            self._handlers.setdefault(channel, []).append(handler)
        self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="whiskypay-waker", daemon=True)
                self._thread.start()
        self._changed.set()

    def unregister(self, queue_name: str, event: threading.Event) -> None:
        """Stop waking event."""
        with self._lock:
            self._events.get(self.channel(queue_name), set()).discard(event)

    def stop(self) -> None:
        """Stop the subscriber thread."""
        self._stopped.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=3)

    def _run(self) -> None:
        pubsub: Any = None
        subscribed: set[str] = set()
        while not self._stopped.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    subscribed = set()
                if self._changed.is_set() or not subscribed:
                    self._changed.clear()
                    with self._lock:
                        wanted = set(self._events) | set(self._handlers)
                    if wanted - subscribed:
                        pubsub.subscribe(*(wanted - subscribed))
                        subscribed |= wanted
                    if not subscribed:
                        self._changed.wait(0.5)
                        continue
                message = pubsub.get_message(timeout=0.5)
                if message and message.get("type") == "message":
                    channel = keys.text(message["channel"])
                    with self._lock:
                        events = list(self._events.get(channel, ()))
                        handlers = list(self._handlers.get(channel, ()))
                    for event in events:
                        event.set()
                    for handler in handlers:
                        try:
                            handler(message["data"])
                        except Exception:  # a handler's bug must not stop the wake-ups
                            self.logger.exception("Pub/sub handler for %r failed.", channel)
            except (redis.RedisError, OSError, ValueError) as exc:
                # Redis restarting or unreachable: consumers fall back to polling until we are back.
                self.logger.debug("Wake-up subscriber lost Redis (%s); reconnecting.", type(exc).__name__)
                try:
                    if pubsub is not None:
                        pubsub.close()
                except (redis.RedisError, OSError):
                    pass
                pubsub = None
                self._stopped.wait(0.5)
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass


class WhiskyPayRedisBroker(RedisBroker):
    """RedisBroker with pub/sub wake-up, maintenance at least every interval, and poison dead-lettering.

    Parameters:
      maintenance_interval_ms: Run maintenance for each queue at least this often, in milliseconds.
      max_message_bytes: The largest encoded message a producer may enqueue (`InvalidPayload` otherwise).
      min_replica_acks: A producer's enqueue waits until this many replicas have it (`NotReplicated` otherwise).
      replica_ack_timeout_ms: The longest that wait lasts, in milliseconds (keep it under the socket timeout).
      replay_rate: The most replays per second its consumers move from a queue's replay lane onto the queue.
      **kwargs: RedisBroker's (client, namespace, heartbeat_timeout, dead_message_ttl, middleware...).
    """

    def __init__(
        self, *, maintenance_interval_ms: int = 10_000, max_message_bytes: int | None = None,
        min_replica_acks: int = 0, replica_ack_timeout_ms: int = 1_000, replay_rate: float = DEFAULT_REPLAY_RATE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.maintenance_interval_ms = maintenance_interval_ms
        self.max_message_bytes = max_message_bytes
        self.min_replica_acks = min_replica_acks
        self.replica_ack_timeout_ms = replica_ack_timeout_ms
        self.enqueue_waits_for_redis = False
        self._last_maintenance: dict[str, int] = {}
        #: The middleware list _enqueue_hooks_cache was built from, and the enqueue hooks' middleware it found.
        self._enqueue_hooks_of: tuple[Middleware, ...] = ()
        self._enqueue_hooks_cache: tuple[list[Middleware], list[Middleware]] = ([], [])
        #: Per queue name: its list, its messages hash and its wake channel, encoded (see _enqueue_keys_args).
        self._queue_names: dict[str, tuple[bytes, bytes, bytes]] = {}
        self.waker = QueueWaker(self.client, self.namespace)
        # do_enqueue runs ENQUEUE_LUA; dispatch's own enqueue still publishes for any other caller of it.
        self.scripts["dispatch"] = self.client.register_script(_scripts["dispatch"] + keys.WAKE_ON_ENQUEUE_LUA)
        self.scripts["whiskypay_enqueue"] = self.client.register_script(ENQUEUE_WITH_LEDGER_LUA)
        self.lane = LanePromoter(self.client, self.namespace, rate=replay_rate)
        self.scripts["whiskypay_release"] = self.client.register_script(RELEASE_LUA)
        #: Set once a Redis configuration error made this worker stop taking messages (see `halt`).
        self.halted = threading.Event()
        #: What halted it, for the health checks ("Redis refused ...: NoPermissionError ..."); "" while it runs.
        self.halt_reason = ""
        self._halt_lock = threading.Lock()
        #: Ids of messages whose retry, deferral or delayed move could not be written: never acked nor nacked.
        self._held: set[str] = set()
        #: Sends a worker process's acks (and the ledger's attempt records) in batches; started by `consume`.
        self.settler = Settler(self)

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _WakingConsumer

    def close(self) -> None:
        self.settler.stop()
        self.waker.stop()
        super().close()

    def _maintenance_due(self, command: str, queue_name: str) -> int:
        if command in _NO_MAINTENANCE:
            return 0
        now = current_millis()
        if now - self._last_maintenance.get(queue_name, 0) >= self.maintenance_interval_ms:
            self._last_maintenance[queue_name] = now
            return 1
        return int(self._should_do_maintenance(command))

    def _args(self, command: str, queue_name: str, *args: Any) -> list[Any]:
        return [
            command,
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            self._maintenance_due(command, queue_name),
            self._max_unpack_size(),  # type: ignore[no-untyped-call]
            *args,
        ]

    def _dispatch(self, command: str) -> Any:
        dispatch = self.scripts["dispatch"]
        keys = [self.namespace]

        def do_dispatch(queue_name: str, *args: Any) -> Any:
            return dispatch(args=self._args(command, queue_name, *args), keys=keys)

        return do_dispatch

    def _enqueue_hooks(self) -> tuple[list[Middleware], list[Middleware]]:
        """Return the middleware that define before_enqueue, and (in reverse order) those that define after_enqueue."""
        if self._enqueue_hooks_of != tuple(self.middleware):
            self._enqueue_hooks_of = tuple(self.middleware)

            def defines(middleware: Middleware, name: str) -> bool:
                return name in vars(middleware) or getattr(type(middleware), name) is not getattr(Middleware, name)

            self._enqueue_hooks_cache = (
                [m for m in self.middleware if defines(m, "before_enqueue")],
                [m for m in reversed(self.middleware) if defines(m, "after_enqueue")],
            )
        return self._enqueue_hooks_cache

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        # Every send() runs the enqueue hooks; most middleware do not define them (4 of the 20 do), and calling
        # Middleware's empty ones is about a fifth of what the hooks cost. Same contract as Broker.emit_before.
        if signal != "enqueue":
            return super().emit_before(signal, *args, **kwargs)
        for middleware in self._enqueue_hooks()[0]:
            try:
                middleware.before_enqueue(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in before_enqueue of %r.", middleware, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if signal != "enqueue":
            return super().emit_after(signal, *args, **kwargs)
        for middleware in self._enqueue_hooks()[1]:
            try:
                middleware.after_enqueue(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in after_enqueue of %r.", middleware, exc_info=True)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        # Only worker processes consume: from here on this process's enqueues are retries and delayed
        # messages coming due, which must wait out a Redis outage rather than fail (see do_enqueue).
        self.enqueue_waits_for_redis = True
        self.settler.start()
        return super().consume(queue_name, prefetch, timeout)

    @staticmethod
    def reserve_on_enqueue(message: Message[Any], reservation: Reservation) -> None:
        """From a before_enqueue hook: make this enqueue's own Lua call take reservation (see ENQUEUE_LUA)."""
        message.options[RESERVATION_OPTION] = reservation

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Enqueue message (Dramatiq's RedisBroker.enqueue, step for step), passing its Reservation to do_enqueue.

        Raises DuplicateEvent if another message holds its reservation, InvalidPayload for an oversized message,
        and the redis-py error (after undoing any partial write) if Redis refuses it.
        """
        queue_name = message.queue_name
        moved_from = self._delay_copy_of(message, delay)
        message = message.copy(options={"redis_message_id": str(uuid4())})
        if delay is not None:
            queue_name = dq_name(queue_name)
            message = message.copy(queue_name=queue_name, options={"eta": current_millis() + delay})
        self.logger.debug("Enqueueing message %r on queue %r.", message.message_id, queue_name)
        self.emit_before("enqueue", message, delay)
        reservation = message.options.pop(RESERVATION_OPTION, None)
        try:
            self.do_enqueue(
                queue_name, message.options["redis_message_id"], message.encode(),
                holder=message.message_id, reservation=reservation, moved_from=moved_from,
            )
        except redis.RedisError as exc:
            if self.enqueue_waits_for_redis:
                # A worker: do_enqueue waited out transient errors, so this one is a configuration error. The
                # message this enqueue carries (a retry, a deferral, a delayed move) must not be acked or nacked:
                # it stays in this worker's acks and comes back when the worker restarts.
                self._held.add(message.message_id)
                self.halt(exc, what=f"enqueuing message {message.message_id} on {queue_name!r}")
            raise
        self.emit_after("enqueue", message, delay)
        return message

    def _delay_copy_of(self, message: Message[Any], delay: int | None) -> str | None:
        """Return the redis id of message's delay-queue copy when this enqueue is that message coming due.

        Dramatiq's worker moves a due message by enqueuing a copy (no delay, no eta, on the canonical queue,
        carrying the redis id of the copy this worker fetched from Q.DQ) and then acking the delay-queue copy.
        Done in two calls, another consumer, woken at once by the publish, could run the message in between while
        the original still counts on the delay queue (Dramatiq's test_redis_join_race_condition), and a crash in
        between would run it twice. ENQUEUE_LUA acks that copy in the same call instead.
        """
        if delay is not None or not self.enqueue_waits_for_redis or "eta" in message.options:
            return None
        if q_name(message.queue_name) != message.queue_name:
            return None
        redis_id = message.options.get("redis_message_id")
        return redis_id if isinstance(redis_id, str) and redis_id else None

    def do_enqueue(
        self, queue_name: str, message_id: str, data: bytes, *, holder: str = "",
        reservation: Reservation | None = None, moved_from: str | None = None,
    ) -> None:
        """Run ENQUEUE_LUA once; in a worker, wait out transient Redis errors (a retry must not be lost).

        In the gateway a failure raises at once (send() must answer within the Redis timeout), after undoing what
        a refused call left (RELEASE_LUA): no reservation outlives a failed enqueue. A lost reply (a timeout, a
        dropped connection) is not undone: then the call either never ran or ran whole, and a reservation left
        behind belongs to a message that is in the queue. In a worker process the enqueue is a retry being
        scheduled or a delayed message coming due, and the message it carries is about to be acked: giving up
        would lose it. So it waits (up to a second between tries) until Redis accepts it.

        Parameters:
          queue_name, message_id, data: As Dramatiq's (message_id is the redis message id).
          holder: The message id (stable across retries), the reservation's holder.
          reservation: Taken in the same call, or DuplicateEvent is raised and nothing is written.
          moved_from: The redis id of the delay-queue copy this enqueue moves (acked in the same call), or None.
        """
        if self.max_message_bytes and not self.enqueue_waits_for_redis and len(data) > self.max_message_bytes:
            # Producers only: a worker re-enqueuing a retry must never drop it for its size.
            raise InvalidPayload(
                f"{q_name(queue_name)}: the message is {len(data)} bytes, over the {self.max_message_bytes}-byte "
                "limit (WHISKYPAY_MAX_MESSAGE_BYTES). Nothing was enqueued."
            )
        names, args = self._enqueue_keys_args(queue_name, message_id, data, holder, reservation, moved_from)
        try:
            if self.enqueue_waits_for_redis:
                reply = call_through_transient(
                    lambda: self._enqueue_once(queue_name, names, args),
                    what=f"enqueuing message {holder or message_id} on {queue_name!r}", logger=self.logger,
                )
            else:
                reply = self._enqueue_once(queue_name, names, args)
        except redis.ResponseError as exc:
            # An error reply: the script stopped before its RPUSH. A transient one (OOM, READONLY, BUSY) came
            # before any write; a configuration one may follow the reservation and the HSET. In a worker the
            # reservation stays with the message (held for redelivery); elsewhere it goes, so the caller's retry
            # is not taken for a duplicate.
            if classify_redis_error(exc) == "configuration":
                self._undo_enqueue(names, holder, message_id, release=not self.enqueue_waits_for_redis)
            raise
        if keys.text(reply[0]) == "duplicate":
            assert reservation is not None
            first = keys.text(reply[1])
            raise DuplicateEvent(f"{reservation.what} was already enqueued (message {first})", holder=first)
        if len(reply) > 1:  # enqueued; the ledger's pending record was refused (a full Redis, say)
            self.logger.warning("Message %s is enqueued but not entered in the delivery ledger (%s).",
                                holder or message_id, keys.text(reply[1])[:200])

    def _enqueue_keys_args(
        self, queue_name: str, message_id: str, data: bytes, holder: str, reservation: Reservation | None,
        moved_from: str | None = None,
    ) -> tuple[list[str], list[Any]]:
        """Return ENQUEUE_LUA's KEYS and ARGV (documented with the script)."""
        moving = moved_from is not None and not queue_name.endswith(".DQ")
        queue_names = self._queue_names.get(queue_name)
        if queue_names is None:
            # Encoded once per queue: redis-py passes bytes through, where it type-checks and encodes a str.
            queue_names = self._queue_names[queue_name] = (
                keys.queue(self.namespace, queue_name).encode(), keys.messages(self.namespace, queue_name).encode(),
                self.waker.channel(queue_name).encode(),
            )
        names: list[Any] = [
            queue_names[0],
            queue_names[1],
            reservation.key if reservation else "",
            keys.acks(self.namespace, self.broker_id, dq_name(queue_name)) if moving else "",
            keys.messages(self.namespace, dq_name(queue_name)) if moving else "",
        ]
        args: list[Any] = [
            message_id, data, holder, reservation.ttl_s if reservation else 0, queue_names[2],
            moved_from if moving else "",
        ]
        pending = take_pending(message_id)  # the delivery ledger's, staged by DeliveryLedger.before_enqueue
        if pending is not None:
            args += pending
        if not moving:
            del names[3:]  # KEYS[4] and KEYS[5] are read only for a move: fewer arguments to pack
        return names, args

    def _enqueue_once(self, queue_name: str, names: list[str], args: list[Any]) -> Any:
        return self.call_enqueue_script(self.scripts["whiskypay_enqueue"], keys=names, args=args, queue_name=queue_name)

    def call_enqueue_script(self, script: Script, *, keys: list[Any], args: list[Any], queue_name: str) -> Any:
        """Run the enqueue script; for a producer with min_replica_acks, then WAIT on the same connection.

        Both go in one pipeline (one connection, one round trip): WAIT counts the writes of the connection it runs
        on. Raises NotReplicated when fewer replicas than min_replica_acks confirmed within replica_ack_timeout_ms.
        """
        if not self.min_replica_acks or self.enqueue_waits_for_redis:
            return script(keys=keys, args=args)
        reply: Any = None
        acks: Any = 0
        for attempt in (1, 2):
            with self.client.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.min_replica_acks, self.replica_ack_timeout_ms)
                try:
                    reply, acks = pipe.execute()
                    break
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    self.client.script_load(script.script)  # a restarted or new primary: load it, then once more
        self._check_acks(int(acks), queue_name)
        return reply

    def confirm_replicated(self, queue_name: str) -> None:
        """For a producer's duplicate send: return once min_replica_acks replicas have everything written so far.

        The first send of an event may have raised NotReplicated; its retry finds the reservation and enqueues
        nothing, but must not report success before a replica has that first message either. WAIT counts the
        writes of its own connection, so a write goes first on the same one: the queue's wake-up PUBLISH (it is
        replicated, and an idle consumer woken by it just polls once).
        """
        if not self.min_replica_acks or self.enqueue_waits_for_redis:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.publish(self.waker.channel(q_name(queue_name)), "1")
                pipe.execute_command("WAIT", self.min_replica_acks, self.replica_ack_timeout_ms)
                _, acks = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise NotReplicated(
                f"{q_name(queue_name)}: this event_id was already enqueued, but Redis could not confirm that "
                f"{self.min_replica_acks} replica(s) have it ({type(exc).__name__}); send it again later."
            ) from None
        self._check_acks(int(acks), queue_name)

    def _check_acks(self, acks: int, queue_name: str) -> None:
        if acks < self.min_replica_acks:
            raise NotReplicated(
                f"{q_name(queue_name)}: the job may still have been accepted: the primary took it, but only "
                f"{acks} of {self.min_replica_acks} replica(s) (WHISKYPAY_REDIS_MIN_REPLICA_ACKS) confirmed it "
                f"within {self.replica_ack_timeout_ms} ms. Send it again with the same event_id (its reservation "
                "is kept, so that cannot enqueue it twice); without an event_id a second send may deliver it twice."
            )

    def _undo_enqueue(self, names: list[str], holder: str, message_id: str, *, release: bool) -> None:
        try:
            self.scripts["whiskypay_release"](keys=[names[2] if release else "", names[1]], args=[holder, message_id])
        except redis.RedisError as exc:
            self.logger.warning("Could not undo a refused enqueue on %r (%s).", keys.text(names[0]), describe(exc))

    def halt(self, exc: BaseException, *, what: str) -> None:
        """Stop taking messages after a Redis configuration error; report it (Sentry and the log) once.

        Consumers stop fetching (they keep the worker's heartbeat, so no other worker takes over the messages this
        one holds while it may still be working on them); acks and nacks of messages already taken go on. The
        worker's liveness file carries halt_reason, so its readiness check (/readyz, `whiskypay health --worker`)
        fails with it.
        """
        with self._halt_lock:
            first = not self.halted.is_set()
            if first:
                self.halt_reason = f"Redis refused {what} ({describe(exc)})"
            self.halted.set()
        if first:
            report_configuration_error(
                exc, what=what, logger=self.logger,
                consequence="this worker stopped taking messages; the ones it holds come back when it is restarted",
            )
        else:
            self.logger.error("Redis refused %s (%s); this worker has stopped taking messages.", what, describe(exc))

    def is_held(self, message: MessageProxy) -> bool:
        """Return True (once) if message's retry could not be written, so it must be neither acked nor nacked."""
        if message.message_id in self._held:
            self._held.discard(message.message_id)
            return True
        return False

    def dead_letter_undecodable(self, queue_name: str, data: bytes, reason: str) -> bool:
        """Replace an undecodable message held by this broker's consumer with a placeholder and dead-letter it.

        Returns False if the message could not be found among this worker's unacked messages.
        """
        acks = keys.acks(self.namespace, self.broker_id, queue_name)
        messages = keys.messages(self.namespace, queue_name)
        for raw_id in self.client.smembers(acks):
            if self.client.hget(messages, raw_id) == data:
                redis_id = keys.text(raw_id)
                exception = DecodeError(reason, b"", None)
                placeholder: Message[Any] = Message(
                    queue_name=q_name(queue_name),
                    actor_name=UNDECODABLE_ACTOR,
                    args=(),
                    kwargs={},
                    options={
                        "redis_message_id": redis_id,
                        **failure_options(exception),
                        # Its bytes may hold a buyer's address or a callback URL's token: they are kept only as
                        # masked text, with a digest to tell copies apart.
                        "raw_sample": masked_sample(data[:POISON_SAMPLE_BYTES]),
                        "raw_sha256": hashlib.sha256(data).hexdigest(),
                        "raw_size": len(data),
                    },
                )
                what = f"dead-lettering undecodable message {redis_id} on {queue_name!r}"
                encoded = placeholder.encode()
                call_through_transient(partial(self.client.hset, messages, redis_id, encoded), what=what,
                                       logger=self.logger)
                proxy = MessageProxy(placeholder)
                proxy.fail()
                proxy.stuff_exception(exception)
                # The nack hooks report it (Sentry) and store its reason, as for any other dead letter.
                self.emit_before("nack", proxy)
                call_through_transient(partial(self.do_nack, queue_name, redis_id), what=what, logger=self.logger)
                self.emit_after("nack", proxy)
                return True
        return False


class _WakingConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer that waits on a wake-up event instead of sleeping, and survives poison."""

    def __init__(self, broker: WhiskyPayRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self.wake = threading.Event()
        #: Fetches refused in a row (transient Redis errors), to log the first and then every LOG_EVERY-th.
        self.refusals = 0
        #: When the last fetch was sent (time.monotonic()), and how many free slots make a fetch worth it.
        self._last_fetch = 0.0
        self._refill_batch = max(1, prefetch // 4)
        self._is_delay_queue = queue_name.endswith(".DQ")
        broker.waker.register(queue_name, self.wake)

    def _refill_later(self) -> bool:
        """Return True when a fetch now would take only a few slots while every thread still has work queued.

        Stock Dramatiq fetches a whole window's free slots after a sleep; this consumer is woken by every ack, so
        fetching at once would cost a Redis round trip per message. It fetches when a quarter of the window is
        free, or when at most half of it is taken (with the default window of twice the threads, a thread may
        then be idle), or when the last fetch is a worker timeout old (the heartbeat and the lane are served at
        that pace anyway). A delay queue (its window is a thousand per thread) is left as it was.
        """
        if self._is_delay_queue:
            return False
        outstanding, prefetch = int(self.outstanding_message_count), int(self.prefetch)
        if prefetch - outstanding >= self._refill_batch or outstanding <= prefetch // 2:
            return False
        return time.monotonic() - self._last_fetch < int(self.timeout) / 1000

    def ack(self, message: MessageProxy) -> None:
        broker = self.broker
        assert isinstance(broker, WhiskyPayRedisBroker)
        if not broker.settler.running:
            self._settle("ack", message)
        elif broker.is_held(message):
            self.logger.error("Not acknowledging message %s on %r: its retry could not be written, so it stays with "
                              "this worker and comes back when the worker is restarted.", message.message_id,
                              self.queue_name)
            self.settled(message)
        else:
            # The process's Settler sends it with the other acks and ledger records of its next round (see
            # whiskypay.settler). Its slot in the prefetch window is free at once: held until the round, a window of
            # two (one thread) stood empty for the 5 ms gather after every message (598 -> 198 msg/s). Acks that wait
            # cannot pile up: a Redis that refuses them refuses fetches too (or halts this worker: NOPERM).
            broker.settler.ack(self, message)
            self.settled(message)

    def settled(self, message: MessageProxy) -> None:
        """Forget message (acked, nacked or left to a restart): its slot in the prefetch window is free."""
        self.queued_message_ids.discard(message.message_id)
        self.wake.set()

    def nack(self, message: MessageProxy) -> None:
        self._settle("nack", message)

    def _settle(self, command: str, message: MessageProxy) -> None:
        """Ack or nack message, waiting out transient Redis errors; leave it unacknowledged on any other.

        Stock Dramatiq retries only on a lost connection: an error reply (OOM, READONLY) is logged as a bug and
        the message stays in this worker's acks, neither done nor dead-lettered, until the worker restarts.
        """
        broker = self.broker
        assert isinstance(broker, WhiskyPayRedisBroker)
        what = f"{'acknowledging' if command == 'ack' else 'dead-lettering'} message {message.message_id} " \
               f"on {self.queue_name!r}"
        try:
            if broker.is_held(message):
                self.logger.error("Not %s: its retry could not be written, so it stays with this worker and comes "
                                  "back when the worker is restarted.", what)
                return
            dispatch = broker.do_ack if command == "ack" else broker.do_nack
            redis_id = message.options["redis_message_id"]
            call_through_transient(lambda: dispatch(self.queue_name, redis_id), what=what, logger=self.logger)
        except redis.RedisError as exc:
            broker.halt(exc, what=what)  # it stays in this worker's acks: redelivered after a restart
        finally:
            self.settled(message)

    def close(self) -> None:
        # Stock Dramatiq leaves messages fetched but not yet handed out (the rest of a prefetch batch) in this
        # worker's acks when it shuts down: they come back only when maintenance declares the worker dead.
        # Hand them back now, so a SIGTERMed worker's prefetched messages are picked up at once. First its acks
        # still queued in the Settler go out (worker threads have stopped by now).
        broker = self.broker
        assert isinstance(broker, WhiskyPayRedisBroker)
        if not broker.settler.flush(self):
            self.logger.warning("Redis did not take the last acks of %r before shutdown; those messages come back "
                                "when maintenance finds this worker gone.", self.queue_name)
        try:
            ids = []
            for data in self.message_cache:
                try:
                    ids.append(Message.decode(data).options["redis_message_id"])
                except (DecodeError, KeyError, TypeError):
                    continue  # maintenance brings it back, and the next worker dead-letters it
            self.message_cache = []
            if ids:
                self.broker.do_requeue(self.queue_name, *ids)
        except redis.RedisError:
            pass  # Redis is gone: maintenance requeues them once this worker's heartbeat stops
        finally:
            self.broker.waker.unregister(self.queue_name, self.wake)
            super().close()

    def _promote_replays(self, room: int) -> tuple[int, int]:
        """Move up to room replays from this queue's lane onto it; return (moved, ms until the lane's next token).

        A delay queue has no lane. A Redis error is the fetch's (the caller's handler waits out a transient one
        and halts on a configuration one).
        """
        if self.queue_name.endswith(".DQ"):
            return 0, 0
        moved, wait_ms = self.broker.lane.promote(self.queue_name, room, now_ms=current_millis())
        return int(moved), int(wait_ms)

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                try:
                    data = self.message_cache.pop(0)
                except IndexError:
                    if self.broker.halted.is_set():
                        # A configuration error stopped this worker: take nothing more, but keep the heartbeat
                        # (a fetch of none), so the messages it holds are not handed to another worker meanwhile.
                        self.broker.do_fetch(self.queue_name, 0)
                        self.wake.wait(self.timeout / 1000)
                        return None
                    self.wake.clear()  # before the fetch: a publish that lands after it is not missed
                    messages = []
                    if self._refill_later():
                        # Enough fetched messages are still waiting for a thread: let acks free a batch of slots
                        # (each ack wakes us) rather than fetch one message per ack.
                        self.wake.wait(max(0.001, self._last_fetch + self.timeout / 1000 - time.monotonic()))
                        return None
                    if self.outstanding_message_count < self.prefetch:
                        self._last_fetch = time.monotonic()
                        self.message_cache = messages = self.broker.do_fetch(
                            self.queue_name, self.prefetch - self.outstanding_message_count
                        )
                    self.refusals = 0
                    wait_ms = self.timeout
                    # Replays take at most half the prefetch window (one per worker thread), so a new payment
                    # always finds room to be fetched at once and at most one round of replays ahead of it.
                    room = max(1, self.prefetch // 2) - self.outstanding_message_count
                    if not messages and room > 0:
                        # The queue is empty: serve the replay lane (whiskypay.replay), paced.
                        moved, next_token_ms = self._promote_replays(room)
                        if moved:
                            continue
                        if next_token_ms > 0:
                            wait_ms = min(wait_ms, next_token_ms)
                    if not messages:
                        # Waiting the whole timeout is safe: enqueues and acks wake us, so the progressive
                        # backoff Dramatiq uses to notice new messages soon is not needed.
                        self.misses, _ = compute_backoff(self.misses, max_backoff=self.timeout)
                        self.wake.wait(wait_ms / 1000)
                        return None
                    continue
                if data is None:
                    continue
                self.misses = 0
                try:
                    message = Message.decode(data)
                except DecodeError as exc:
                    reason = f"{type(exc.__cause__ or exc).__name__}: {str(exc.__cause__ or exc)[:200]}"
                    self.logger.error("Dead-lettering an undecodable message on %r (%s).", self.queue_name, reason)
                    self.broker.dead_letter_undecodable(self.queue_name, data, reason)
                    continue
                self.queued_message_ids.add(message.message_id)
                return MessageProxy(message)
        except redis.RedisError as exc:
            # Stock Dramatiq raises ConnectionClosed here (or restarts the consumer on an error reply), and its
            # consumer thread then throws away the retries it holds in memory while their acks stay with this
            # (alive) worker: maintenance never requeues them. Waiting out the outage instead keeps them; redis-py
            # reconnects on the next call. A configuration error stops taking messages instead (see halt).
            if classify_redis_error(exc) == "transient":
                self.refusals += 1
                if self.refusals % LOG_EVERY == 1:  # the first, then every LOG_EVERY-th: a poll every timeout
                    self.logger.warning("Redis refused a fetch on %r (%s); retrying.", self.queue_name, describe(exc))
            elif not self.broker.halted.is_set():
                self.broker.halt(exc, what=f"fetching messages from {self.queue_name!r}")
            self.wake.wait(self.timeout / 1000)
            return None
