"""Merchant breakers in Redis: count failures, open, park, probe, release, give up; and each process's local view.

The key layout is drawn in `whiskypay.keys` (ns:whiskypay.breaker:M, ns:whiskypay.parked:M ...). Each change is one
Lua script, timed by the Redis server's clock (TIME), so every worker on every machine agrees on when a probe or
a release is due, and the `next_probe_at` / `release_next` / `expire_next` fields double as locks: whoever's
script finds one due moves it on, so there is exactly one probe per interval across all workers.

Parked callbacks wait in ONE place per merchant: a zset of redis ids scored by the message's original
`message_timestamp` (oldest first, whatever order they were parked in), their encoded messages in a hash. They
are in no Dramatiq queue, so no worker prefetches them and no thread holds them. A probe moves a message back
onto its queue exactly as Dramatiq's enqueue writes it (HSET `Q.msgs`, LPUSH to the head so it runs next, and our
wake-up PUBLISH); a release moves messages into the queue's paced replay lane (`whiskypay.replay`), which workers
serve only when no fresh work waits.

`BreakerView` is what a worker process knows without asking Redis: the merchants with a breaker record, their
state and failure count. It is replaced by `BreakerStore.snapshot` every second and patched between snapshots
by the "<state> M" messages on `keys.breaker_channel` (the pub/sub subscriber that wakes consumers delivers
them), so a merchant with no record costs no Redis call per attempt.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from whiskypay import keys
from whiskypay.merchants import Breaker

if TYPE_CHECKING:
    import redis

#: Now, in unix milliseconds, from the Redis server's clock (scripts are replicated by effects since Redis 5).
_NOW = """
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: Store one message among the merchant's parked callbacks (idempotent: a redelivered copy does not move).
_PARK = """
local function park(rid, data, score, now)
    redis.call("zadd", KEYS[3], "NX", score, rid)
    redis.call("hset", KEYS[4], rid, data)
    redis.call("zadd", KEYS[5], "NX", now, rid)
end
"""

#: An outage failure of merchant ARGV[1]: count it, open the breaker at the threshold, and park the message if the
#: breaker is open. KEYS: breaker, index, parked, parked msgs, parked at. ARGV: merchant, threshold, probe interval
#: (ms), last error, host, queue, redis id, data, score, channel. Returns {opened 0|1, parked 0|1, failures,
#: next_probe_at}.
FAIL_LUA = _NOW + _PARK + """
local merchant = ARGV[1]
local was = redis.call("hget", KEYS[1], "state")
local failures = redis.call("hincrby", KEYS[1], "failures", 1)
redis.call("hset", KEYS[1], "last_error", ARGV[4], "host", ARGV[5], "queue", ARGV[6], "last_failure_at", now)
redis.call("sadd", KEYS[2], merchant)
local opened = 0
if was ~= "open" then
    if failures >= tonumber(ARGV[2]) then
        local probe_at = now + tonumber(ARGV[3])
        redis.call("hset", KEYS[1], "state", "open", "since", now, "next_probe_at", probe_at, "held", "0")
        redis.call("hdel", KEYS[1], "probe", "release_next")
        redis.call("publish", ARGV[10], "open " .. merchant)
        opened = 1
    elseif failures == 1 then
        redis.call("publish", ARGV[10], "suspect " .. merchant)
    end
end
if redis.call("hget", KEYS[1], "state") == "open" then
    redis.call("persist", KEYS[1])
else
    -- a count that never reaches the threshold (a merchant that stopped sending) is forgotten after a day
    redis.call("pexpire", KEYS[1], 86400000)
end
if redis.call("hget", KEYS[1], "probe") == ARGV[7] then
    redis.call("hdel", KEYS[1], "probe")
end
local parked = 0
if redis.call("hget", KEYS[1], "state") == "open" then
    park(ARGV[7], ARGV[8], ARGV[9], now)
    parked = 1
end
return {opened, parked, failures, tonumber(redis.call("hget", KEYS[1], "next_probe_at") or "0")}
"""

