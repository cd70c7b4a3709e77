"""Dead letters: decode and list a queue's dead-letter set, and re-drive one back (through the replay lane).

This is the domain under `whiskypay failed` and `whiskypay retry` (whiskypay/cli/ops.py prints what it returns).
It reads Dramatiq's Redis layout directly (`<queue>.XQ`, a sorted set of redis ids scored by when they died, and
`<queue>.XQ.msgs`, the hash of their encoded messages) and never imports `actors`, so it needs no worker
configuration. Decoding and building the re-driven message are pure and take plain values.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from whiskypay import keys
from whiskypay.ledger import DELIVERY_OPTION, MessageView, delivery_of, job_kind
from whiskypay.redaction import ADDRESS_FIELDS, mask_address, scrub_text, url_host
from whiskypay.retrying import attempts_made

if TYPE_CHECKING:
    import redis

#: Options a re-drive drops so the message starts over with a fresh attempt count and no stale failure.
#: `message_id` and the `webhook_id` option are kept: the merchant sees the same webhook-id as before.
REDRIVE_DROPPED_OPTIONS = frozenset(
    {"retries", "attempts", "traceback", "failure_class", "failed_at", "requeue_timestamp", "eta", "redis_message_id"}
)

#: How many dead letters are read from Redis per round trip.
BATCH_SIZE = 500

#: Move one dead letter back onto its queue, or into its queue's paced replay lane (whiskypay.replay), atomically:
#: a message is re-driven once, or not at all. Onto the queue it mirrors Dramatiq's dispatch.lua "enqueue" (HSET
#: into `<queue>.msgs`, RPUSH the id onto `<queue>`), so workers pick it up as any other message; into the lane it
#: HSETs the lane's messages and ZADDs the id to the lane. Either way it publishes on the queue's wake channel.
#: KEYS: XQ, XQ.msgs, the target's messages hash, the target (`<queue>` or the lane zset). ARGV: dead redis id,
#: the data read earlier, new redis id, new data, the lane order ("" onto the queue itself), the wake channel.
#: Returns 1 moved, 0 no longer dead-lettered (re-driven by someone else, or expired), -1 changed since it was
#: read (left alone).
#: Order matters (as in redis_broker.ENQUEUE_LUA): Redis does not roll a script back, so every write that can be
#: refused (an ACL denial, OOM, READONLY, WRONGTYPE) runs before the dead letter is deleted, last: a refused call
#: leaves the dead letter in place (at most an unlisted entry in the target's hash), never lost. A delete refused
#: after the write leaves the message re-driven and still dead-lettered: at worst a second re-drive, not a loss.
REDRIVE_LUA = """
if not redis.call("zscore", KEYS[1], ARGV[1]) then
    return 0
end
if redis.call("hget", KEYS[2], ARGV[1]) ~= ARGV[2] then
    return -1
end
redis.call("publish", ARGV[6], "1")
redis.call("hset", KEYS[3], ARGV[3], ARGV[4])
if ARGV[5] == "" then
    redis.call("rpush", KEYS[4], ARGV[3])
else
    redis.call("zadd", KEYS[4], ARGV[5], ARGV[3])
end
redis.call("zrem", KEYS[1], ARGV[1])
redis.call("hdel", KEYS[2], ARGV[1])
return 1
"""

RedriveResult = Literal["re-driven", "gone", "changed"]

#: Delete one dead letter only if it is still the one read. KEYS: XQ, XQ.msgs; ARGV: redis id, the data read.
#: Returns 1 deleted, 0 no longer dead-lettered, -1 changed since it was read (left alone).
DELETE_LUA = """
if not redis.call("zscore", KEYS[1], ARGV[1]) then
    return 0
end
if redis.call("hget", KEYS[2], ARGV[1]) ~= ARGV[2] then
    return -1
