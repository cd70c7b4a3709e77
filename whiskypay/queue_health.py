"""Queue health: open an incident once when a queue goes bad, close it when it recovers; one run per minute.

Two conditions are watched per queue:
  dead_letters  the dead-letter count grew since the previous run (first run: only a baseline is taken);
                the incident closes at the first run that sees no growth.
  stale         the next waiting message has been ready longer than the threshold (no worker takes it);
                the incident closes when that is no longer so.
An incident is "new" (to be reported) only on the run that opens it. The state lives in Redis, in the hash
`keys.health_state` (fields `dead_letters_seen`, `open`: comma-separated kinds, `checked_at`: unix ms), so
every worker process and every run shares it. A per-minute lock (`keys.health_tick`) makes a second run for
the same scheduled minute a no-op, which is what two schedulers started by mistake produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import redis

from whiskypay import keys
from whiskypay.queue_stats import QueueCounts

Kind = Literal["dead_letters", "stale"]


@dataclass(frozen=True)
class HealthState:
    """What the previous run saw of one queue.

    Parameters:
      dead_letters_seen: The dead-letter count of the previous run; None before the first run.
      open: The kinds of incident open now.
    """

    dead_letters_seen: int | None = None
    open: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Incident:
    """A queue condition that just went bad: reported once, when it opens."""

    queue: str
    kind: Kind
    summary: str


def assess(counts: QueueCounts, state: HealthState, *, max_wait_ms: int) -> tuple[HealthState, list[Incident]]:
    """Return the queue's next state and the incidents that open on this run (already open ones are not repeated).

    Parameters:
      counts: This run's snapshot of the queue.
      state: The previous run's state.
      max_wait_ms: The longest the next waiting message may have been ready before "stale", in milliseconds.
    """
    seen = state.dead_letters_seen
    grew = seen is not None and counts.dead_letters > seen
    stale = counts.oldest_wait_ms is not None and counts.oldest_wait_ms > max_wait_ms
    bad: dict[Kind, str] = {}
    if grew:
        assert seen is not None
        bad["dead_letters"] = (
            f"{counts.queue}: {counts.dead_letters - seen} new dead letter(s), {counts.dead_letters} kept in total"
        )
    if stale:
        assert counts.oldest_wait_ms is not None
        bad["stale"] = (
            f"{counts.queue}: the next message has waited {counts.oldest_wait_ms // 1000} s, over the "
            f"{max_wait_ms // 1000} s limit (WHISKYPAY_HEALTH_MAX_WAIT_S); {counts.waiting} waiting, "
            f"{counts.in_flight} in flight: are the workers for this queue running?"
        )
    opened = [Incident(counts.queue, kind, text) for kind, text in bad.items() if kind not in state.open]
    return HealthState(dead_letters_seen=counts.dead_letters, open=frozenset(bad)), opened


def tick_of(scheduled_at: str | None, *, now: datetime) -> str:
    """Return the scheduled minute in UTC ("2026-11-27T21:00Z"): the message's `scheduled_at`, else now's.

    Parameters:
      scheduled_at: periodiq's `scheduled_at` option (ISO 8601 with an offset), or None for a manual run.
      now: The current time (timezone-aware), used when scheduled_at is missing or unreadable.
    """
    moment = now
    if scheduled_at:
        try:
            parsed = datetime.fromisoformat(scheduled_at)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            moment = parsed
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def take_tick(client: redis.Redis, namespace: str, tick: str, *, lock_s: int) -> bool:
    """Take the lock of one scheduled minute; return False if another run already took it.

    Parameters:
      client: A client on the broker's Redis.
      namespace: The broker namespace.
      tick: The minute, as `tick_of` returns it.
      lock_s: How long the lock is held, in seconds.
    """
    return bool(client.set(keys.health_tick(namespace, tick), 1, nx=True, ex=lock_s))


def load_state(client: redis.Redis, namespace: str, queue: str) -> HealthState:
    """Return the stored state of queue (the empty state if none is stored).

    Parameters:
      client: A client on the broker's Redis.
      namespace: The broker namespace.
      queue: The queue name.
    """
    raw = {
        keys.text(k): keys.text(v) for k, v in client.hgetall(keys.health_state(namespace, queue)).items()
    }
    seen = raw.get("dead_letters_seen")
    return HealthState(
        dead_letters_seen=int(seen) if seen not in (None, "") else None,
        open=frozenset(kind for kind in raw.get("open", "").split(",") if kind),
    )


def save_state(client: redis.Redis, namespace: str, queue: str, state: HealthState, *, now_ms: int) -> None:
    """Store the state of queue.

    Parameters:
      client: A client on the broker's Redis.
      namespace: The broker namespace.
      queue: The queue name.
      state: The state to store.
      now_ms: The time of this run, in unix milliseconds (stored as `checked_at`).
    """
    client.hset(
        keys.health_state(namespace, queue),
        mapping={
            "dead_letters_seen": "" if state.dead_letters_seen is None else state.dead_letters_seen,
            "open": ",".join(sorted(state.open)),
            "checked_at": now_ms,
        },
    )