#: Merchant ARGV[1] answered (a 2xx, or any reply that is not an outage): reset its count, close an open breaker
#: unless an operator holds it. KEYS: breaker, index, parked, parked at. ARGV: merchant, redis id, channel.
#: Returns 2 closed now, 1 count reset, 0 nothing to do (no record, or held).
SUCCEED_LUA = """
local merchant = ARGV[1]
redis.call("zrem", KEYS[4], ARGV[2])
if redis.call("exists", KEYS[1]) == 0 then
    return 0
end
if redis.call("hget", KEYS[1], "state") == "open" then
    if redis.call("hget", KEYS[1], "held") == "1" then
        return 0
    end
    redis.call("hset", KEYS[1], "state", "closed", "failures", 0)
    redis.call("hdel", KEYS[1], "since", "next_probe_at", "probe", "held", "release_next")
    redis.call("publish", ARGV[3], "closed " .. merchant)
    return 2
end
redis.call("hset", KEYS[1], "failures", 0)
if redis.call("zcard", KEYS[3]) == 0 then
    redis.call("del", KEYS[1])
    redis.call("srem", KEYS[2], merchant)
end
redis.call("publish", ARGV[3], "clear " .. merchant)
return 1
"""

#: Park a message fetched for merchant ARGV[1] without attempting it, if its breaker is open (or ARGV[7] = "1":
#: the process already has enough attempts in flight to trip it). KEYS: breaker, index, parked, parked msgs, parked
#: at. ARGV: merchant, redis id, data, score, host, queue, force. Returns "probe" (this message is the merchant's
#: probe: attempt it), "parked", or "closed" (not open after all: attempt it).
PARK_LUA = _NOW + _PARK + """
local state = redis.call("hget", KEYS[1], "state")
if state == "open" and redis.call("hget", KEYS[1], "probe") == ARGV[2] then
    return "probe"
end
if state ~= "open" and ARGV[7] ~= "1" then
    return "closed"
end
park(ARGV[2], ARGV[3], ARGV[4], now)
redis.call("hset", KEYS[1], "host", ARGV[5], "queue", ARGV[6])
redis.call("persist", KEYS[1])
redis.call("sadd", KEYS[2], ARGV[1])
return "parked"
"""

#: Take merchant's probe if one is due: move the oldest parked message to the head of its queue and remember its
#: redis id (not while the worker that parked it has yet to ack it: see RELEASE_LUA). KEYS: breaker, parked,
#: parked msgs, queue msgs, queue. ARGV: probe interval (ms), wake channel.
#: Returns {taken 0|1, next_probe_at}.
PROBE_LUA = _NOW + """
if redis.call("hget", KEYS[1], "state") ~= "open" or redis.call("hget", KEYS[1], "held") == "1" then
    return {0, 0}
end
local due = tonumber(redis.call("hget", KEYS[1], "next_probe_at") or "0")
if now < due then
    return {0, due}
end
local oldest = redis.call("zrange", KEYS[2], 0, 0)
if #oldest == 0 then
    return {0, due}
end
local rid = oldest[1]
if redis.call("hexists", KEYS[4], rid) == 1 then
    -- Still unacknowledged (a worker parked it and has not acked it yet): its ack deletes Q.msgs[rid], which
    -- would take the probe's message with it. Take it once the ack has gone through.
    return {0, due}
end
local data = redis.call("hget", KEYS[3], rid)
redis.call("zrem", KEYS[2], rid)
redis.call("hdel", KEYS[3], rid)
local after = now + tonumber(ARGV[1])
redis.call("hset", KEYS[1], "probe", rid, "next_probe_at", after)
if data then
    redis.call("hset", KEYS[4], rid, data)
    redis.call("lpush", KEYS[5], rid)
    redis.call("publish", ARGV[2], "1")
end
return {1, after}
"""