end
redis.call("zrem", KEYS[1], ARGV[1])
redis.call("hdel", KEYS[2], ARGV[1])
return 1
"""

DeleteResult = Literal["deleted", "gone", "changed"]

#: Positional argument order of our actors, for messages sent with args instead of kwargs.
_POSITIONAL = {
    "send_callback": ("callback_url", "email"),
    "send_email": ("buyer_email", "merchant_email"),
}



def encode_message(message: dict[str, Any]) -> bytes:
    """Encode a message dict the way Dramatiq's default JSONEncoder does (compact UTF-8 JSON)."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message as stored in `<queue>.XQ.msgs`, decoded when its JSON is readable.

    Parameters:
      queue: The queue whose dead-letter set holds it.
      redis_id: Its id in the XQ set and hash (Dramatiq's `redis_message_id`).
      raw: The stored bytes, exactly as read (the re-drive script checks them).
      dead_at_ms: Its score in the XQ set: when it was dead-lettered, unix milliseconds.
      message: The decoded message, or None when unreadable.
      problem: Why it is unreadable, or None.
    """

    queue: str
    redis_id: str
    raw: bytes
    dead_at_ms: int
    message: dict[str, Any] | None
    problem: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The message's options ({} when unreadable)."""
        options = (self.message or {}).get("options")
        return options if isinstance(options, dict) else {}

    @property
    def message_id(self) -> str:
        """Dramatiq's message id (stable across retries), or the Redis id when unreadable."""
        value = (self.message or {}).get("message_id")
        return value if isinstance(value, str) else self.redis_id

    @property
    def actor(self) -> str | None:
        """The actor name, or None when unreadable."""
        value = (self.message or {}).get("actor_name")
        return value if isinstance(value, str) else None

    @property
    def failed_at_ms(self) -> int:
        """When it failed: the `failed_at` option, else its XQ score; unix milliseconds."""
        value = self.options.get("failed_at")
        return value if isinstance(value, int) else self.dead_at_ms

    @property
    def attempts(self) -> int | None:
        """How many attempts were made (see retrying.attempts_made), or None when unreadable."""
        if self.message is None:
            return None
        return attempts_made(self.options)

    @property
    def error(self) -> str | None:
        """The last error ("ErrorClass: text"), with addresses masked and URLs cut to their host."""
        if self.message is None:
            return f"unreadable: {self.problem}"
        value = self.options.get("traceback")
        return scrub_text(str(value), addresses=self.addresses) if value else None

    @property
    def addresses(self) -> tuple[str, ...]:
        """The message's known addresses (its address arguments), for masking them by structure."""
        return tuple(value for name in sorted(ADDRESS_FIELDS) if isinstance(value := self.argument(name), str))

    def argument(self, name: str) -> object:
        """Return the actor argument called name, from kwargs or by its position in args."""
        message = self.message or {}
        kwargs = message.get("kwargs")
        if isinstance(kwargs, dict) and name in kwargs:
            return kwargs[name]
        args = message.get("args")
        order = _POSITIONAL.get(self.actor or "", ())
        if isinstance(args, list) and name in order and order.index(name) < len(args):
            return args[order.index(name)]
        return None

    @property
    def callback_host(self) -> str | None:
        """The callback URL's host (never the path or query), or None."""
        return url_host(self.argument("callback_url"))

    @property
    def merchant_id(self) -> str | None:
        """The `merchant_id` argument, or None when none was given."""
        value = self.argument("merchant_id")
        return value if isinstance(value, str) else None

    @property
    def buyer(self) -> str | None:
        """The buyer's email, masked ("b***@example.com"), or None."""
        for name in ("email", "buyer_email"):
            value = self.argument(name)
            if isinstance(value, str):
                return mask_address(value)
        return None

    @property
    def erased(self) -> bool:
        """Whether `whiskypay forget` erased an address from it (then it is not re-driven)."""
        return "erased_at" in self.options

    def summary(self) -> dict[str, Any]:
        """Return the fields safe to show (never the arguments), for tables and --json."""
        return {
            "message_id": self.message_id,
            "actor": self.actor,
            "queue": self.queue,
            "failed_at": keys.iso_ms(self.failed_at_ms),
            "failed_at_ms": self.failed_at_ms,
            "attempts": self.attempts,
            "last_error": self.error,
            "callback_host": self.callback_host,
            "merchant_id": self.merchant_id,
            "buyer": self.buyer,
            "webhook_id": self.options.get("webhook_id"),
            "readable": self.message is not None,
        }


def decode_dead_letter(queue: str, redis_id: str, raw: bytes, dead_at_ms: int) -> DeadLetter:
    """Decode one stored dead letter; unreadable JSON gives a DeadLetter with `message=None` and the problem."""
    try:
        message = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return DeadLetter(queue, redis_id, raw, dead_at_ms, None, f"not JSON ({type(exc).__name__})")
    if not isinstance(message, dict) or not isinstance(message.get("actor_name"), str):
        return DeadLetter(queue, redis_id, raw, dead_at_ms, None, "not a Dramatiq message")
    return DeadLetter(queue, redis_id, raw, dead_at_ms, message)


def redriven(message: dict[str, Any], *, queue: str, redis_message_id: str) -> dict[str, Any]:
    """Return a copy of a dead-lettered message that starts over on queue with a fresh attempt count.

    The failure options (retries, attempts, traceback, failure_class, failed_at, requeue_timestamp, eta) are dropped;
    message_id and every other option, webhook_id included, are kept.

    Parameters:
      message: The decoded dead letter.
      queue: The queue to put it on (its canonical name, never a `.DQ`).
      redis_message_id: Its new id in Redis (Dramatiq gives each enqueue a fresh one).
    """
    options = {key: value for key, value in message.get("options", {}).items() if key not in REDRIVE_DROPPED_OPTIONS}
    options["redis_message_id"] = redis_message_id
    if job_kind(str(message.get("actor_name"))) == "webhook":
        # A new delivery of the webhook for the ledger: its attempts count from 1 again (whiskypay.ledger).
        options[DELIVERY_OPTION] = delivery_of(MessageView(message)) + 1
    return {**message, "queue_name": queue, "options": options}


def dead_letter_count(client: redis.Redis, namespace: str, queue: str) -> int:
    """Return how many messages queue's dead-letter set holds."""
    return int(client.zcard(keys.dead_letters(namespace, queue)))


def iter_dead_letters(
    client: redis.Redis,
    namespace: str,
    queue: str,
    *,
    newest_first: bool = True,
    limit: int | None = None,
    start: int = 0,
    needle: bytes | None = None,
) -> Iterator[DeadLetter]:
    """Yield queue's dead letters in the order they were dead-lettered, reading BATCH_SIZE per round trip.

    Parameters:
      newest_first: Newest first (for reading) or oldest first (for re-driving in the original order).
      limit: The most to read; None for all.
      start: How many to skip first (a page's offset): read by rank, not by reading the ones before.
      needle: Only decode (and yield) those whose stored bytes contain it (a cheap prefilter for a filter).
    """
    end = -1 if limit is None else start + limit - 1
    xq, xq_msgs = keys.dead_letters(namespace, queue), keys.dead_letter_messages(namespace, queue)
    ids = cast(list[tuple[bytes, float]], client.zrange(xq, start, end, desc=newest_first, withscores=True))
    for start in range(0, len(ids), BATCH_SIZE):
        batch = ids[start : start + BATCH_SIZE]
        raws = cast(list[bytes | None], client.hmget(xq_msgs, [redis_id for redis_id, _ in batch]))
        for (redis_id, score), raw in zip(batch, raws, strict=True):
            if raw is not None and (needle is None or needle in raw):  # None: re-driven or expired since the ZRANGE
                yield decode_dead_letter(queue, keys.text(redis_id), raw, int(score))


def redrive(client: redis.Redis, namespace: str, letter: DeadLetter, *, new_id: str | None = None) -> RedriveResult:
    """Move one readable dead letter back onto its queue atomically (REDRIVE_LUA); return what happened.

    The dashboard's Requeue (one message, by hand) uses it; `whiskypay retry` goes through the replay lane
    (redrive_paced).

    Parameters:
      letter: A readable dead letter (`letter.message` is not None).
      new_id: Its new Redis id; a fresh uuid4 by default.
    """
    return _redrive(client, namespace, letter, new_id=new_id, order=None)[0]


def redrive_paced(
    client: redis.Redis, namespace: str, letter: DeadLetter, *, order: int, new_id: str | None = None
) -> tuple[RedriveResult, dict[str, Any]]:
    """Move one readable dead letter into its queue's paced replay lane atomically (whiskypay.replay).

    Workers take it after fresh work, at most WHISKYPAY_REPLAY_RATE per second. Returns what happened and the
    message as re-driven (for the delivery ledger).

    Parameters:
      order: Its place in the lane (whiskypay.replay.lane_order).
      new_id: Its new Redis id; a fresh uuid4 by default.
    """
    return _redrive(client, namespace, letter, new_id=new_id, order=order)


def _redrive(
    client: redis.Redis, namespace: str, letter: DeadLetter, *, new_id: str | None, order: int | None
) -> tuple[RedriveResult, dict[str, Any]]:
    if letter.message is None:
        raise ValueError(f"dead letter {letter.redis_id} is unreadable ({letter.problem}); it cannot be re-driven")
    new_id = new_id or str(uuid.uuid4())
    message = redriven(letter.message, queue=letter.queue, redis_message_id=new_id)
    data = encode_message(message)
    if order is None:  # onto the queue itself
        target = [keys.messages(namespace, letter.queue), keys.queue(namespace, letter.queue)]
    else:
        target = [keys.replay_lane_messages(namespace, letter.queue), keys.replay_lane(namespace, letter.queue)]
    names = [keys.dead_letters(namespace, letter.queue), keys.dead_letter_messages(namespace, letter.queue), *target]
    args = [letter.redis_id, letter.raw, new_id, data, "" if order is None else order,
            keys.wake_channel(namespace, letter.queue)]
    moved = int(client.register_script(REDRIVE_LUA)(keys=names, args=args))
    result: RedriveResult = {1: "re-driven", 0: "gone", -1: "changed"}[moved]  # type: ignore[assignment]
    return result, message


def delete_dead_letter(client: redis.Redis, namespace: str, letter: DeadLetter) -> DeleteResult:
    """Delete one dead letter atomically (DELETE_LUA) if it is unchanged since it was read; return what happened."""
    names = [keys.dead_letters(namespace, letter.queue), keys.dead_letter_messages(namespace, letter.queue)]
    deleted = int(client.register_script(DELETE_LUA)(keys=names, args=[letter.redis_id, letter.raw]))
    return {1: "deleted", 0: "gone", -1: "changed"}[deleted]  # type: ignore[return-value]
