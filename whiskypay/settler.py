"""Settler: one thread per worker process that acknowledges finished messages, and writes the delivery ledger's
attempt records, in one script call per round.

Stock Dramatiq acks each message with its own round trip from the worker thread that ran it, and our ledger
wrote each attempt's record in another (batched by its own thread): on a 2-core machine shared with Redis, the
round trips were about a third of a worker's Python time per webhook (BENCHMARKS.md). Here a worker thread hands
its ack to this process's Settler and goes on to its next message; the Settler gathers what arrives for a few
milliseconds (GATHER_S) and sends every ack, of every queue, with the ledger records ready by then, in one call
of SETTLE_LUA.

What that keeps:
- A message is acked only after its actor and every after-hook ran (the ack is handed over where Dramatiq would
  send it). Its prefetch slot is free at once (a window of two, one thread's, would otherwise stand empty through
  every gather); waiting acks cannot pile up, as a Redis that refuses them refuses fetches too, or halts the worker.
- Redis errors: a transient one (OOM, READONLY, BUSY, LOADING, a lost connection) is waited out and the round is
  sent again (an ack is idempotent: SREM, then HDEL only if the SREM removed it); a configuration one (NOPERM,
  WRONGTYPE) halts the worker (`WhiskyPayRedisBroker.halt`): its unacked messages stay in its ack set and come back
  after a restart, as with a synchronous ack. The ledger records follow the ledger's own policy (`Rider`).
- A consumer that closes (a graceful shutdown: worker threads have stopped by then) waits for its acks to reach
  Redis first (`flush`).

What it costs: a SIGKILLed worker loses the acks of the last few milliseconds (at most GATHER_S plus a round
trip): those messages are redelivered once maintenance finds the worker dead, as any message a worker held when
it was killed (at-least-once delivery; an email's sent marker still prevents a second email).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

import redis
from dramatiq.common import current_millis
from dramatiq.logging import get_logger

from whiskypay import keys
from whiskypay.ledger import LEDGER_RECORDS_LUA
from whiskypay.redis_errors import LOG_EVERY, MAX_WAIT_S, classify_redis_error, describe

if TYPE_CHECKING:
    from dramatiq.broker import MessageProxy

    from whiskypay.ledger import LedgerOp
    from whiskypay.redis_broker import WhiskyPayRedisBroker, _WakingConsumer

#: How long a round lets acks and records gather before it is sent, in seconds.
GATHER_S = 0.005

#: The most acks one round carries (a round blocks Redis for about 1 us per ack).
ACK_BATCH_MAX = 1000

#: The most ledger records one round carries (about 16 us of Redis each: a round blocks Redis 2 ms at most).
RECORD_BATCH_MAX = 100

#: How long a closing consumer waits for its acks to reach Redis, in seconds.
FLUSH_TIMEOUT_S = 10.0

#: One round. ARGV[1] the heartbeats zset, ARGV[2] this worker's id, ARGV[3] now (unix ms), ARGV[4] the ledger's
#: key prefix, ARGV[5] how many ack groups follow; each group: a queue's ack set, its messages hash, the count n,
#: then n redis message ids; then the ledger records, three ARGV each (see whiskypay.ledger.LEDGER_RECORDS_LUA).
#: The acks come first: deletions are allowed when Redis is out of memory, and a refused heartbeat or record
#: (pcall) never fails them. Returns {acked count, one reply per record ("error: ..." for a refused one)}.
SETTLE_LUA = LEDGER_RECORDS_LUA + """
local i, acked = 6, 0
for _ = 1, tonumber(ARGV[5]) do
    local acks, messages, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    for j = i + 3, i + 2 + n do
        if redis.call("srem", acks, ARGV[j]) > 0 then
            redis.call("hdel", messages, ARGV[j])
            acked = acked + 1
        end
    end
    i = i + 3 + n
