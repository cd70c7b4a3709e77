"""What the operator console's pages show, read from Redis: plain JSON-ready dicts, bounded reads only.

Every function takes a redis client and the broker namespace, and reads a bounded amount per call: counts
(LLEN/ZCARD/SCARD), one script call for the breakers, one HGETALL of the per-merchant counters, a range of a
sorted set (ZRANGE with a limit), at most SCAN_LIMIT entries of an index when a filter has to look at entries
one by one. Nothing here runs KEYS or SCAN over the keyspace.

The delivery ledger (issue 11, `whiskypay.ledger`) is optional: `ledger()` returns its module, or None where it is
not installed, and the pages that need it say so.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, cast

from whiskypay import keys
from whiskypay.breakers import BreakerStore
from whiskypay.cli.ops import parked_by_queue, redrive_one
from whiskypay.dead_letters import (
    DeadLetter,
    dead_letter_count,
    decode_dead_letter,
    delete_dead_letter,
    iter_dead_letters,
)
from whiskypay.queue_stats import queue_counts
from whiskypay.replay import lane_size

if TYPE_CHECKING:
    import redis

#: Rows per page of /events and /dead-letters.
PAGE_SIZE = 50

#: The most index entries a filtered page looks at (newest first) before it stops and offers "older".
SCAN_LIMIT = 1000

#: How many of the newest dead letters a merchant's page looks at (/dead-letters?merchant= pages through them all).
MERCHANT_SCAN = 500

#: The ledger hash fields `Payment.states()` and `merchant_id` read (the job ids, each job's state, the merchant).
STATE_FIELDS = ("w.mid", "w.state", "e.mid", "e.b.state", "e.m.state", "mer")

#: Minutes of the overview's delivered / failed chart.
CHART_MINUTES = 60

#: Payments (newest first) whose webhook delivery times give the overview's latency percentiles.
LATENCY_SAMPLE = 500

#: What a page says where the delivery ledger is not installed.
NO_LEDGER = (
    "The delivery ledger (issue 11, whiskypay.ledger) is not part of this install, so per-payment records, attempts "
    "and latency are not available here."
)


def ledger() -> ModuleType | None:
    """Return the delivery ledger's module (`whiskypay.ledger`), or None where it has not landed."""
    try:
        return importlib.import_module("whiskypay.ledger")
    except ImportError:
        return None



