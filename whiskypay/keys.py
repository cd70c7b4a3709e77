"""Every Redis key and channel WhiskyPay reads or writes, named once; no other module formats a key.

Namespace `ns` (WHISKYPAY_NAMESPACE, default "whiskypay"), queue `Q` (e.g. "callbackQueue"), worker `W`
(a broker id). Dramatiq's layout, as its dispatch.lua writes it (we read it, and the re-drive writes it):

  ns:Q                   list of waiting message ids; workers LPOP from the head, so the head is next
  ns:Q.msgs              hash id -> encoded message, for every message of ns:Q not yet acked
  ns:Q.DQ                list of delayed messages (retries waiting out their backoff) not yet fetched;
  ns:Q.DQ.msgs           its messages (a delay queue is a queue: every function below takes it as Q)
  ns:Q.XQ                zset of dead-lettered ids, score = when they were dead-lettered (unix ms)
  ns:Q.XQ.msgs           hash id -> encoded message of the dead letters
  ns:__heartbeats__      zset of worker ids, score = last heartbeat (unix ms)
  ns:__acks__.W.Q        set of ids worker W fetched from Q and has not acked yet (Q.DQ likewise)

Ours:

  ns:whiskypay.events:A:M:E  string: the id of the message that reserved event_id E of merchant M for actor A
                               (SET NX EX, WHISKYPAY_IDEMPOTENCY_WINDOW_S, in the enqueue's own Lua call:
                               redis_broker.ENQUEUE_LUA); each part length-prefixed
                               (`13.send_callback:4.m_42:7.pay_123`, `length_prefixed`), M empty without one
  ns:whiskypay.sent:M:R        string: email R ("buyer", "merchant") of message M is being sent ("sending",
                               set before its SMTP exchange) or went out ("sent"; "1" from older versions); 8 days
  ns:whiskypay.stats:Q         hash of outcome counters: `completed` (delivered), `failed` (dead-lettered),
                               `started_at` (unix seconds of the first count: the counts are "since" then)
  ns:whiskypay.stats.merchants:Q  hash of the same counters per merchant: `completed:M`, `failed:M` (M a merchant_id)
  ns:whiskypay.stats.minute:Q:T   hash of minute T's attempts (T = unix seconds // 60): `delivered`, `failed`
                               (retried or dead-lettered); expires MINUTE_OUTCOMES_TTL_S after it was written
  ns:whiskypay.health:Q        hash of check_queue_health's state: `dead_letters_seen`, `open`, `checked_at`
  ns:whiskypay.health.tick:T   string: one run's lock of scheduled minute T ("2026-11-27T21:00Z")
  ns:wake:Q                    pub/sub channel: published by every enqueue on Q (redis_broker.ENQUEUE_LUA)

Merchant breakers (`whiskypay.breakers`). A breaker is named by its merchant_id (`m_42`), or for callbacks without
one by its normalised callback host (`host=shop.example`; "=" is never in a merchant_id). In Redis it is `M` =
`breaker_member(name)`, the tagged pair, length-prefixed: kind "merchant" with the merchant_id or kind "host" with
the host (`8.merchant:4.m_42`, `4.host:12.shop.example`), always the last part of the key: merchant_id
"shop.example" and host "shop.example" are two breakers. (Untagged records from older versions are not migrated:
breaker state is short-lived; see the README.)

  ns:whiskypay.breaker:M       hash: `state` (open|closed), `failures` (consecutive failed attempts), `since`,
                               `last_error`, `host`, `queue`, `held` (1: opened by an operator), `next_probe_at`,
                               `probe` (redis id of the probe in flight), `release_next`, `expire_next`,
                               `reported_since`, `last_failure_at` (times in unix ms); a closed one with only a
                               count and nothing parked expires a day after its last failure
  ns:whiskypay.parked:M        zset of M's parked redis ids, score = the message's `message_timestamp` (oldest first)
  ns:whiskypay.parked.msgs:M   hash redis id -> encoded message, for every member of the parked zset
  ns:whiskypay.parked.at:M     zset of the same ids, score = when each was first parked (for WHISKYPAY_PARK_MAX_MS)
  ns:whiskypay.breakers        set of every M with a breaker record (failures counted, open, or parked callbacks)
  ns:breakers                  pub/sub channel: "<state> M" when M's breaker changes (the workers' local view)

The delivery ledger (whiskypay/ledger.py), under L = ns:whiskypay.ledger: ; a payment id P is
`e<len(M)>:M:E` for event_id E of merchant M ("" when none), else `m:<message id>` (payment_id):

  L p:P           hash: the payment's ids, each job's state, masked recipients, the buyer address's digests
  L a:P           list: its attempts, oldest first, one compact JSON object each
  L w:P           string: its webhook's message as enqueued (for `whiskypay resend`; "[erased]" after `forget`)
  L t             zset: every payment id, score = first seen (unix ms): listing, reconcile, the cap
  L ev:E          hash: the payment ids of event_id E (one field per merchant; small hashes are compact)
  L m:MSG         string: the payment id of message MSG's job (when it belongs to an event's payment)
  L wh:W          string: the payment id of webhook-id W (when W is neither E nor msg_<message id>)
  L addr:D        hash: the payment ids holding a buyer address whose sha256 (lower-cased, 128 bits hex) is D
  L mer:M         zset: the payment ids of merchant_id M, score = first seen (unix ms): the dashboard's merchant
                  pages and filters; entries older than the retention are dropped by each write to it

The replay lane (whiskypay/replay.py):

  ns:whiskypay.replay:Q        zset: replays waiting to go onto Q (score = the order they were replayed in)
  ns:whiskypay.replay:Q.msgs   hash: their messages (redis id -> encoded message)
  ns:whiskypay.replay:Q.pace   hash: the lane's token bucket (`tokens`, `at` unix ms), shared by all workers

Functions take the queue name as given: a delay queue `Q.DQ` is a queue of its own, except for the outcome
counters, which count a delay queue's messages as its queue's.
"""