#: Release a closed merchant's parked messages, oldest first, ARGV[2] at a time, paced at ARGV[1] per second
#: across all workers, into the queue's replay lane (`whiskypay.replay`: workers take them only when no fresh work
#: waits, at WHISKYPAY_REPLAY_RATE), and only while the lane holds fewer than ARGV[5] (so the rest stay parked,
#: in order, should the merchant fail again). A message still in the queue's hash (the worker that parked it has
#: not acked it yet: the ack would delete the released copy's data) and those after it wait for the next tick.
#: KEYS: breaker, index, parked, parked msgs, parked at, lane, lane msgs, queue msgs.
#: ARGV: rate, batch, merchant, wake channel, lane limit. Returns {released, left} (left = -1: the breaker is open
#: again).
RELEASE_LUA = _NOW + """
if redis.call("hget", KEYS[1], "state") == "open" then
    return {0, -1}
end
local due = tonumber(redis.call("hget", KEYS[1], "release_next") or "0")
if now < due or redis.call("zcard", KEYS[6]) >= tonumber(ARGV[5]) then
    return {0, redis.call("zcard", KEYS[3])}
end
local ids = redis.call("zrange", KEYS[3], 0, tonumber(ARGV[2]) - 1)
local moved, taken = 0, 0
for i, rid in ipairs(ids) do
    if redis.call("hexists", KEYS[8], rid) == 1 then
        -- Still unacknowledged by the worker that parked it: its ack deletes Q.msgs[rid], which would take the
        -- replay's message with it once the lane moves it onto the queue. Stop here (the order holds): next tick.
        break
    end
    taken = taken + 1
    local data = redis.call("hget", KEYS[4], rid)
    redis.call("zrem", KEYS[3], rid)
    redis.call("hdel", KEYS[4], rid)
    redis.call("zrem", KEYS[5], rid)
    if data then
        redis.call("hset", KEYS[7], rid, data)
        redis.call("zadd", KEYS[6], now * 1000 + i, rid)  -- replay.lane_order: oldest first
        moved = moved + 1
    end
end
if moved > 0 then
    redis.call("publish", ARGV[4], "1")
end
local left = redis.call("zcard", KEYS[3])
if left == 0 and tonumber(redis.call("hget", KEYS[1], "failures") or "0") == 0 then
    redis.call("del", KEYS[1])
    redis.call("srem", KEYS[2], ARGV[3])
else
    redis.call("hset", KEYS[1], "release_next", now + math.ceil(taken * 1000 / tonumber(ARGV[1])))
end
return {moved, left}
"""

#: Claim merchant's park-limit check if due, and return the parked messages first parked before the cutoff.
#: KEYS: breaker, parked msgs, parked at. ARGV: limit (ms), check interval (ms), batch. Returns {now, since or "",
#: reported_since or "", rid1, data1, parked_at1, ...} or {} when not due.
EXPIRED_LUA = _NOW + """
local due = tonumber(redis.call("hget", KEYS[1], "expire_next") or "0")
if now < due or redis.call("exists", KEYS[1]) == 0 then
    return {}
end
redis.call("hset", KEYS[1], "expire_next", now + tonumber(ARGV[2]))
local out = {now, redis.call("hget", KEYS[1], "since") or "", redis.call("hget", KEYS[1], "reported_since") or ""}
local old = redis.call("zrangebyscore", KEYS[3], "-inf", now - tonumber(ARGV[1]), "WITHSCORES", "LIMIT", 0,
    tonumber(ARGV[3]))
for i = 1, #old, 2 do
    local data = redis.call("hget", KEYS[2], old[i])
    if data then
        table.insert(out, old[i])
        table.insert(out, data)
        table.insert(out, old[i + 1])
    end
end
return out
"""

#: Dead-letter parked messages that are still parked, as Dramatiq's nack writes a dead letter, and count them as
#: failed (for their queue, and for their merchant_id if they have one). KEYS: breaker, index, parked, parked msgs,
#: parked at, XQ, XQ msgs, outcome counters, per-merchant outcome counters. ARGV: merchant, reported_since (or ""),
#: then triples of redis id, dead-letter data, per-merchant counter field (or ""). Returns how many moved.
DEAD_LUA = _NOW + """
local moved = 0
for i = 3, #ARGV, 3 do
    local rid = ARGV[i]
    if redis.call("hexists", KEYS[4], rid) == 1 then
        redis.call("zrem", KEYS[3], rid)
        redis.call("hdel", KEYS[4], rid)
        redis.call("zrem", KEYS[5], rid)
        redis.call("zadd", KEYS[6], now, rid)
        redis.call("hset", KEYS[7], rid, ARGV[i + 1])
        if ARGV[i + 2] ~= "" then
            redis.call("hincrby", KEYS[9], ARGV[i + 2], 1)
        end
        moved = moved + 1
    end
end
if moved > 0 then
    redis.call("hincrby", KEYS[8], "failed", moved)
    redis.call("hsetnx", KEYS[8], "started_at", math.floor(now / 1000))
end
if ARGV[2] ~= "" then
    redis.call("hset", KEYS[1], "reported_since", ARGV[2])
end
if redis.call("zcard", KEYS[3]) == 0 and redis.call("hget", KEYS[1], "state") ~= "open" then
    redis.call("del", KEYS[1])
    redis.call("srem", KEYS[2], ARGV[1])
end
return moved
"""

