"""The paced replay lane: resends and re-drives wait in a lane that workers serve after fresh work.

After a merchant's outage an operator replays thousands of messages at once. Put straight onto the queue,
they would sit in front of every new payment until the workers got through them. Instead a replay goes
into its queue's lane, `ns:whiskypay.replay:Q` (a zset of Redis message ids in the order they were replayed)
with its message in `ns:whiskypay.replay:Q.msgs`.

A worker's consumer of Q, each time it finds Q empty, moves replays from the lane onto Q (PROMOTE_LUA,
atomic: a replay is promoted once) and fetches them as any other message: never more than half its prefetch
window (one per worker thread) in flight, and at most as many as a token bucket shared by every worker allows
(`ns:whiskypay.replay:Q.pace`: WHISKYPAY_REPLAY_RATE tokens a second, at most a fifth of a second's worth
saved up). So replays run only when no fresh work is waiting, never faster than WHISKYPAY_REPLAY_RATE per
second across all workers (so a merchant just back from an outage is not flooded either), and a new payment
finds room in the prefetch window and at most one replay per worker thread ahead of it, however many
thousands wait in the lane. When the
bucket is empty the consumer sleeps until its next token instead of its whole poll timeout. Workers started
as usual (`dramatiq actors --queues callbackQueue`) serve the lane: the consumer is WhiskyPayRedisBroker's,
no flag is needed. Once promoted, a replay is an ordinary message (acks, retries, requeue of a dead worker's
messages); until then it waits in Redis, whatever happens to the workers.

Why not Dramatiq's delay queue, with a slot time from a cursor as each replay's eta (no consumer change at
all): a delayed message comes due onto the tail of the queue whatever waits there, so when replays come due
faster than the workers deliver (a slow merchant, busy workers) they pile up in front of new payments;
measured here with 2,000 replays at 200/s, new payments' p95 went from 27-37 ms to 0.4-1.3 s. Why not
Dramatiq's rate limiters: they bound attempts inside the actor and raise when over the limit, turning
pacing into retries (attempts counted) instead of queueing.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from whiskypay import keys

if TYPE_CHECKING:
    import redis

#: Add one replay to a queue's lane and wake the queue's consumers (an idle one promotes it at once).
#: KEYS: lane zset, lane messages hash. ARGV: redis id, data, order (the zset score), wake channel.
LANE_ADD_LUA = """
redis.call("hset", KEYS[2], ARGV[1], ARGV[2])
redis.call("zadd", KEYS[1], ARGV[3], ARGV[1])
redis.call("publish", ARGV[4], "1")
return 1
"""

#: Move replays from the lane onto the queue, oldest first, as Dramatiq's enqueue puts a message there: at most
#: ARGV[2] (the consumer's free prefetch room) and at most the whole tokens of the pace bucket, which fills at
#: ARGV[3] per second up to a fifth of a second's worth. KEYS: lane zset, lane messages hash, pace hash, Q.msgs,
#: Q. ARGV: now (ms), room, rate. Returns {moved, ms until the next token (0 when replays moved or the lane is
#: empty)}. Writes first, deletes last (as redis_broker.ENQUEUE_LUA orders its commit point): a refused call loses
#: no replay; one refused after a replay reached Q (its lane delete) leaves it in the lane too, run again later.
PROMOTE_LUA = """
if redis.call("zcard", KEYS[1]) == 0 then
    return {0, 0}
end
local now, room, rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local burst = math.max(1, rate / 5)
local pace = redis.call("hmget", KEYS[3], "tokens", "at")
local tokens, at = tonumber(pace[1] or burst), tonumber(pace[2] or now)
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local take = math.min(room, math.floor(tokens))
if take < 1 then
    redis.call("hset", KEYS[3], "tokens", tostring(tokens), "at", now)
    redis.call("pexpire", KEYS[3], 60000)
    return {0, math.ceil((1 - tokens) * 1000 / rate)}
end
local ids = redis.call("zrange", KEYS[1], 0, take - 1)
local moved = 0
for _, id in ipairs(ids) do
    local data = redis.call("hget", KEYS[2], id)
    if data then
        redis.call("hset", KEYS[4], id, data)
        redis.call("rpush", KEYS[5], id)
        moved = moved + 1
    end
end
redis.call("hset", KEYS[3], "tokens", tostring(tokens - moved), "at", now)
redis.call("pexpire", KEYS[3], 60000)
-- The deletes last: Redis does not roll a script back, so a write refused above (an ACL denial, OOM, READONLY,
-- WRONGTYPE) leaves every replay in the lane, to be promoted by a later call, instead of deleted and lost.
for _, id in ipairs(ids) do
    redis.call("zrem", KEYS[1], id)
    redis.call("hdel", KEYS[2], id)
end
return {moved, 0}
"""

#: Replays per second when a broker is built without a rate (WHISKYPAY_REPLAY_RATE's default).
DEFAULT_REPLAY_RATE = 20.0


# Keys: named in whiskypay/keys.py.
lane_key = keys.replay_lane
lane_messages_key = keys.replay_lane_messages
lane_pace_key = keys.replay_lane_pace


def lane_order(now_ms: int, index: int) -> int:
    """Return the lane score of the index-th replay of one command run at now_ms (oldest first)."""
    return now_ms * 1000 + index % 1000


def lane_size(client: redis.Redis, namespace: str, queue: str) -> int:
    """Return how many replays wait in queue's lane."""
    return int(client.zcard(lane_key(namespace, queue)))


def replayed(message: dict[str, Any], *, queue: str) -> dict[str, Any]:
    """Return message as it goes into queue's lane: on queue itself, no eta, a fresh `redis_message_id`."""
    options = {key: value for key, value in message.get("options", {}).items() if key != "eta"}
    options["redis_message_id"] = str(uuid.uuid4())
    return {**message, "queue_name": queue, "options": options}


def add_to_lane(pipe: Any, namespace: str, queue: str, message: dict[str, Any], data: bytes, order: int) -> None:
    """Queue on pipe the command that puts message (encoded as data) into queue's lane (order: lane_order)."""
    pipe.eval(LANE_ADD_LUA, 2, lane_key(namespace, queue), lane_messages_key(namespace, queue),
              message["options"]["redis_message_id"], data, order, keys.wake_channel(namespace, queue))


class LanePromoter:
    """Moves replays from a lane onto its queue, paced (PROMOTE_LUA by EVALSHA, loaded on first use).

    Parameters:
      client: The broker's Redis client.
      namespace: The broker namespace.
      rate: Replays per second across all workers (WHISKYPAY_REPLAY_RATE), > 0.
    """

    def __init__(self, client: redis.Redis, namespace: str, rate: float = DEFAULT_REPLAY_RATE) -> None:
        self.script = client.register_script(PROMOTE_LUA)
        self.namespace = namespace
        self.rate = rate

    def promote(self, queue: str, room: int, *, now_ms: int) -> tuple[int, int]:
        """Move up to room replays of queue onto it; return (how many moved, ms until the next token).

        Raises redis.RedisError.
        """
        ns = self.namespace
        moved, wait_ms = self.script(
            keys=[lane_key(ns, queue), lane_messages_key(ns, queue), lane_pace_key(ns, queue),
                  keys.messages(ns, queue), keys.queue(ns, queue)],
            args=[now_ms, room, self.rate],
        )
        return int(moved), int(wait_ms)