from __future__ import annotations

from dramatiq.common import dq_name, q_name, xq_name

#: The prefix of our own keys inside the namespace (Dramatiq's have none, or `__`).
OURS = "whiskypay"

#: Appended to Dramatiq's dispatch.lua (whose enqueue branch ends without returning): the wake-up is published
#: by the same script call that enqueues, so it costs no round trip. The channel is `wake_channel`'s.
WAKE_ON_ENQUEUE_LUA = b"""
if command == "enqueue" then
    redis.call("publish", namespace .. ":wake:" .. queue_name, "1")
end
"""


def text(value: object) -> str:
    """Return a Redis reply (bytes, or str from a client with decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def iso_ms(ms: int | None) -> str | None:
    """Return "2026-12-01T21:30:00.123Z" (UTC, millisecond precision) for unix milliseconds, or None.

    Every time in this layout is unix ms; this is how each reads wherever it is shown (CLI, JSON, console, the
    breaker's park reason). Milliseconds, not seconds: two attempts of one payment within a second still read
    apart and in order.
    """
    if ms is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# Dramatiq's layout.


def queue(namespace: str, queue_name: str) -> str:
    """Return the list of queue_name's waiting message ids."""
    return f"{namespace}:{queue_name}"


def messages(namespace: str, queue_name: str) -> str:
    """Return the hash of queue_name's messages not yet acked (id -> encoded message)."""
    return f"{queue(namespace, queue_name)}.msgs"


def delayed(namespace: str, queue_name: str) -> str:
    """Return the delay queue of queue_name (`Q.DQ`)."""
    return queue(namespace, dq_name(queue_name))


def dead_letters(namespace: str, queue_name: str) -> str:
    """Return the zset of queue_name's dead-lettered ids (`Q.XQ`, score = when, unix ms)."""
    return queue(namespace, xq_name(queue_name))


def dead_letter_messages(namespace: str, queue_name: str) -> str:
    """Return the hash of queue_name's dead-lettered messages (`Q.XQ.msgs`)."""
    return messages(namespace, xq_name(queue_name))


def heartbeats(namespace: str) -> str:
    """Return the zset of live workers (score = last heartbeat, unix ms)."""
    return f"{namespace}:__heartbeats__"


def acks(namespace: str, worker_id: str, queue_name: str) -> str:
    """Return the set of ids worker_id fetched from queue_name and has not acked yet."""
    return f"{namespace}:__acks__.{worker_id}.{queue_name}"


# Ours.


def length_prefixed(*parts: str) -> str:
    """Return parts joined unambiguously, each written `<length>.<text>`, joined by ":".

    ("a:b", "c") gives `3.a:b:1.c` and ("a", "b:c") `1.a:3.b:c`: the lengths tell where each part ends,
    whatever characters the parts hold.
    """
    return ":".join(f"{len(part)}.{part}" for part in parts)


def event_reservation(namespace: str, actor_name: str, merchant_id: str | None, event_id: str) -> str:
    """Return the key reserving event_id of merchant_id for actor_name (holds the first message's id).

    Scoped by merchant: two merchants' equal event ids are two events. Without a merchant the merchant part is
    empty (`0.`), which no merchant_id can be (they have 1 to 64 characters).
    """
    return f"{namespace}:{OURS}.events:{length_prefixed(actor_name, merchant_id or '', event_id)}"


def email_sent(namespace: str, message_id: str, role: str) -> str:
    """Return the marker of message_id's email for role: "sending" during its SMTP exchange, then "sent"."""
    return f"{namespace}:{OURS}.sent:{message_id}:{role}"


def outcome_counters(namespace: str, queue_name: str) -> str:
    """Return the hash of queue_name's outcome counters (a delay queue counts as its queue)."""
    return f"{namespace}:{OURS}.stats:{q_name(queue_name)}"


def merchant_outcome_counters(namespace: str, queue_name: str) -> str:
    """Return the hash of queue_name's outcome counters per merchant (fields `completed:M`, `failed:M`).

    The part before the first ":" is one of two fixed words, so the field reads back unambiguously whatever
    the merchant id holds.
    """
    return f"{namespace}:{OURS}.stats.merchants:{q_name(queue_name)}"


#: How long one minute's outcome hash is kept, in seconds: the dashboard's chart shows the last hour.
MINUTE_OUTCOMES_TTL_S = 2 * 60 * 60


def minute_outcomes(namespace: str, queue_name: str, minute: int) -> str:
    """Return the hash of queue_name's attempt outcomes in minute (unix seconds // 60): `delivered`, `failed`."""
    return f"{namespace}:{OURS}.stats.minute:{q_name(queue_name)}:{minute}"


def is_minute_outcomes(key: str) -> bool:
    """Return True if key is a `minute_outcomes` hash (its writer sets its expiry)."""
    return f":{OURS}.stats.minute:" in key


def merchant_outcome_field(outcome: str, merchant_id: str) -> str:
    """Return the field of merchant_id's count of outcome (`completed` or `failed`) in merchant_outcome_counters."""
    return f"{outcome}:{merchant_id}"


def health_state(namespace: str, queue_name: str) -> str:
    """Return the hash of queue_name's health state (check_queue_health)."""
    return f"{namespace}:{OURS}.health:{queue_name}"


def health_tick(namespace: str, tick: str) -> str:
    """Return the lock of one scheduled minute of check_queue_health."""
    return f"{namespace}:{OURS}.health.tick:{tick}"


def wake_channel(namespace: str, queue_name: str) -> str:
    """Return the pub/sub channel every enqueue on queue_name publishes to."""
    return f"{namespace}:wake:{queue_name}"


#: How a breaker keyed by callback host is named (by operators, reports and the code): `host=shop.example`. "=" is
#: never in a merchant_id (letters, digits and _ . : -), so no merchant_id can be taken for a host's breaker.
HOST_BREAKER_PREFIX = "host="


def breaker_member(name: str) -> str:
    """Return breaker name's stored identity: the tagged pair, length-prefixed: kind "merchant" with the merchant_id
    (`m_42` -> `8.merchant:4.m_42`) or kind "host" with the host (`host=shop.example` -> `4.host:12.shop.example`).

    The last part of every breaker key, the index's member and the announcements' subject: merchant_id
    "shop.example" and host "shop.example" are two identities whatever either holds.
    """
    if name.startswith(HOST_BREAKER_PREFIX):
        return length_prefixed("host", name[len(HOST_BREAKER_PREFIX):])
    return length_prefixed("merchant", name)


def breaker_name(member: str) -> str | None:
    """Return the breaker name of a stored identity (breaker_member's inverse), or None if member is not one (a
    record written before breakers were tagged: not migrated, breaker state is short-lived)."""
    parts: list[str] = []
    at = 0
    while len(parts) < 2:
        dot = member.find(".", at)
        if dot <= at or not member[at:dot].isdigit():
            return None
        end = dot + 1 + int(member[at:dot])
        if end > len(member):
            return None
        parts.append(member[dot + 1:end])
        if len(parts) == 1:
            if member[end:end + 1] != ":":
                return None
            at = end + 1
        elif end != len(member):
            return None
    kind, value = parts
    if kind == "merchant":
        return value
    return HOST_BREAKER_PREFIX + value if kind == "host" else None


def breaker_prefix(namespace: str) -> str:
    """Return the prefix of every breaker hash (the snapshot script appends an index member to it)."""
    return f"{namespace}:{OURS}.breaker:"


def parked_prefix(namespace: str) -> str:
    """Return the prefix of every parked zset (the snapshot script appends an index member to it)."""
    return f"{namespace}:{OURS}.parked:"


def breaker(namespace: str, merchant: str) -> str:
    """Return the hash of breaker merchant's state (state, failures, since, probe and release times...).

    merchant is a breaker name (`m_42`, `host=shop.example`); the key ends with its breaker_member.
    """
    return f"{breaker_prefix(namespace)}{breaker_member(merchant)}"


def parked(namespace: str, merchant: str) -> str:
    """Return the zset of merchant's parked redis ids, oldest message first."""
    return f"{parked_prefix(namespace)}{breaker_member(merchant)}"


def parked_messages(namespace: str, merchant: str) -> str:
    """Return the hash of merchant's parked messages (redis id -> encoded message)."""
    return f"{namespace}:{OURS}.parked.msgs:{breaker_member(merchant)}"


def parked_at(namespace: str, merchant: str) -> str:
    """Return the zset of merchant's parked redis ids scored by when each was first parked (unix ms)."""
    return f"{namespace}:{OURS}.parked.at:{breaker_member(merchant)}"


def breaker_index(namespace: str) -> str:
    """Return the set of merchants with a breaker record."""
    return f"{namespace}:{OURS}.breakers"


def breaker_channel(namespace: str) -> str:
    """Return the pub/sub channel on which breaker changes are announced."""
    return f"{namespace}:breakers"


# The delivery ledger.


def ledger_prefix(namespace: str) -> str:
    """Return the prefix of every ledger key (the ledger's Lua script builds a trimmed payment's keys from it)."""
    return f"{namespace}:{OURS}.ledger:"


def payment_id(*, event_id: str | None, merchant_id: str | None, message_id: str) -> str:
    """Return the id of the payment a job belongs to: unambiguous, since the merchant id is length-prefixed.

    `e<len>:<merchant>:<event>` for a job with an event id (merchant "" when none was given), else `m:<message>`.
    """
    if event_id:
        merchant = merchant_id or ""
        return f"e{len(merchant)}:{merchant}:{event_id}"
    return f"m:{message_id}"


def ledger_payment(namespace: str, pid: str) -> str:
    """Return the hash of payment pid."""
    return f"{ledger_prefix(namespace)}p:{pid}"


def ledger_attempts(namespace: str, pid: str) -> str:
    """Return the list of payment pid's attempts."""
    return f"{ledger_prefix(namespace)}a:{pid}"


def ledger_webhook_message(namespace: str, pid: str) -> str:
    """Return the string holding payment pid's webhook message (for `whiskypay resend`)."""
    return f"{ledger_prefix(namespace)}w:{pid}"


def ledger_time_index(namespace: str) -> str:
    """Return the zset of every payment id by first-seen time (unix ms)."""
    return f"{ledger_prefix(namespace)}t"


def ledger_event_index(namespace: str, event_id: str) -> str:
    """Return the set of payment ids (one per merchant) of event_id."""
    return f"{ledger_prefix(namespace)}ev:{event_id}"


def ledger_merchant_index(namespace: str, merchant_id: str) -> str:
    """Return the zset of merchant_id's payment ids by first-seen time (unix ms)."""
    return f"{ledger_prefix(namespace)}mer:{merchant_id}"


def ledger_message_index(namespace: str, message_id: str) -> str:
    """Return the string holding the payment id of message_id's job."""
    return f"{ledger_prefix(namespace)}m:{message_id}"


def ledger_webhook_index(namespace: str, webhook_id: str) -> str:
    """Return the string holding the payment id of a webhook-id."""
    return f"{ledger_prefix(namespace)}wh:{webhook_id}"


def address_digest(address: str) -> str:
    """Return sha256 of an address, lower-cased and stripped (128 bits, hex): the index never holds the address."""
    import hashlib

    return hashlib.sha256(address.strip().lower().encode()).hexdigest()[:32]


def ledger_address_index(namespace: str, address: str) -> str:
    """Return the set of payment ids that hold address."""
    return f"{ledger_prefix(namespace)}addr:{address_digest(address)}"


# The replay lane.


def replay_lane(namespace: str, queue_name: str) -> str:
    """Return the zset of queue_name's waiting replays (score = the order they were replayed in)."""
    return f"{namespace}:{OURS}.replay:{queue_name}"


def replay_lane_messages(namespace: str, queue_name: str) -> str:
    """Return the hash of queue_name's waiting replays' messages (redis id -> encoded message)."""
    return f"{replay_lane(namespace, queue_name)}.msgs"


def replay_lane_pace(namespace: str, queue_name: str) -> str:
    """Return the hash of queue_name's lane token bucket (`tokens`, `at`: unix ms of the last refill)."""
    return f"{replay_lane(namespace, queue_name)}.pace"