def _percentile(values: list[int], fraction: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# --------------------------------------------------------------------------------------------------------------------
# overview
# --------------------------------------------------------------------------------------------------------------------


def minute_chart(client: redis.Redis, namespace: str, queues: Iterable[str], *, now_s: float) -> list[dict[str, Any]]:
    """Return the last CHART_MINUTES minutes' delivered and failed attempts of queues, oldest first (one pipeline)."""
    this_minute = int(now_s) // 60
    minutes = list(range(this_minute - CHART_MINUTES + 1, this_minute + 1))
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for minute in minutes:
        for queue in queues:
            pipe.hmget(keys.minute_outcomes(namespace, queue, minute), ["delivered", "failed"])
    replies = iter(pipe.execute())
    chart = []
    for minute in minutes:
        delivered = failed = 0
        for _ in queues:
            d, f = next(replies)
            delivered, failed = delivered + int(d or 0), failed + int(f or 0)
        chart.append({"minute": time.strftime("%H:%M", time.gmtime(minute * 60)), "delivered": delivered,
                      "failed": failed})  # fmt: skip
    return chart


def latency(client: redis.Redis, namespace: str) -> dict[str, Any] | None:
    """Return p50/p95 of the time from enqueue to delivered for the newest LATENCY_SAMPLE webhooks, or None."""
    module = ledger()
    if module is None:
        return None
    pids = [keys.text(pid) for pid in client.zrevrange(module.time_index_key(namespace), 0, LATENCY_SAMPLE - 1)]
    samples = []
    for payment in module.load_payments(client, namespace, pids):
        if payment.webhook_state != "delivered":
            continue
        at = [row.get("at") for row in payment.rows if row.get("j") == "w" and row.get("o") == "delivered"]
        at = [value for value in at if isinstance(value, int)]
        if at:
            samples.append(max(0, min(at) - payment.created_ms))
    return {"p50_ms": _percentile(samples, 0.5), "p95_ms": _percentile(samples, 0.95), "sample": len(samples)}


def overview(
    client: redis.Redis, namespace: str, queues: Iterable[str], *, now_s: float | None = None
) -> dict[str, Any]:
    """Return the overview: per queue counts and oldest wait, the last hour's chart, the delivery latency."""
    now_s = time.time() if now_s is None else now_s
    queues = sorted(queues)
    parked = parked_by_queue(client, namespace)
    rows = []
    for queue in queues:
        counts = queue_counts(client, namespace, queue, now_ms=int(now_s * 1000))
        completed, failed = client.hmget(keys.outcome_counters(namespace, queue), ["completed", "failed"])
        rows.append({
            "queue": queue, "waiting": counts.waiting, "delayed": counts.delayed, "in_flight": counts.in_flight,
            "parked": parked.get(queue, 0), "dead_lettered": counts.dead_letters,
            "replays_waiting": lane_size(client, namespace, queue),
            "oldest_wait_ms": counts.oldest_wait_ms, "completed": int(completed or 0), "failed": int(failed or 0),
        })  # fmt: skip
    return {"queues": rows, "chart": minute_chart(client, namespace, queues, now_s=now_s),
            "latency": latency(client, namespace)}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# merchants
# --------------------------------------------------------------------------------------------------------------------

MerchantSort = Literal["merchant", "deliveries", "failure_rate", "state", "parked"]

#: The columns /merchants sorts by, and whether each sorts highest first.
MERCHANT_SORTS: dict[str, bool] = {"merchant": False, "deliveries": True, "failure_rate": True, "state": True,
                                   "parked": True}  # fmt: skip


def merchants(
    client: redis.Redis, namespace: str, queues: Iterable[str], *, sort: str = "state"
) -> list[dict[str, Any]]:
    """Return every merchant with counters or a breaker record: deliveries, failure rate, breaker, parked, last error.

    Deliveries and dead letters come from OutcomeCounters' per-merchant hash (merchants sending a `merchant_id`,
    since the counters started); breaker state, parked count and last error from the breakers (merchant_id, else
    callback host). One HGETALL per queue and one script call.
    """
    found: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return found.setdefault(name, {"merchant": name, "delivered": 0, "dead_lettered": 0, "state": "closed",
                                       "failures": 0, "parked": 0, "last_error": None, "since_ms": None,
                                       "held": False, "host": None})  # fmt: skip

    for queue in queues:
        for field, value in client.hgetall(keys.merchant_outcome_counters(namespace, queue)).items():
            outcome, _, merchant = keys.text(field).partition(":")
            if merchant and outcome in ("completed", "failed"):
                entry(merchant)["delivered" if outcome == "completed" else "dead_lettered"] += int(value)
    for breaker in BreakerStore(client, namespace).snapshot().values():
        row = entry(breaker.merchant)
        row.update({"state": breaker.state, "failures": breaker.failures, "parked": breaker.parked,
                    "last_error": breaker.last_error, "since_ms": breaker.since_ms, "held": breaker.held,
                    "host": breaker.host})  # fmt: skip
    for row in found.values():  # the fields of `whiskypay merchants --json`, and the counters'
        row["since"] = keys.iso_ms(row["since_ms"])
        total = row["delivered"] + row["dead_lettered"]
        row["deliveries"] = total
        row["failure_rate"] = round(row["dead_lettered"] / total, 4) if total else None
    rows = list(found.values())
    key = sort if sort in MERCHANT_SORTS else "state"
    rows.sort(key=lambda r: r["merchant"])
    if key == "state":
        rows.sort(key=lambda r: (r["state"] != "open", -r["parked"], -(r["failure_rate"] or 0)))
    elif key != "merchant":
        rows.sort(key=lambda r: r[key] if r[key] is not None else -1, reverse=True)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# events (the ledger)
# --------------------------------------------------------------------------------------------------------------------


def payment_row(payment: Any) -> dict[str, Any]:
    """Return one /events row of a ledger payment (the `events --json` object plus a few summary fields)."""
    last = payment.last_row() or {}
    data: dict[str, Any] = payment.to_json()
    data.update({
        "id": payment.label, "pid": payment.pid, "webhook_state": payment.webhook_state,
        "buyer_email_state": payment.email_state("buyer"), "merchant_email_state": payment.email_state("merchant"),
        "attempts": len(payment.rows), "last_status": last.get("c"), "last_error": last.get("err"),
        "created_ms": payment.created_ms,
    })  # fmt: skip
    return data


def events(client: redis.Redis, namespace: str, *, query: str = "", merchant: str = "", state: str = "",
           cursor: int = 0, scan: int = SCAN_LIMIT) -> dict[str, Any]:  # fmt: skip
    """Return one page of payments newest first, or those an id names, with `next` (a cursor) and `scanned`.

    query: an event id, webhook-id or message id (the ledger's indexes: no scan). merchant: that merchant's index
    (`mer:M`), read by rank. state filters the (time or merchant) index newest first, looking at `scan` entries
    at most per page; `next` continues after them.
    """
    module = ledger()
    if module is None:
        return {"available": False, "rows": [], "next": None, "scanned": 0}
    if query:
        pids = module.resolve(client, namespace, query, merchant or None)
        found = module.load_payments(client, namespace, pids)
        if merchant:
            found = [payment for payment in found if payment.merchant_id == merchant]
        return {"available": True, "rows": [payment_row(p) for p in found], "next": None, "scanned": len(pids)}
    # A merchant's payments have their own index (newest first), so only a state filter looks at entries one by one.
    index = module.merchant_index_key(namespace, merchant) if merchant else module.time_index_key(namespace)
    if not state:
        pids = [keys.text(pid) for pid in client.zrevrange(index, cursor, cursor + PAGE_SIZE - 1)]
        page = [payment_row(p) for p in module.load_payments(client, namespace, pids)]
        more = len(pids) == PAGE_SIZE
        return {"available": True, "rows": page, "next": cursor + PAGE_SIZE if more else None, "scanned": len(pids)}
    rows: list[dict[str, Any]] = []
    position, batch = cursor, 500
    while position - cursor < scan:
        pids = [keys.text(pid) for pid in client.zrevrange(index, position, position + min(batch, scan) - 1)]
        if not pids:
            return {"available": True, "rows": rows, "next": None, "scanned": position - cursor}
        # First only the fields that give the payments' states, then the whole of those that match.
        pipe = client.pipeline(transaction=False)
        for pid in pids:
            pipe.hmget(module.payment_key(namespace, pid), STATE_FIELDS)
        heads = [module.Payment(pid, {name: keys.text(v) for name, v in zip(STATE_FIELDS, values, strict=True)
                                      if v is not None})
                 for pid, values in zip(pids, pipe.execute(), strict=True) if any(values)]  # fmt: skip
        for offset, head in enumerate(heads):
            if (merchant and head.merchant_id != merchant) or (state and state not in head.states()):
                continue
            rows.extend(payment_row(p) for p in module.load_payments(client, namespace, [head.pid]))
            if len(rows) >= PAGE_SIZE:
                position += pids.index(head.pid) + 1 if head.pid in pids else offset + 1
                return {"available": True, "rows": rows, "next": position, "scanned": position - cursor}
        position += len(pids)
    return {"available": True, "rows": rows, "next": position, "scanned": position - cursor}


def event(client: redis.Redis, namespace: str, ident: str, merchant: str = "") -> list[Any] | None:
    """Return the ledger payments ident names (usually one), or None where the ledger is not installed."""
    module = ledger()
    if module is None:
        return None
    found = module.load_payments(client, namespace, module.resolve(client, namespace, ident, merchant or None))
    return [payment for payment in found if not merchant or payment.merchant_id == merchant]


# --------------------------------------------------------------------------------------------------------------------
# dead letters
# --------------------------------------------------------------------------------------------------------------------


def letter_row(letter: DeadLetter) -> dict[str, Any]:
    """Return one /dead-letters row: `whiskypay failed --json`'s object, its redis id and the reason in full."""
    return {**letter.summary(), "redis_id": letter.redis_id, "ref": f"{letter.queue}:{letter.redis_id}"}


def dead_letters(client: redis.Redis, namespace: str, queues: Iterable[str], *, queue: str = "", merchant: str = "",
                 message_id: str = "", cursor: int = 0, scan: int = SCAN_LIMIT) -> dict[str, Any]:  # fmt: skip
    """Return one page of dead letters, newest first, with the total of each queue.

    Each queue shown is read by rank from cursor: PAGE_SIZE of them, or, with merchant or message_id, the next
    `scan` (only those whose stored bytes hold the value are decoded); `scanned` says how many were looked at.
    """
    shown = [queue] if queue else sorted(queues)
    totals = {name: dead_letter_count(client, namespace, name) for name in shown}
    filtered = bool(merchant or message_id)
    window = scan if filtered else PAGE_SIZE
    needle = (merchant or message_id).encode() if filtered else None
    rows: list[dict[str, Any]] = []
    for name in shown:
        for letter in iter_dead_letters(client, namespace, name, limit=window, start=cursor, needle=needle):
            if merchant and merchant not in (letter.merchant_id, letter.callback_host):
                continue
            if message_id and message_id not in (letter.message_id, letter.redis_id):
                continue
            rows.append(letter_row(letter))
    rows.sort(key=lambda row: row["failed_at_ms"], reverse=True)
    scanned = sum(max(0, min(total - cursor, window)) for total in totals.values())
    more = any(total > cursor + window for total in totals.values())
    return {"rows": rows, "totals": totals, "next": cursor + window if more else None, "scanned": scanned,
            "filtered": filtered}  # fmt: skip


def _letter(client: redis.Redis, namespace: str, ref: str) -> DeadLetter | None:
    queue, _, redis_id = ref.partition(":")
    raw = cast("bytes | None", client.hget(keys.dead_letter_messages(namespace, queue), redis_id))
    score = client.zscore(keys.dead_letters(namespace, queue), redis_id)
    if raw is None or score is None:
        return None
    return decode_dead_letter(queue, redis_id, raw, int(score))


class _Redrive:
    """Re-drives dead letters one by one exactly as `whiskypay retry` does (`whiskypay.cli.ops.redrive_one`: the paced
    replay lane, atomically, entered in the ledger), counting how each ended."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        from whiskypay.cli.ledger import ledger_config
        from whiskypay.ledger import LedgerWriter

        self.client, self.namespace = client, namespace
        self.config, self.writer = ledger_config(namespace), LedgerWriter(client)
        self.now_ms = int(time.time() * 1000)
        self.counts: dict[str, int] = {}

    def __call__(self, letter: DeadLetter | None) -> None:
        from whiskypay.replay import lane_order

        if letter is None:
            result = "gone"
        else:
            order = lane_order(self.now_ms, sum(self.counts.values()))
            result = redrive_one(self.client, self.namespace, letter, writer=self.writer, config=self.config,
                                 order=order, now_ms=self.now_ms)  # fmt: skip
        self.counts[result] = self.counts.get(result, 0) + 1


def redrive_refs(client: redis.Redis, namespace: str, refs: Iterable[str], queues: Iterable[str]) -> dict[str, int]:
    """Re-drive the dead letters refs name ("queue:redis_id") like `whiskypay retry --id`.

    Returns how many ended each way: re-driven, gone, changed, unreadable, erased.
    """
    allowed = set(queues)
    redrive = _Redrive(client, namespace)
    for ref in refs:
        redrive(_letter(client, namespace, ref) if ref.partition(":")[0] in allowed else None)
    return redrive.counts


def redrive_all(client: redis.Redis, namespace: str, queue: str, *, merchant: str = "") -> dict[str, int]:
    """Re-drive every dead letter of queue (of merchant, when given), oldest first, like `whiskypay retry --all`."""
    redrive = _Redrive(client, namespace)
    needle = merchant.encode() if merchant else None
    for letter in iter_dead_letters(client, namespace, queue, newest_first=False, needle=needle):
        if merchant and merchant not in (letter.merchant_id, letter.callback_host):
            continue
        redrive(letter)
    return redrive.counts


def delete_refs(client: redis.Redis, namespace: str, refs: Iterable[str], queues: Iterable[str]) -> dict[str, int]:
    """Delete the dead letters refs name, each only if unchanged since read (`dead_letters.delete_dead_letter`)."""
    allowed = set(queues)
    counts: dict[str, int] = {}
    for ref in refs:
        letter = _letter(client, namespace, ref) if ref.partition(":")[0] in allowed else None
        result = "gone" if letter is None else delete_dead_letter(client, namespace, letter)
        counts[result] = counts.get(result, 0) + 1
    return counts


def letters_of_message(client: redis.Redis, namespace: str, queue: str, message_id: str) -> list[DeadLetter]:
    """Return queue's dead letters of message_id among its newest SCAN_LIMIT (for an event page's Re-drive)."""
    return [letter for letter in iter_dead_letters(client, namespace, queue, limit=SCAN_LIMIT,
                                                   needle=message_id.encode())
            if letter.message_id == message_id]  # fmt: skip