end
pcall(redis.call, "zadd", ARGV[1], ARGV[3], ARGV[2])
return ledger_records(ARGV[4], ARGV, i, {acked})
"""


class Rider(Protocol):
    """Work that rides along with the acks (the delivery ledger's attempt records, `middleware.ledger`)."""

    def has_work(self) -> bool:
        """Return True when records are waiting."""

    def take(self, most: int) -> list[LedgerOp]:
        """Remove and return up to most records for this round."""

    def settled(self, batch: list[LedgerOp], replies: list[Any]) -> object:
        """Redis ran the round: one reply per record of batch (text starting "error: " for a refused one)."""

    def refused(self, batch: list[LedgerOp], exc: BaseException) -> None:
        """Redis refused the whole round (exc); none of batch was written."""


class Settler:
    """Acknowledge this worker process's finished messages, with the ledger's records, in batches (see the module).

    Parameters:
      broker: The broker whose consumers' acks it sends.
      gather_s: How long a round gathers before it is sent, in seconds.
      sleep: Injected for tests.
    """

    def __init__(
        self, broker: WhiskyPayRedisBroker, *, gather_s: float = GATHER_S, sleep: Any = time.sleep
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.gather_s = gather_s
        self.sleep = sleep
        self.script = broker.client.register_script(SETTLE_LUA)
        self._cond = threading.Condition()
        self._acks: list[tuple[_WakingConsumer, MessageProxy]] = []
        self._in_round = False
        self._rider: Rider | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        """True while the thread runs (from the first consumer of a worker process until `stop`)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._cond:
            if self.running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="whiskypay-settler", daemon=True)
            self._thread.start()

    def attach(self, rider: Rider) -> None:
        """Send rider's records with the acks (one rider: the delivery ledger)."""
        with self._cond:
            self._rider = rider
            self._cond.notify()

    def detach(self, rider: Rider) -> None:
        """Stop sending rider's records (its remaining ones stay with it)."""
        with self._cond:
            if self._rider is rider:
                self._rider = None

    def ack(self, consumer: _WakingConsumer, message: MessageProxy) -> None:
        """Queue message's ack; the thread sends it with the next round."""
        with self._cond:
            self._acks.append((consumer, message))
            if len(self._acks) == 1:
                self._cond.notify()

    def wake(self) -> None:
        """Tell the thread the rider has records waiting."""
        with self._cond:
            self._cond.notify()

    def flush(self, consumer: _WakingConsumer | None = None, *, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until consumer's queued acks (every consumer's, without one) reached Redis; False on timeout.

        Without the thread (it was never started, or stopped), the caller sends them itself.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.running:
                waiting = any(consumer is None or queued is consumer for queued, _ in self._acks)
                if not waiting and not self._in_round:
                    return True
                self._cond.notify()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        while True:
            with self._cond:
                batch = [item for item in self._acks if consumer is None or item[0] is consumer]
                if not batch:
                    return True
                self._acks = [item for item in self._acks if item not in batch]
            if not self._round(batch, deadline=deadline):
                return False

    def stop(self) -> None:
        """Send what is queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=FLUSH_TIMEOUT_S)
        with self._cond:
            self._thread = None

    def _has_work(self) -> bool:
        return bool(self._acks) or (self._rider is not None and self._rider.has_work())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_work() and not self._stopping:
                    self._cond.wait()
                if not self._has_work():
                    return  # stopping, nothing left
                # Let the acks and records finishing meanwhile join this round: one call for all of them. The
                # whole gather_s, whatever wakes the thread meanwhile (short rounds back to back cost more).
                gathered = time.monotonic() + self.gather_s
                while not self._stopping and (left := gathered - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, self._acks = self._acks[:ACK_BATCH_MAX], self._acks[ACK_BATCH_MAX:]
                self._in_round = True
            try:
                self._round(batch, deadline=None)
            except Exception:  # a bug here must not stop every later ack
                self.logger.exception("Settling %d ack(s) failed unexpectedly.", len(batch))
            finally:
                with self._cond:
                    self._in_round = False
                    self._cond.notify_all()

    def _args(self, batch: list[tuple[_WakingConsumer, MessageProxy]], records: list[LedgerOp]) -> list[Any]:
        broker = self.broker
        namespace = broker.namespace
        groups: dict[str, list[str]] = {}
        for consumer, message in batch:
            groups.setdefault(consumer.queue_name, []).append(message.options["redis_message_id"])
        prefix = records[0].op["prefix"] if records else ""
        args: list[Any] = [keys.heartbeats(namespace), broker.broker_id, current_millis(), prefix, len(groups)]
        for queue_name, ids in groups.items():
            args += [keys.acks(namespace, broker.broker_id, queue_name), keys.messages(namespace, queue_name),
                     len(ids), *ids]
        for record in records:
            core, _, ids_json = record.args()
            args += [record.op["pid"], core, ids_json]
        return args

    def _round(self, batch: list[tuple[_WakingConsumer, MessageProxy]], *, deadline: float | None) -> bool:
        """Send batch's acks with the rider's ready records; wait out transient errors (until deadline, if any).

        Returns False when the deadline passed first (the acks were not sent).
        """
        broker = self.broker
        rider = self._rider
        failures = 0
        while True:
            records = rider.take(RECORD_BATCH_MAX) if rider is not None else []
            if not batch and not records:
                return True
            try:
                replies = self.script(args=self._args(batch, records))
            except (redis.RedisError, OSError) as exc:
                if rider is not None and records:
                    rider.refused(records, exc)
                if classify_redis_error(exc) != "transient":
                    if batch:
                        # The messages stay in this worker's ack set: redelivered after a restart.
                        broker.halt(exc, what=f"acknowledging {len(batch)} message(s)")
                    return True
                failures += 1
                if failures == 1 or failures % LOG_EVERY == 0:
                    self.logger.warning("Redis refused acknowledging %d message(s) (%s); retrying until it "
                                        "accepts them.", len(batch), describe(exc))
                wait = min(0.05 * 2 ** min(failures, 10), MAX_WAIT_S)
                if deadline is not None and time.monotonic() + wait > deadline:
                    return False
                self.sleep(wait)
                continue
            if failures:
                self.logger.info("Redis accepted acknowledging %d message(s) after %d refusal(s).", len(batch),
                                 failures)
            if rider is not None and records:
                rider.settled(records, [keys.text(r) if isinstance(r, bytes) else r for r in replies[1:]])
            return True