#: Every merchant with a record (dropping from the index those whose failure count expired): KEYS: index. ARGV: the
#: breaker key prefix, the parked key prefix. Returns {merchant, {field, value, ...}, parked count, ...}.
SNAPSHOT_LUA = """
local out = {}
for _, merchant in ipairs(redis.call("smembers", KEYS[1])) do
    local fields = redis.call("hgetall", ARGV[1] .. merchant)
    local parked = redis.call("zcard", ARGV[2] .. merchant)
    if #fields == 0 and parked == 0 then
        redis.call("srem", KEYS[1], merchant)  -- its failure count expired
    else
        table.insert(out, merchant)
        table.insert(out, fields)
        table.insert(out, parked)
    end
end
return out
"""

#: An operator opens (holds) or closes merchant ARGV[1]. KEYS: breaker, index. ARGV: merchant, "open"|"close",
#: channel, queue. Returns the previous state ("open", "closed" or "none").
OPERATE_LUA = _NOW + """
local was = redis.call("hget", KEYS[1], "state") or "none"
if ARGV[2] == "open" then
    redis.call("hset", KEYS[1], "state", "open", "held", "1", "since", now)
    redis.call("persist", KEYS[1])
    redis.call("hsetnx", KEYS[1], "queue", ARGV[4])
    redis.call("hdel", KEYS[1], "next_probe_at", "probe", "release_next")
    redis.call("sadd", KEYS[2], ARGV[1])
    redis.call("publish", ARGV[3], "open " .. ARGV[1])
elseif redis.call("exists", KEYS[1]) == 1 then
    redis.call("hset", KEYS[1], "state", "closed", "failures", 0)
    redis.call("hdel", KEYS[1], "since", "next_probe_at", "probe", "held", "release_next")
    redis.call("publish", ARGV[3], "closed " .. ARGV[1])
end
return was
"""


#: The health check reports merchant ARGV[1]'s outage that opened at ARGV[2] once: returns 1 the first time.
#: KEYS: breaker.
HEALTH_LUA = """
if redis.call("hget", KEYS[1], "state") == "open" and redis.call("hget", KEYS[1], "since") == ARGV[2]
        and redis.call("hget", KEYS[1], "health_reported") ~= ARGV[2] then
    redis.call("hset", KEYS[1], "health_reported", ARGV[2])
    return 1
end
return 0
"""



@dataclass(frozen=True)
class FailResult:
    """What recording one outage failure did."""

    opened: bool
    parked: bool
    failures: int
    next_probe_at_ms: int


@dataclass(frozen=True)
class Expired:
    """A parked message past the park limit, read by `BreakerStore.expired`."""

    redis_id: str
    data: bytes
    parked_at_ms: int


