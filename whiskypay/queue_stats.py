"""Per-queue counts read straight from the Redis broker's keys: waiting, delayed, in flight, dead-lettered.

It reads Dramatiq's key layout (drawn in `whiskypay.keys`). Workers prefetch: "in flight" counts messages
being processed *and* those held in a worker's memory; and a worker holds every delayed message it fetched
until it is due, so most delayed messages live in ns:__acks__.W.Q.DQ rather than in ns:Q.DQ. Both are counted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis
from dramatiq.common import dq_name

from whiskypay import keys


@dataclass(frozen=True)
class QueueCounts:
    """A snapshot of one queue.

    Parameters:
      queue: The queue name (without the .DQ/.XQ suffixes).
      waiting: Messages ready to run, not fetched by any worker yet.
      delayed: Messages waiting out a delay (a retry's backoff), fetched or not.
      in_flight: Messages fetched from the queue by a worker and not acked yet (running or prefetched).
      dead_letters: Dead-lettered messages kept in ns:Q.XQ.
      oldest_wait_ms: How long the next waiting message has been ready, in milliseconds; None if none waits.
    """

    queue: str
    waiting: int
    delayed: int
    in_flight: int
    dead_letters: int
    oldest_wait_ms: int | None


def ready_since_ms(encoded: bytes | str) -> int | None:
    """Return when an encoded message became ready to run (unix ms): its `eta` if it was delayed, else its creation.

    Parameters:
      encoded: The message as stored in ns:Q.msgs (Dramatiq's JSON encoding).
    """
    try:
        data = json.loads(encoded)
        created = int(data.get("message_timestamp") or 0)
        eta = int((data.get("options") or {}).get("eta") or 0)
    except (ValueError, TypeError, AttributeError):
        return None
    return max(created, eta) or None


def queue_counts(client: redis.Redis, namespace: str, queue: str, *, now_ms: int | None = None) -> QueueCounts:
    """Count one queue's messages in each state; read-only, a handful of commands per live worker.

    Parameters:
      client: A client on the broker's Redis (bytes or decoded responses).
      namespace: The broker namespace (WHISKYPAY_NAMESPACE).
      queue: The queue name, e.g. "callbackQueue".
      now_ms: The current time in unix milliseconds; the wall clock when None.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    base = keys.queue(namespace, queue)
    workers = [keys.text(worker) for worker in client.zrange(keys.heartbeats(namespace), 0, -1)]
    pipe = client.pipeline(transaction=False)
    pipe.llen(base)
    pipe.llen(keys.delayed(namespace, queue))
    pipe.zcard(keys.dead_letters(namespace, queue))
    pipe.lindex(base, 0)
    for worker in workers:
        pipe.scard(keys.acks(namespace, worker, queue))
        pipe.scard(keys.acks(namespace, worker, dq_name(queue)))
    waiting, delayed, dead, head, *acks = pipe.execute()
    oldest_wait_ms = None
    if head is not None:
        encoded = client.hget(keys.messages(namespace, queue), head)
        since = ready_since_ms(encoded) if encoded is not None else None
        if since is not None:
            oldest_wait_ms = max(0, now_ms - since)
    return QueueCounts(
        queue=queue,
        waiting=int(waiting),
        delayed=int(delayed) + sum(int(n) for n in acks[1::2]),
        in_flight=sum(int(n) for n in acks[0::2]),
        dead_letters=int(dead),
        oldest_wait_ms=oldest_wait_ms,
    )


def merchant_of(encoded: bytes | str) -> str | None:
    """Return the `merchant_id` argument of an encoded message, or None (none given, or unreadable)."""
    try:
        kwargs = json.loads(encoded).get("kwargs")
    except (ValueError, TypeError, AttributeError):
        return None
    merchant_id = kwargs.get("merchant_id") if isinstance(kwargs, dict) else None
    return merchant_id if isinstance(merchant_id, str) else None


def _merchant_messages(client: redis.Redis, key: str, merchant_id: str) -> list[str]:
    """Return the ids in hash key (id -> encoded message) of merchant_id's messages, read with HSCAN."""
    needle = json.dumps(merchant_id).encode()  # a cheap test before decoding: the id appears quoted in the JSON
    found = []
    for message_id, encoded in client.hscan_iter(key, count=500):
        raw = encoded if isinstance(encoded, bytes) else encoded.encode()
        if needle in raw and merchant_of(raw) == merchant_id:
            found.append(keys.text(message_id))
    return found


def merchant_counts(client: redis.Redis, namespace: str, queue: str, merchant_id: str) -> QueueCounts:
    """Count merchant_id's messages of one queue in each state, by reading every message of the queue.

    Unlike `queue_counts` it costs a scan of the queue's, delay queue's and dead-letter queue's messages (HSCAN,
    500 a round trip): an operator's command, not for a hot path. A message of the queue's hash that is not in
    its list of waiting ids was fetched by a worker (in flight); every message of the delay queue's hash counts
    as delayed, fetched or not. oldest_wait_ms is None.
    """
    base = keys.queue(namespace, queue)
    waiting_ids = {keys.text(message_id) for message_id in client.lrange(base, 0, -1)}
    unacked = _merchant_messages(client, keys.messages(namespace, queue), merchant_id)
    waiting = sum(1 for message_id in unacked if message_id in waiting_ids)
    return QueueCounts(
        queue=queue,
        waiting=waiting,
        delayed=len(_merchant_messages(client, keys.messages(namespace, dq_name(queue)), merchant_id)),
        in_flight=len(unacked) - waiting,
        dead_letters=len(_merchant_messages(client, keys.dead_letter_messages(namespace, queue), merchant_id)),
        oldest_wait_ms=None,
    )