class BreakerStore:
    """The breakers' Redis scripts for one namespace.

    Parameters:
      client: A client on the broker's Redis.
      namespace: The broker namespace.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.channel = keys.breaker_channel(namespace)
        self._scripts = {
            name: client.register_script(source)
            for name, source in {
                "fail": FAIL_LUA, "succeed": SUCCEED_LUA, "park": PARK_LUA, "probe": PROBE_LUA,
                "release": RELEASE_LUA, "expired": EXPIRED_LUA, "dead": DEAD_LUA, "snapshot": SNAPSHOT_LUA,
                "operate": OPERATE_LUA, "health": HEALTH_LUA,
            }.items()
        }

    def _park_keys(self, merchant: str) -> list[str]:
        ns = self.namespace
        return [
            keys.breaker(ns, merchant), keys.breaker_index(ns), keys.parked(ns, merchant),
            keys.parked_messages(ns, merchant), keys.parked_at(ns, merchant),
        ]

    def fail(
        self, merchant: str, *, threshold: int, probe_interval_ms: int, error: str, host: str, queue: str,
        redis_id: str, data: bytes, score: int,
    ) -> FailResult:
        """Count one outage failure; open at threshold; park the message (data) if the breaker is open."""
        opened, parked, failures, next_probe = self._scripts["fail"](
            keys=self._park_keys(merchant),
            args=[keys.breaker_member(merchant), threshold, probe_interval_ms, error, host, queue, redis_id, data,
                  score, self.channel],
        )
        return FailResult(bool(opened), bool(parked), int(failures), int(next_probe))

    def succeed(self, merchant: str, *, redis_id: str = "") -> int:
        """Record that merchant answered; return 2 if that closed its breaker, 1 if it reset a count, else 0."""
        ns = self.namespace
        names = [keys.breaker(ns, merchant), keys.breaker_index(ns), keys.parked(ns, merchant),
                 keys.parked_at(ns, merchant)]
        args = [keys.breaker_member(merchant), redis_id, self.channel]
        return int(self._scripts["succeed"](keys=names, args=args))

    def park(
        self, merchant: str, *, redis_id: str, data: bytes, score: int, host: str, queue: str, force: bool = False
    ) -> str:
        """Park a fetched message if merchant's breaker is open (or force); return "parked", "probe" or "closed"."""
        return keys.text(self._scripts["park"](
            keys=self._park_keys(merchant),
            args=[keys.breaker_member(merchant), redis_id, data, score, host, queue, "1" if force else "0"],
        ))

    def is_parked(self, merchant: str, redis_id: str) -> bool:
        """Return True if redis_id is among merchant's parked callbacks."""
        return self.client.zscore(keys.parked(self.namespace, merchant), redis_id) is not None

    def take_probe(self, merchant: str, *, queue: str, probe_interval_ms: int) -> tuple[bool, int]:
        """Send merchant's oldest parked message as its probe if one is due; return (taken, next_probe_at ms)."""
        ns = self.namespace
        names = [keys.breaker(ns, merchant), keys.parked(ns, merchant), keys.parked_messages(ns, merchant),
                 keys.messages(ns, queue), keys.queue(ns, queue)]
        taken, after = self._scripts["probe"](
            keys=names, args=[probe_interval_ms, keys.wake_channel(ns, queue)]
        )
        return bool(taken), int(after)

    def release(self, merchant: str, *, queue: str, rate: float, tick_s: float = 0.1) -> tuple[int, int]:
        """Move the next batch of a closed merchant's parked messages into queue's replay lane, paced at rate.

        Parameters:
          rate: Messages per second, across all workers.
          tick_s: How often the caller releases: a batch is what the rate allows per tick (at least one).

        The lane holds at most a second's worth (rate, at least one batch); the rest wait parked. Returns (released
        now, still parked); still parked is -1 when the breaker is open again.
        """
        ns = self.namespace
        batch = max(1, int(rate * tick_s))
        names = [*self._park_keys(merchant), keys.replay_lane(ns, queue), keys.replay_lane_messages(ns, queue),
                 keys.messages(ns, queue)]
        moved, left = self._scripts["release"](
            keys=names,
            args=[rate, batch, keys.breaker_member(merchant), keys.wake_channel(ns, queue), max(batch, int(rate))],
        )
        return int(moved), int(left)

    def expired(
        self, merchant: str, *, limit_ms: int, check_interval_ms: int, batch: int = 500
    ) -> tuple[int, int | None, int | None, list[Expired]] | None:
        """Claim merchant's park-limit check if it is due; return (now ms, open since ms, reported since ms, the
        messages parked longer than limit_ms), or None when another worker checked it lately."""
        ns = self.namespace
        names = [keys.breaker(ns, merchant), keys.parked_messages(ns, merchant), keys.parked_at(ns, merchant)]
        reply = self._scripts["expired"](keys=names, args=[limit_ms, check_interval_ms, batch])
        if not reply:
            return None
        now, since, reported = int(reply[0]), keys.text(reply[1]), keys.text(reply[2])
        rows = reply[3:]
        found = [
            Expired(keys.text(rows[i]), rows[i + 1], int(float(rows[i + 2]))) for i in range(0, len(rows), 3)
        ]
        return now, int(since) if since else None, int(reported) if reported else None, found

    def dead_letter(
        self, merchant: str, *, queue: str, letters: Iterable[tuple[str, bytes]], reported_since: int | None
    ) -> int:
        """Move parked messages (redis id, dead-letter data) to queue's dead letters; return how many moved."""
        ns = self.namespace
        names = [*self._park_keys(merchant), keys.dead_letters(ns, queue), keys.dead_letter_messages(ns, queue),
                 keys.outcome_counters(ns, queue), keys.merchant_outcome_counters(ns, queue)]
        args: list[Any] = [keys.breaker_member(merchant), "" if reported_since is None else reported_since]
        for redis_id, data in letters:
            merchant_id = (json.loads(data).get("kwargs") or {}).get("merchant_id")
            field = keys.merchant_outcome_field("failed", merchant_id) if isinstance(merchant_id, str) else ""
            args += [redis_id, data, field]
        return int(self._scripts["dead"](keys=names, args=args))

    def snapshot(self) -> dict[str, Breaker]:
        """Return every merchant's breaker with a record (one script call), by breaker name (`m_42`, `host=h`)."""
        ns = self.namespace
        reply = self._scripts["snapshot"](
            keys=[keys.breaker_index(ns)], args=[keys.breaker_prefix(ns), keys.parked_prefix(ns)]
        )
        found: dict[str, Breaker] = {}
        for i in range(0, len(reply), 3):
            merchant = keys.breaker_name(keys.text(reply[i]))
            if merchant is None:
                continue  # a record from before breakers were tagged (not migrated: they are short-lived)
            raw = reply[i + 1]
            if isinstance(raw, dict):  # RESP3 answers a map
                fields = {keys.text(k): keys.text(v) for k, v in raw.items()}
            else:
                fields = {keys.text(raw[j]): keys.text(raw[j + 1]) for j in range(0, len(raw), 2)}
            found[merchant] = Breaker.of(merchant, fields, parked=int(reply[i + 2]))
        return found

    def operate(self, merchant: str, action: str, *, queue: str) -> str:
        """Open (hold) or close merchant's breaker by hand; return its previous state (open, closed or none)."""
        ns = self.namespace
        return keys.text(self._scripts["operate"](
            keys=[keys.breaker(ns, merchant), keys.breaker_index(ns)],
            args=[keys.breaker_member(merchant), action, self.channel, queue],
        ))


    def first_health_report(self, merchant: str, since_ms: int) -> bool:
        """Return True once per outage (breaker opened at since_ms): the health check reports it then."""
        names = [keys.breaker(self.namespace, merchant)]
        return bool(self._scripts["health"](keys=names, args=[keys.breaker_member(merchant), since_ms]))


def dead_letter_data(data: bytes, *, reason: str, failed_at_ms: int) -> bytes:
    """Return a parked message (encoded) as its dead letter: its last error is the park limit's reason."""
    message = json.loads(data)
    options = dict(message.get("options") or {})
    options.update(traceback=f"ParkLimitExceeded: {reason}", failure_class="ParkLimitExceeded", failed_at=failed_at_ms)
    return json.dumps({**message, "options": options}, separators=(",", ":")).encode()


class BreakerView:
    """This process's view of the merchants with a breaker record, read without a Redis call.

    Replaced whole by `replace_all` (a snapshot every second) and patched by `apply` (the pub/sub announcements,
    and what this process's own scripts answered). Reads and writes are single dict operations (atomic under the
    GIL), so worker threads read it without a lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._breakers: dict[str, Breaker] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self.clock = clock

    def get(self, merchant: str) -> Breaker | None:
        """Return merchant's breaker as last seen, or None if it has no record (healthy)."""
        return self._breakers.get(merchant)

    def all(self) -> list[Breaker]:
        """Return every breaker known."""
        return list(self._breakers.values())

    def replace_all(self, breakers: Mapping[str, Breaker], *, taken_at: float) -> None:
        """Replace the view with a snapshot read from taken_at on (this view's clock).

        A merchant updated here after taken_at keeps its local entry: the snapshot may predate that update (a
        failure counted by this process while the snapshot was on its way).
        """
        with self._lock:
            fresh = dict(breakers)
            for merchant, touched in self._touched.items():
                if touched >= taken_at and merchant in self._breakers:
                    fresh[merchant] = self._breakers[merchant]
            self._touched = {m: t for m, t in self._touched.items() if t >= taken_at}
            self._breakers = fresh

    def update(self, merchant: str, **changes: Any) -> None:
        """Change some fields of merchant's breaker (creating a closed one if unknown)."""
        with self._lock:
            current = self._breakers.get(merchant) or Breaker(
                merchant, "closed", 0, 0, None, None, None, False, None, None
            )
            self._breakers[merchant] = replace(current, **changes)
            self._touched[merchant] = self.clock()

    def apply(self, announcement: bytes | str, *, now_ms: int, probe_interval_ms: int) -> None:
        """Apply one "<state> <merchant>" announcement from `keys.breaker_channel`."""
        kind, _, member = keys.text(announcement).partition(" ")
        merchant = keys.breaker_name(member)
        if not merchant:
            return
        if kind == "open":
            self.update(merchant, state="open", since_ms=now_ms, next_probe_at_ms=now_ms + probe_interval_ms)
        elif kind == "closed":
            self.update(merchant, state="closed", failures=0, since_ms=None, next_probe_at_ms=None, held=False)
        elif kind == "suspect":
            current = self.get(merchant)
            self.update(merchant, failures=max(1, current.failures if current else 0))
        elif kind == "clear":
            self.update(merchant, failures=0)
