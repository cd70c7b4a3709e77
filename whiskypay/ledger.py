"""The delivery ledger: every attempt of every webhook and email, kept in Redis and searchable (issue 11).

A *payment* is the callback and the email job sent with the same `event_id` (and `merchant_id`); a job sent
without an `event_id` is a payment of its own, under its message id. One payment is:

  P  hash   the payment's ids, each job's state, the masked email recipients, the digests of its buyer's
            address (so the cap can find the index entries pointing at it)
  A  list   its attempts, oldest first, one compact JSON object each (at most MAX_ATTEMPTS, the newest kept)
  W  string its webhook's message as enqueued, for `whiskypay resend`

and the indexes that find it without KEYS or SCAN:

  T             zset   every payment id, score = when it was first seen (unix ms): `events`, `reconcile`, the cap
  ev:<event>    hash   the payment ids of an event id (one field per merchant that used it)
  mer:<merchant> zset  the payment ids of a merchant_id, score = first seen (the dashboard's merchant pages)
  m:<message>   string the payment id of a job's message id (only when the payment is an event's)
  wh:<webhook>  string the payment id of a webhook-id that is neither the event id nor `msg_<message id>`
  addr:<sha256> hash   the payment ids that hold a buyer's address (sha256 of it lower-cased), for `forget`

Every key expires WHISKYPAY_LEDGER_RETENTION_S after it was created (retention counts from the payment's
first record, not from its last attempt), and the time index holds at most WHISKYPAY_LEDGER_MAX_PAYMENTS
payments: a write that adds a payment beyond the cap deletes the oldest ones with all their keys, so a full
ledger drops its oldest records instead of filling Redis.

All writes run the ledger_write function (LEDGER_FUNCTION_LUA), except the `pending` record at `send()`: that one
is LEDGER_PENDING_LUA (the same record, leaner), inside the enqueue's own script
(whiskypay.redis_broker.ENQUEUE_WITH_LEDGER_LUA). One write per attempt after the ack (see middleware/ledger.py),
sent with the acks of the worker process's Settler (whiskypay.settler.SETTLE_LUA). A ledger write that fails is
logged by the caller and never fails or repeats a delivery.

Job states (whiskypay.outcomes): pending, retrying, delivered (emails: sent), failed (dead-lettered),
parked. An attempt's outcome: delivered, failed (deferrals are not attempts and are not recorded).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from whiskypay import keys
from whiskypay.redaction import error_summary, mask_address, scrub_text, url_host

if TYPE_CHECKING:
    import redis
    from dramatiq import Message

Kind = Literal["webhook", "email"]
Role = Literal["buyer", "merchant"]
State = Literal["pending", "retrying", "delivered", "sent", "failed", "parked"]

#: Every state a job can be in (`sent` is an email's `delivered`).
STATES: tuple[str, ...] = ("pending", "retrying", "delivered", "sent", "failed", "parked")

#: The actors the ledger records, and what kind of job each is.
KINDS: dict[str, Kind] = {"send_callback": "webhook", "send_email": "email"}

#: The email roles of one send_email job, in the order they are sent, with the argument holding the address.
ROLES: tuple[tuple[Role, str], ...] = (("buyer", "buyer_email"), ("merchant", "merchant_email"))

#: The most attempts kept per payment (the newest); a webhook retried past it keeps its latest attempts.
MAX_ATTEMPTS = 100

#: The most of a merchant's response kept with an attempt, in bytes (then made printable and scrubbed).
RESPONSE_EXCERPT_BYTES = 1024

#: The longest error text kept with an attempt, in characters.
ERROR_CHARS = 300

#: What `forget` writes in place of an erased address.
ERASED = "[erased]"

#: The message option carrying a webhook's delivery number: 1 for the first, +1 for each resend or re-drive.
DELIVERY_OPTION = "ledger_delivery"

# Keys: named in whiskypay/keys.py (its docstring draws the layout); these names are the ledger's for them.
ledger_prefix = keys.ledger_prefix
payment_id = keys.payment_id
payment_key = keys.ledger_payment
attempts_key = keys.ledger_attempts
time_index_key = keys.ledger_time_index
event_index_key = keys.ledger_event_index
message_index_key = keys.ledger_message_index
webhook_index_key = keys.ledger_webhook_index
merchant_index_key = keys.ledger_merchant_index
webhook_message_key = keys.ledger_webhook_message
address_index_key = keys.ledger_address_index


# --------------------------------------------------------------------------------------------------------------------
# The one write script
# --------------------------------------------------------------------------------------------------------------------

#: One ledger write. KEYS: payment hash, attempts list, time index, stored webhook message, then the index keys
#: named in the op. ARGV[1]: the op (JSON): now, ttl (ms), cap, max_attempts, prefix, pid; entered (a field
#: that, present, says the job's pending record was written: then init, msg and index are skipped); msg
#: (store ARGV[2], the encoded message, as the webhook's message unless one is stored); set (pairs set
#: always); states ([field, state, delivery, force]); attempts (JSON rows). ARGV[3] (JSON, decoded only when
#: needed): init (field, value pairs set only where absent) and index ([type "str"|"map"|"zset", key, value, init
#: field it depends on or false]). A state write never goes back to an earlier delivery of the webhook,
#: never moves `delivered`/`sent` back within one delivery, and writes `pending` only where there is no state
#: yet, on a new delivery, or when forced (an email job re-driven). The cap deletes a payment with every
#: index entry pointing at it, found from its fields (ids, digests). Every value in the hash stays under 64
#: bytes, so Redis keeps it in its compact (listpack) encoding.
LEDGER_FUNCTION_LUA = """
local function ledger_write(KEYS, ARGV)
    local op = cjson.decode(ARGV[1])
    local P, A, T, W = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    local ttl = op.ttl
    local existed = redis.call("exists", P) == 1
    -- Every key of a payment expires with it: the hash keeps the TTL it got when created (retention counts
    -- from the first record), and its other keys and index entries live at least as long (an index shared by
    -- several payments, an address's or an event's, as long as the longest-lived of them).
    local left = ttl
    local function keep(key)
        local current = redis.call("pttl", key)
        if current ~= -2 and current < left then redis.call("pexpire", key, left) end
    end
    -- An attempt of a job entered at send() skips what its pending record already wrote (ids, indexes): their
    -- JSON (ARGV[3]) is not even decoded then.
    local entered = existed and op.entered and redis.call("hexists", P, op.entered) == 1
    local fresh = {}
    if not entered then
        local ids = cjson.decode(ARGV[3])
        op.init, op.index = ids.init, ids.index
        if not existed then
            redis.call("hset", P, unpack(op.init))
            for i = 1, #op.init, 2 do fresh[op.init[i]] = true end
        else
            for i = 1, #op.init, 2 do
                if redis.call("hsetnx", P, op.init[i], op.init[i + 1]) == 1 then fresh[op.init[i]] = true end
            end
        end
    end
    if #op.set > 0 then redis.call("hset", P, unpack(op.set)) end
    local p_left = redis.call("pttl", P)
    if p_left < 0 then redis.call("pexpire", P, ttl) else left = p_left end
    if op.msg and not entered and redis.call("set", W, ARGV[2], "NX") then
        keep(W)
    end
    for _, s in ipairs(op.states) do
        local fieldname, state, delivery = s[1], s[2], s[3]
        local ok, newer = true, false
        if delivery > 0 then
            local current = tonumber(redis.call("hget", P, "w.n") or "0")
            if delivery < current then ok = false elseif delivery > current then newer = true end
        end
        if ok and not newer then
            local old = redis.call("hget", P, fieldname)
            if old == "delivered" or old == "sent" then
                ok = false
            elseif old and state == "pending" and not s[4] then
                ok = false
            end
        end
        if ok then
            redis.call("hset", P, fieldname, state)
            if newer then redis.call("hset", P, "w.n", delivery) end
        end
    end
    if #op.attempts > 0 then
        redis.call("rpush", A, unpack(op.attempts))
        redis.call("ltrim", A, -op.max_attempts, -1)
    end
    if #op.attempts > 0 then keep(A) end
    if not entered then
        for _, e in ipairs(op.index) do
            if (not e[4]) or fresh[e[4]] then
                if e[1] == "str" then
                    redis.call("set", e[2], e[3])
                elseif e[1] == "zset" then  -- by first-seen time; members past the retention go as it grows
                    redis.call("zadd", e[2], "NX", op.now, e[3])
                    redis.call("zremrangebyscore", e[2], "-inf", op.now - ttl)
                else
                    redis.call("hset", e[2], e[3], "1")
                end
                keep(e[2])
            end
        end
        redis.call("zadd", T, "NX", op.now, op.pid)
    end
    if not existed then
        redis.call("zremrangebyscore", T, "-inf", op.now - ttl)
        local n = redis.call("zcard", T)
        if n > op.cap then
            local old = redis.call("zpopmin", T, math.min(n - op.cap, 16))
            for i = 1, #old, 2 do
                local pid = old[i]
                local pk = op.prefix .. "p:" .. pid
                local f = redis.call("hmget", pk, "eid", "w.mid", "e.mid", "w.wid", "w.ad", "e.ad", "mer")
                if f[1] then redis.call("hdel", op.prefix .. "ev:" .. f[1], pid) end
                if f[7] then redis.call("zrem", op.prefix .. "mer:" .. f[7], pid) end
                for _, name in ipairs({"m:" .. (f[2] or ""), "m:" .. (f[3] or ""), "wh:" .. (f[4] or "")}) do
                    local k = op.prefix .. name
                    if redis.call("get", k) == pid then redis.call("del", k) end
                end
                for _, digest in ipairs({f[5] or "", f[6] or ""}) do
                    if digest ~= "" then redis.call("hdel", op.prefix .. "addr:" .. digest, pid) end
                end
                redis.call("del", pk, op.prefix .. "a:" .. pid, op.prefix .. "w:" .. pid)
            end
        end
    end
    return existed and 1 or 0
end
"""

#: LEDGER_FUNCTION_LUA as a script of its own (the enqueue script embeds the function: see redis_broker).
LEDGER_LUA = LEDGER_FUNCTION_LUA + """
return ledger_write(KEYS, ARGV)
"""

#: Attempt records in bulk: ledger_records(prefix, args, first, results) runs the records args[first..] (three
#: each: its payment id, its op, its ids, as LedgerOp.args gives them; no message, and no index key beyond the
#: payment's own four, which are built here from prefix), each under pcall, appending to results one entry per
#: record, its ledger_write result or "error: <the error>", so one refused record never loses the others.
LEDGER_RECORDS_LUA = LEDGER_FUNCTION_LUA + """
local function ledger_records(prefix, args, first, results)
    for i = first, #args, 3 do
        local pid = args[i]
        local names = {prefix .. "p:" .. pid, prefix .. "a:" .. pid, prefix .. "t", prefix .. "w:" .. pid}
        local ok, result = pcall(ledger_write, names, {args[i + 1], "", args[i + 2]})
        if ok then
            results[#results + 1] = result
        else
            results[#results + 1] = "error: " .. tostring(type(result) == "table" and result.err or result)
        end
    end
    return results
end
"""

#: Many attempt records in one call (`DeliveryLedger.flush`; in a worker they ride with the acks, SETTLE_LUA in
#: whiskypay/settler.py). ARGV[1]: the ledger prefix; then three per record (see ledger_records).
LEDGER_BATCH_LUA = LEDGER_RECORDS_LUA + """
return ledger_records(ARGV[1], ARGV, 2, {})
"""


@dataclass(frozen=True)
class LedgerOp:
    """One write for LEDGER_LUA: its keys and its op (JSON-ready), plus the message data when init needs it."""

    keys: list[str]
    op: dict[str, Any]

    def args(self, data: bytes | str = b"") -> list[Any]:
        """Return the script's ARGV: the op, data (the encoded message stored for `resend`), its ids (JSON)."""
        core = {key: value for key, value in self.op.items() if key not in ("init", "index")}
        ids = {"init": self.op["init"], "index": self.op["index"]}
        return [json.dumps(core, separators=(",", ":")), data, json.dumps(ids, separators=(",", ":"))]


@dataclass(frozen=True)
class LedgerConfig:
    """What every ledger write needs to know.

    Parameters:
      namespace: The broker namespace.
      retention_s: How long records are kept, in seconds (WHISKYPAY_LEDGER_RETENTION_S).
      max_payments: The most payments kept; more drop the oldest (WHISKYPAY_LEDGER_MAX_PAYMENTS).
    """

    namespace: str
    retention_s: int
    max_payments: int



def _kwarg(message: Message[Any] | Any, name: str) -> str | None:
    value = (message.kwargs or {}).get(name)
    return value if isinstance(value, str) and value else None


def job_kind(actor_name: str) -> Kind | None:
    """Return what kind of job actor_name's messages are, or None when the ledger does not record it."""
    return KINDS.get(actor_name)


def message_payment_id(message: Message[Any] | Any) -> str:
    """Return the payment id of a message (see payment_id)."""
    return payment_id(event_id=_kwarg(message, "event_id"), merchant_id=_kwarg(message, "merchant_id"),
                      message_id=message.message_id)


def delivery_of(message: Message[Any] | Any) -> int:
    """Return the webhook delivery a callback message is (1 unless it is a resend or re-drive)."""
    value = message.options.get(DELIVERY_OPTION, 1)
    return value if isinstance(value, int) and value > 0 else 1


def _build(config: LedgerConfig, message: Message[Any] | Any, *, now_ms: int, first: bool) -> tuple[
    str, list[Any], list[Any], list[Any]
]:
    """Return (pid, init, index, keys) shared by every write about message's job."""
    kind = job_kind(message.actor_name)
    ns = config.namespace
    event_id, merchant_id = _kwarg(message, "event_id"), _kwarg(message, "merchant_id")
    pid = message_payment_id(message)
    init: list[Any] = ["t0", str(now_ms)]
    index: list[Any] = []
    if event_id:
        init += ["eid", event_id]
        index.append(["map", event_index_key(ns, event_id), pid, False])
        index.append(["str", message_index_key(ns, message.message_id), pid, False])
    if merchant_id:
        init += ["mer", merchant_id]
        index.append(["zset", merchant_index_key(ns, merchant_id), pid, False])
    if kind == "webhook":
        webhook_id = str(message.options.get("webhook_id") or event_id or f"msg_{message.message_id}")
        from whiskypay.redaction import url_host

        init += ["w.mid", message.message_id, "w.wid", webhook_id, "w.q", _queue(message)]
        host = url_host(message.kwargs.get("callback_url"))
        if host:
            init += ["w.host", host]
        if first:
            email = _kwarg(message, "email")
            if email:
                init += ["w.ad", keys.address_digest(email)]
                index.append(["map", address_index_key(ns, email), pid, "w.ad"])
        if webhook_id not in (event_id, f"msg_{message.message_id}"):
            index.append(["str", webhook_index_key(ns, webhook_id), pid, False])
    elif kind == "email":
        init += ["e.mid", message.message_id, "e.q", _queue(message)]
        for role, argument in ROLES:
            address = _kwarg(message, argument)
            if address:
                init += [f"e.{role[0]}.to", mask_address(address)]
                if role == "buyer":  # `forget` erases buyers; a merchant's address is in every one of its payments
                    init += ["e.ad", keys.address_digest(address)]
                    index.append(["map", address_index_key(ns, address), pid, "e.ad"])
    base_keys = [payment_key(ns, pid), attempts_key(ns, pid), time_index_key(ns), webhook_message_key(ns, pid)]
    return pid, init, index, base_keys


def _queue(message: Message[Any] | Any) -> str:
    from dramatiq.common import q_name

    return str(q_name(message.queue_name))


def _op(config: LedgerConfig, pid: str, base_keys: list[str], *, now_ms: int, init: list[Any], index: list[Any],
        states: list[Any], attempts: list[str], set_fields: list[Any] | None = None,
        store_message: bool = False, entered: str | None = None) -> LedgerOp:
    index_keys = [entry[1] for entry in index]
    return LedgerOp(
        keys=base_keys + index_keys,
        op={
            "now": now_ms, "ttl": config.retention_s * 1000, "cap": config.max_payments,
            "max_attempts": MAX_ATTEMPTS, "prefix": ledger_prefix(config.namespace), "pid": pid,
            "init": init, "set": [*(set_fields or [])], "states": states, "attempts": attempts, "index": index,
            "msg": store_message, "entered": entered or False,
        },
    )


def pending_op(
    config: LedgerConfig, message: Message[Any] | Any, *, now_ms: int, replay: bool = False
) -> LedgerOp | None:
    """Return the write that enters message's job as `pending` (None when the ledger does not record its actor).

    The webhook's message is stored from the script's ARGV[2]: pass the encoded message with `args(data)`.

    Parameters:
      replay: The job is sent again (resend, re-drive): a webhook's message carries its new delivery number,
        and an email job's emails not sent yet go back to pending.
    """
    kind = job_kind(message.actor_name)
    if kind is None:
        return None
    pid, init, index, base_keys = _build(config, message, now_ms=now_ms, first=True)
    if kind == "webhook":
        states = [["w.state", "pending", delivery_of(message)]]
    else:
        states = [[f"e.{role[0]}.state", "pending", 0, replay] for role, _ in ROLES]
    return _op(config, pid, base_keys, now_ms=now_ms, init=init, index=index, states=states, attempts=[],
               store_message=kind == "webhook")


@dataclass(frozen=True)
class Note:
    """What an actor says about one attempt of one webhook or email (see note_attempt).

    Parameters:
      job: "webhook", "buyer" or "merchant".
      outcome: "delivered" or "failed".
      code: The HTTP status or SMTP reply code, or None.
      duration_ms: How long the attempt took, in milliseconds.
      error: The error in one scrubbed line, or None.
      response: The first bytes of the merchant's response, printable and scrubbed, or None.
    """

    job: str
    outcome: Literal["delivered", "failed"]
    code: int | None = None
    duration_ms: float | None = None
    error: str | None = None
    response: str | None = None


#: The notes of the attempt running in this context (None outside a recorded attempt).
_notes: contextvars.ContextVar[list[Note] | None] = contextvars.ContextVar("whiskypay_ledger_notes", default=None)


def start_notes() -> None:
    """Begin collecting notes for the attempt about to run in this context (the ledger middleware calls it)."""
    _notes.set([])


def take_notes() -> list[Note]:
    """Return the current attempt's notes and stop collecting."""
    notes = _notes.get() or []
    _notes.set(None)
    return notes


def note_attempt(
    job: str,
    outcome: Literal["delivered", "failed"],
    *,
    code: int | None = None,
    duration_ms: float | None = None,
    error: BaseException | str | None = None,
    response: bytes | None = None,
) -> None:
    """Record what one webhook POST or one email send did; a no-op when no ledger is collecting.

    Parameters:
      job: "webhook", "buyer" or "merchant".
      code: The HTTP status or SMTP reply code.
      error: The exception (summarised and scrubbed here) or a safe text.
      response: The raw response body (its first RESPONSE_EXCERPT_BYTES are kept, printable and scrubbed).
    """
    notes = _notes.get()
    if notes is None:
        return
    text = error_summary(error) if isinstance(error, BaseException) else error
    notes.append(Note(job, outcome, code, duration_ms, one_line(text) if text else None,
                      response_excerpt(response) if response is not None else None))


def one_line(text: str, limit: int = ERROR_CHARS) -> str:
    """Return text scrubbed, on one line, at most limit characters."""
    text = " ".join(scrub_text(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: What a response excerpt replaces: control characters and what lies beyond the Basic Multilingual Plane. Written
#: as those ranges rather than as the complement of the printable ones, which matches the same code points (every
#: one checked) but took 21 ms to compile at every worker's start against 0.2 ms.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\U00010000-\U0010ffff]")


def response_excerpt(body: bytes) -> str:
    """Return the first RESPONSE_EXCERPT_BYTES of a response as printable, scrubbed text."""
    text = body[:RESPONSE_EXCERPT_BYTES].decode("utf-8", errors="replace")
    text = _UNPRINTABLE.sub(" ", text.replace("\ufffd", "?"))
    return scrub_text(" ".join(text.split()))


def _row(job: str, *, delivery: int, attempt: int, at_ms: int, outcome: str, code: int | None,
         duration_ms: float | None, error: str | None, response: str | None = None) -> str:
    row: dict[str, Any] = {"j": job, "d": delivery, "n": attempt, "at": at_ms, "o": outcome}
    if code is not None:
        row["c"] = code
    if duration_ms is not None:
        row["ms"] = round(duration_ms)
    if error:
        row["err"] = error
    if response:
        row["r"] = response
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False)


def attempt_op(
    config: LedgerConfig,
    message: Message[Any] | Any,
    *,
    attempt: int,
    notes: Sequence[Note],
    exception: BaseException | None,
    failed: bool,
    now_ms: int,
    started_ms: int,
    duration_ms: float,
    error: str | None = None,
) -> LedgerOp | None:
    """Return the write for one processed attempt of message (None for a deferral or an unrecorded actor).

    Parameters:
      attempt: The attempt number (the message's retries before it ran, plus one).
      notes: What the actor noted (note_attempt); an attempt with none gets one row from the exception.
      exception: What the attempt raised, or None.
      failed: Whether the message was failed for good (dead-lettered).
      started_ms: When the attempt began (unix ms), the time of its rows.
      duration_ms: How long the whole attempt took, for a row the actor did not note.
      error: The error text to record instead of the exception's (a message failed before it ran).
    """
    from whiskypay.outcomes import classify

    kind = job_kind(message.actor_name)
    if kind is None:
        return None
    outcome = classify(_Failed(message, failed), exception)
    if outcome.attempt == "deferred":
        # Not an attempt: a slow host's cap writes nothing; a callback parked before it ran (its merchant's
        # breaker is open) shows as parked.
        return state_op(config, message, "parked", now_ms=now_ms) if outcome.disposition == "parked" else None
    pid, init, index, base_keys = _build(config, message, now_ms=now_ms, first=attempt == 1)
    if exception is not None:
        error = one_line(error or error_summary(exception))
    rows: list[str] = []
    states: list[Any] = []
    if kind == "webhook":
        delivery = delivery_of(message)
        for note in notes:
            rows.append(_row("w", delivery=delivery, attempt=attempt, at_ms=started_ms, outcome=note.outcome,
                             code=note.code, duration_ms=note.duration_ms, error=note.error,
                             response=note.response))
        if not notes:
            code = getattr(exception, "tags", {}).get("http_status") if exception is not None else None
            rows.append(_row("w", delivery=delivery, attempt=attempt, at_ms=started_ms,
                             outcome="failed" if exception is not None else "delivered",
                             code=code, duration_ms=duration_ms, error=error))
        state = {"delivered": "delivered", "dead_lettered": "failed", "parked": "parked"}.get(
            outcome.disposition or outcome.attempt, "retrying"
        )
        states.append(["w.state", state, delivery])
    else:
        sent = {note.job for note in notes if note.outcome == "delivered"}
        for note in notes:
            rows.append(_row(note.job[0], delivery=1, attempt=attempt, at_ms=started_ms, outcome=note.outcome,
                             code=note.code, duration_ms=note.duration_ms, error=note.error))
        if exception is not None and not any(note.outcome == "failed" for note in notes):
            code = getattr(exception, "tags", {}).get("smtp_code")
            rows.append(_row("e", delivery=1, attempt=attempt, at_ms=started_ms, outcome="failed", code=code,
                             duration_ms=duration_ms, error=error))
        job_state = "sent" if exception is None else "failed" if failed else "retrying"
        for role, _ in ROLES:
            states.append([f"e.{role[0]}.state", "sent" if role in sent else job_state, 0])
    return _op(config, pid, base_keys, now_ms=now_ms, init=init, index=index, states=states, attempts=rows,
               set_fields=["last", str(now_ms)],
               entered="w.mid" if kind == "webhook" else "e.mid")


def state_op(config: LedgerConfig, message: Message[Any] | Any, state: State, *, now_ms: int) -> LedgerOp | None:
    """Return the write that sets message's job to state without recording an attempt (e.g. `parked`)."""
    kind = job_kind(message.actor_name)
    if kind is None:
        return None
    pid, init, index, base_keys = _build(config, message, now_ms=now_ms, first=False)
    if kind == "webhook":
        states: list[Any] = [["w.state", state, delivery_of(message)]]
    else:
        states = [[f"e.{role[0]}.state", state, 0] for role, _ in ROLES]
    return _op(config, pid, base_keys, now_ms=now_ms, init=init, index=index, states=states, attempts=[])


class MessageView:
    """A stored message (its decoded JSON) seen through the attributes the ledger reads from a Dramatiq message.

    For the commands that write messages into Redis themselves (resend, re-drive) and record them.
    """

    def __init__(self, message: dict[str, Any]) -> None:
        self.actor_name = str(message.get("actor_name"))
        self.queue_name = str(message.get("queue_name"))
        self.message_id = str(message.get("message_id"))
        self.kwargs: dict[str, Any] = message.get("kwargs") or {}
        self.options: dict[str, Any] = message.get("options") or {}


class _Failed:
    """A message seen with the failed flag the caller gives (outcomes.classify reads `failed` and `options`)."""

    def __init__(self, message: Message[Any] | Any, failed: bool) -> None:
        self.failed = failed
        self.options = message.options


class LedgerWriter:
    """Runs ledger writes by EVALSHA on a client, or queues them on a pipeline (no SCRIPT EXISTS round trip).

    Parameters:
      client: The Redis client the writes go to (the script is loaded into it when Redis does not have it).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sha = hashlib.sha1(LEDGER_LUA.encode()).hexdigest()
        self.batch_sha = hashlib.sha1(LEDGER_BATCH_LUA.encode()).hexdigest()
        self._loaded = False

    def write_batch(self, ops: Sequence[LedgerOp]) -> list[Any]:
        """Run many attempt records in one call (LEDGER_BATCH_LUA); return one reply per record.

        A reply is the script's result, or text starting "error: " for a record Redis refused. Raises
        redis.RedisError when the call itself fails (nothing was written then, or all of it).
        """
        import redis

        args: list[Any] = [ops[0].op["prefix"]] if ops else []
        for op in ops:
            core, _, ids = op.args()
            args += [op.op["pid"], core, ids]
        try:
            replies = self.client.evalsha(self.batch_sha, 0, *args)
        except redis.exceptions.NoScriptError:
            self.client.script_load(LEDGER_BATCH_LUA)
            replies = self.client.evalsha(self.batch_sha, 0, *args)
        return [keys.text(reply) if isinstance(reply, bytes) else reply for reply in replies]

    def queue(self, pipe: Any, op: LedgerOp, *, data: bytes | str = b"") -> None:
        """Queue op on pipe (the script is loaded into Redis first, once per writer); its reply is the script's.

        A pipeline cannot fall back from EVALSHA to loading the script mid-way, so the first call loads it (one
        round trip): on a Redis that never ran a ledger write (a fresh or restarted one) the op would otherwise
        fail with NoScriptError. Raises redis.RedisError when loading fails.
        """
        if not self._loaded:
            self.client.script_load(LEDGER_LUA)
            self._loaded = True
        pipe.evalsha(self.sha, len(op.keys), *op.keys, *op.args(data))

    def write(self, op: LedgerOp, *, data: bytes | str = b"") -> Any:
        """Run op now, in one round trip (two the first time Redis sees the script); raises redis.RedisError."""
        import redis

        try:
            return self.client.evalsha(self.sha, len(op.keys), *op.keys, *op.args(data))
        except redis.exceptions.NoScriptError:
            self.client.script_load(LEDGER_LUA)
            return self.client.evalsha(self.sha, len(op.keys), *op.keys, *op.args(data))


# --------------------------------------------------------------------------------------------------------------------
# The pending record at send(): its own lean write, inside the enqueue's script
# --------------------------------------------------------------------------------------------------------------------

#: The pending record of a job at send(): what ledger_write does with pending_op's write (same keys, fields,
#: states, TTLs and cap), without its generality. It is written once per send(), inside the enqueue's own
#: script (whiskypay.redis_broker.ENQUEUE_WITH_LEDGER_LUA), so it is lean: positional arguments (no JSON to
#: decode), the keys built here from the prefix (as the cap and LEDGER_BATCH_LUA do), and on a new payment one
#: HSET for every field and state, SET ... PX for the stored message and the message index (no PTTL/PEXPIRE
#: pair), PTTL/PEXPIRE only on the indexes other payments share. 14 commands for a callback with an event id
#: and a buyer address, against ledger_write's 22. A[at..]: now (unix ms), ttl (ms), cap, prefix, pid, the job
#: ("w<delivery>" or "e"), then the values of its PENDING_FIELDS (in their order; "" for a field the job does
#: not have). data: the encoded message (stored for a webhook's `resend`). tests/test_ledger.py checks it writes what
#: ledger_write writes.
LEDGER_PENDING_LUA = """
local PENDING_FIELDS = {
    w = {"eid", "mer", "w.mid", "w.wid", "w.q", "w.host", "w.ad"},
    e = {"eid", "mer", "e.mid", "e.q", "e.b.to", "e.ad", "e.m.to"},
}
local function ledger_pending(data, A, at)
    local now, ttl, cap, prefix, pid, job = A[at], tonumber(A[at + 1]), tonumber(A[at + 2]), A[at + 3], A[at + 4],
        A[at + 5]
    local kind, delivery = string.sub(job, 1, 1), tonumber(string.sub(job, 2)) or 0
    local v, init = {}, {"t0", now}
    for i, name in ipairs(PENDING_FIELDS[kind]) do
        local value = A[at + 5 + i]
        if value ~= "" then
            v[name] = value
            init[#init + 1] = name
            init[#init + 1] = value
        end
    end
    local states = kind == "w" and {"w.state"} or {"e.b.state", "e.m.state"}
    local P, T = prefix .. "p:" .. pid, prefix .. "t"
    local left = ttl
    local fresh = {}
    local existed = redis.call("exists", P) == 1
    if not existed then
        for i = 1, #init, 2 do fresh[init[i]] = true end
        for _, name in ipairs(states) do
            init[#init + 1] = name
            init[#init + 1] = "pending"
        end
        if kind == "w" then
            init[#init + 1] = "w.n"
            init[#init + 1] = delivery
        end
        redis.call("hset", P, unpack(init))
        redis.call("pexpire", P, ttl)
    else
        -- The payment's other job came first: its fields stay, and pending goes only where there is no state
        -- yet, or on a newer delivery of the webhook (as ledger_write).
        for i = 1, #init, 2 do
            if redis.call("hsetnx", P, init[i], init[i + 1]) == 1 then fresh[init[i]] = true end
        end
        local p_left = redis.call("pttl", P)
        if p_left < 0 then redis.call("pexpire", P, ttl) else left = math.max(p_left, 1) end
        local newer = false
        if kind == "w" then
            local current = tonumber(redis.call("hget", P, "w.n") or "0")
            if delivery < current then states = {} elseif delivery > current then newer = true end
        end
        for _, name in ipairs(states) do
            if newer or not redis.call("hget", P, name) then redis.call("hset", P, name, "pending") end
        end
        if newer then redis.call("hset", P, "w.n", delivery) end
    end
    local function keep(key)
        local current = redis.call("pttl", key)
        if current ~= -2 and current < left then redis.call("pexpire", key, left) end
    end
    if kind == "w" then
        redis.call("set", prefix .. "w:" .. pid, data, "NX", "PX", left)
    end
    local eid = v["eid"]
    if eid then
        local key = prefix .. "ev:" .. eid
        redis.call("hset", key, pid, "1")
        keep(key)
        redis.call("set", prefix .. "m:" .. v[kind .. ".mid"], pid, "PX", left)
    end
    if v["mer"] then
        local key = prefix .. "mer:" .. v["mer"]
        redis.call("zadd", key, "NX", now, pid)
        redis.call("zremrangebyscore", key, "-inf", now - ttl)
        keep(key)
    end
    local digest = v[kind .. ".ad"]
    if digest and fresh[kind .. ".ad"] then
        local key = prefix .. "addr:" .. digest
        redis.call("hset", key, pid, "1")
        keep(key)
    end
    local wid = v["w.wid"]
    if wid and wid ~= eid and wid ~= "msg_" .. v["w.mid"] then
        redis.call("set", prefix .. "wh:" .. wid, pid, "PX", left)
    end
    redis.call("zadd", T, "NX", now, pid)
    if not existed then
        -- The cap, as in ledger_write: a new payment beyond it drops the oldest with every key pointing at them.
        redis.call("zremrangebyscore", T, "-inf", now - ttl)
        local n = redis.call("zcard", T)
        if n > cap then
            local old = redis.call("zpopmin", T, math.min(n - cap, 16))
            for i = 1, #old, 2 do
                local gone = old[i]
                local pk = prefix .. "p:" .. gone
                local f = redis.call("hmget", pk, "eid", "w.mid", "e.mid", "w.wid", "w.ad", "e.ad", "mer")
                if f[1] then redis.call("hdel", prefix .. "ev:" .. f[1], gone) end
                if f[7] then redis.call("zrem", prefix .. "mer:" .. f[7], gone) end
                for _, name in ipairs({"m:" .. (f[2] or ""), "m:" .. (f[3] or ""), "wh:" .. (f[4] or "")}) do
                    local k = prefix .. name
                    if redis.call("get", k) == gone then redis.call("del", k) end
                end
                for _, d in ipairs({f[5] or "", f[6] or ""}) do
                    if d ~= "" then redis.call("hdel", prefix .. "addr:" .. d, gone) end
                end
                redis.call("del", pk, prefix .. "a:" .. gone, prefix .. "w:" .. gone)
            end
        end
    end
    return existed and 1 or 0
end
"""


@functools.lru_cache(maxsize=16)
def _pending_constants(config: LedgerConfig) -> tuple[bytes, bytes, bytes]:
    # Encoded once: redis-py passes bytes through, where it would type-check and encode a str at every send.
    return str(config.retention_s * 1000).encode(), str(config.max_payments).encode(), \
        ledger_prefix(config.namespace).encode()


def pending_args(config: LedgerConfig, message: Message[Any] | Any, *, now_ms: int) -> list[str | bytes] | None:
    """Return LEDGER_PENDING_LUA's arguments entering message's job as `pending` at send() (None: not recorded).

    The same record as pending_op's (not a replay), for the enqueue's script: see LEDGER_PENDING_LUA.
    """
    kind = KINDS.get(message.actor_name)
    if kind is None:
        return None
    kwargs = message.kwargs or {}
    event_id, merchant_id = _kwarg(message, "event_id"), _kwarg(message, "merchant_id")
    message_id = message.message_id
    pid = payment_id(event_id=event_id, merchant_id=merchant_id, message_id=message_id)
    ttl, cap, prefix = _pending_constants(config)
    queue = _queue(message)
    if kind == "webhook":
        webhook_id = str(message.options.get("webhook_id") or event_id or f"msg_{message_id}")
        email = _kwarg(message, "email")
        job = f"w{delivery_of(message)}"
        values = [webhook_id, queue, url_host(kwargs.get("callback_url")) or "",
                  keys.address_digest(email) if email else ""]
    else:
        buyer, seller = _kwarg(message, "buyer_email"), _kwarg(message, "merchant_email")
        job = "e"
        values = [queue, mask_address(buyer) if buyer else "", keys.address_digest(buyer) if buyer else "",
                  mask_address(seller) if seller else ""]
    return [str(now_ms), ttl, cap, prefix, pid, job, event_id or "", merchant_id or "", message_id, *values]


#: The pending record of the message being enqueued in this context (pending_args), staged by the ledger
#: middleware's before_enqueue and taken by the broker's enqueue, which writes it in the same round trip.
_staged: contextvars.ContextVar[tuple[str, list[str | bytes]] | None] = contextvars.ContextVar(
    "whiskypay_ledger_staged", default=None
)


def stage_pending(redis_message_id: str, args: list[str | bytes]) -> None:
    """Stage a pending record (pending_args) to be written with the enqueue of the message redis_message_id."""
    _staged.set((redis_message_id, args))


def take_pending(redis_message_id: str) -> list[str | bytes] | None:
    """Return (and unstage) the pending record staged for redis_message_id, or None."""
    staged = _staged.get()
    if staged is None or staged[0] != redis_message_id:
        return None
    _staged.set(None)
    return staged[1]


def set_job_state(client: redis.Redis, config: LedgerConfig, message: Message[Any] | Any, state: State) -> None:
    """Set message's job to state in the ledger (no attempt row): for the breaker's `parked` (issue 12).

    Call it where a message is held back instead of attempted. Raises redis.RedisError: the caller decides
    (a ledger write must never fail a delivery, so catch and log it there).
    """
    op = state_op(config, message, state, now_ms=int(time.time() * 1000))
    if op is not None:
        LedgerWriter(client).write(op)


# --------------------------------------------------------------------------------------------------------------------
# Reading: payments as the commands show them
# --------------------------------------------------------------------------------------------------------------------



@dataclass
class Payment:
    """One payment read from the ledger: its hash fields and its attempt rows."""

    pid: str
    fields: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: The webhook's stored message (JSON), ERASED after `forget`, or None.
    stored_message: str | None = None

    @property
    def event_id(self) -> str | None:
        """The event id, or None for a job that stands alone."""
        return self.fields.get("eid")

    @property
    def merchant_id(self) -> str | None:
        """The merchant id, or None."""
        return self.fields.get("mer")

    @property
    def created_ms(self) -> int:
        """When the payment was first recorded, unix ms."""
        return int(self.fields.get("t0", "0"))

    @property
    def label(self) -> str:
        """The event id, or the message id of a job that stands alone."""
        return self.event_id or self.fields.get("w.mid") or self.fields.get("e.mid") or self.pid

    @property
    def has_webhook(self) -> bool:
        """Whether a callback job belongs to it."""
        return "w.mid" in self.fields

    @property
    def has_emails(self) -> bool:
        """Whether an email job belongs to it."""
        return "e.mid" in self.fields

    @property
    def webhook_state(self) -> str | None:
        """The webhook's state (of its latest delivery), or None without a callback job."""
        return self.fields.get("w.state", "pending") if self.has_webhook else None

    def email_state(self, role: Role) -> str | None:
        """The state of role's email, or None without an email job."""
        return self.fields.get(f"e.{role[0]}.state", "pending") if self.has_emails else None

    def _attempt(self, row: dict[str, Any], code_name: str) -> dict[str, Any]:
        attempt: dict[str, Any] = {
            "attempt": row.get("n"), "at": keys.iso_ms(row.get("at")), "outcome": row.get("o"),
            code_name: row.get("c"), "duration_ms": row.get("ms"), "error": row.get("err"),
        }
        if code_name == "http_status":
            attempt["delivery"] = row.get("d", 1)
            attempt["response"] = row.get("r")
        return attempt

    def webhook(self) -> dict[str, Any] | None:
        """The `webhook` object of `event --json`, or None."""
        if not self.has_webhook:
            return None
        rows = sorted((row for row in self.rows if row.get("j") == "w"),
                      key=lambda row: (row.get("d", 1), row.get("n", 0), row.get("at", 0)))
        return {
            "webhook_id": self.fields.get("w.wid"), "state": self.webhook_state,
            "attempts": [self._attempt(row, "http_status") for row in rows],
            "message_id": self.fields.get("w.mid"), "host": self.fields.get("w.host"),
            "deliveries": int(self.fields.get("w.n", "1")),
        }

    def emails(self) -> list[dict[str, Any]] | None:
        """The `emails` list of `event --json`, or None."""
        if not self.has_emails:
            return None
        result = []
        for role, _ in ROLES:
            own = [row for row in self.rows if row.get("j") == role[0]]
            sent_at = min((row.get("n", 0) for row in own if row.get("o") == "delivered"), default=None)
            # A failure before any email was tried (an invalid message, an error outside the SMTP calls) is an
            # attempt of every email not sent before it.
            shared = [row for row in self.rows
                      if row.get("j") == "e" and (sent_at is None or row.get("n", 0) < sent_at)]
            rows = sorted(own + shared, key=lambda row: (row.get("n", 0), row.get("at", 0)))
            result.append({
                "role": role, "to": self.fields.get(f"e.{role[0]}.to"), "state": self.email_state(role),
                "attempts": [self._attempt(row, "smtp_code") for row in rows],
                "message_id": self.fields.get("e.mid"),
            })
        return result

    def to_json(self) -> dict[str, Any]:
        """The object `whiskypay event --json` prints."""
        return {
            "event_id": self.event_id, "merchant_id": self.merchant_id, "webhook": self.webhook(),
            "emails": self.emails(), "created_at": keys.iso_ms(self.created_ms),
        }

    def missing(self) -> list[str]:
        """What is not done yet: "webhook retrying", "buyer email failed"...; empty when complete."""
        problems = []
        if self.has_webhook and self.webhook_state != "delivered":
            problems.append(f"webhook {self.webhook_state}")
        if self.has_emails:
            for role, _ in ROLES:
                state = self.email_state(role)
                if state != "sent":
                    problems.append(f"{role} email {state}")
        return problems

    def states(self) -> set[str]:
        """Every state of its jobs (for `events --state`; an email's `sent` also counts as `delivered`)."""
        found = {self.webhook_state} if self.has_webhook else set()
        if self.has_emails:
            for role, _ in ROLES:
                state = self.email_state(role)
                found.add(state)
                if state == "sent":
                    found.add("delivered")
        return {state for state in found if state}

    def last_row(self) -> dict[str, Any] | None:
        """The newest attempt row, or None."""
        return max(self.rows, key=lambda row: row.get("at", 0), default=None)


def _decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {keys.text(key): keys.text(value) for key, value in raw.items()}


def load_payments(client: redis.Redis, namespace: str, pids: Sequence[str]) -> list[Payment]:
    """Read payments (hash and attempts, one pipelined round trip); expired or trimmed ones are left out."""
    pipe = client.pipeline(transaction=False)
    for pid in pids:
        pipe.hgetall(payment_key(namespace, pid))
        pipe.lrange(attempts_key(namespace, pid), 0, -1)
        pipe.get(webhook_message_key(namespace, pid))
    replies = pipe.execute() if pids else []
    payments = []
    for index, pid in enumerate(pids):
        fields, rows, stored = replies[3 * index : 3 * index + 3]
        if not fields:
            continue
        decoded = []
        for raw in rows:
            try:
                decoded.append(json.loads(raw))
            except ValueError:
                continue
        payments.append(Payment(pid, _decode_hash(fields), decoded, keys.text(stored) if stored is not None else None))
    return payments


def resolve(client: redis.Redis, namespace: str, ident: str, merchant: str | None = None) -> list[str]:
    """Return the ids of the payments ident names: an event id, a webhook-id or a message id.

    With merchant, the event id is looked up for that merchant only (the caller keeps the payments of that
    merchant among the rest). Several ids back means ambiguous (one event id, two merchants).
    """
    if merchant is not None:
        candidates = [payment_id(event_id=ident, merchant_id=merchant, message_id="")]
    else:
        candidates = sorted(keys.text(pid) for pid in client.hkeys(event_index_key(namespace, ident)))
    message_id = ident.removeprefix("msg_")
    pipe = client.pipeline(transaction=False)
    pipe.get(message_index_key(namespace, message_id))
    pipe.get(webhook_index_key(namespace, ident))
    pipe.exists(payment_key(namespace, f"m:{message_id}"))
    for pid in candidates:
        pipe.exists(payment_key(namespace, pid))
    by_message, by_webhook, standalone, *exists = pipe.execute()
    found = [pid for pid, present in zip(candidates, exists, strict=True) if present]
    for extra in (by_message, by_webhook):
        if extra is not None and keys.text(extra) not in found:
            found.append(keys.text(extra))
    if standalone and f"m:{message_id}" not in found:
        found.append(f"m:{message_id}")
    return found


def merchant_payments(client: redis.Redis, namespace: str, merchant_id: str, *, start: int = 0,
                      num: int = 50) -> list[str]:  # fmt: skip
    """Return num of merchant_id's payment ids, newest first (by first-seen time), from rank start."""
    return [keys.text(pid) for pid in client.zrevrange(merchant_index_key(namespace, merchant_id), start,
                                                    start + num - 1)]  # fmt: skip


def iter_payments(
    client: redis.Redis, namespace: str, *, since_ms: int | None = None, batch: int = 200
) -> Iterator[Payment]:
    """Yield payments newest first (by first-seen time), since since_ms when given, batch per round trip."""
    offset = 0
    low = since_ms if since_ms is not None else "-inf"
    while True:
        pids = [keys.text(pid) for pid in client.zrevrangebyscore(time_index_key(namespace), "+inf", low,
                                                              start=offset, num=batch)]
        if not pids:
            return
        yield from load_payments(client, namespace, pids)
        offset += len(pids)


def parse_since(text: str, *, now: datetime | None = None) -> int:
    """Parse `--since` ("30m", "1h", "2d" or an ISO-8601 time; a time without zone is UTC) into unix ms.

    Raises ValueError with a fix-it text.
    """
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"\s*(\d{1,9})\s*([smhdw])\s*", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
        return int((now - timedelta(**{unit: int(match.group(1))})).timestamp() * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not a duration or a time; write 30m, 1h, 2d or an ISO-8601 time like "
            "2026-12-01T21:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def in_since(payments: Iterable[Payment], since_ms: int | None) -> Iterator[Payment]:
    """Yield the payments first seen at or after since_ms (all when None)."""
    for payment in payments:
        if since_ms is None or payment.created_ms >= since_ms:
            yield payment


# --------------------------------------------------------------------------------------------------------------------
# Erasure (`whiskypay forget`)
# --------------------------------------------------------------------------------------------------------------------


def holds_address(message: dict[str, Any], address: str) -> bool:
    """Return whether one of a stored message's arguments is address (compared case-insensitively)."""
    kwargs = message.get("kwargs")
    wanted = address.strip().casefold()
    return isinstance(kwargs, dict) and any(
        isinstance(value, str) and value.strip().casefold() == wanted for value in kwargs.values()
    )


def erase_in_message(message: dict[str, Any], address: str) -> dict[str, Any]:
    """Return a copy of a stored message with every argument equal to address replaced by ERASED."""
    wanted = address.strip().casefold()
    kwargs = {
        key: ERASED if isinstance(value, str) and value.strip().casefold() == wanted else value
        for key, value in (message.get("kwargs") or {}).items()
    }
    return {**message, "kwargs": kwargs}


def forget_address(client: redis.Redis, namespace: str, address: str, *, dry_run: bool = False) -> int:
    """Erase address from the ledger; return how many payment records held it.

    The ledger holds a full address only in a webhook's stored message (for `resend`): it is replaced by
    ERASED, so that payment can no longer be resent. The emails' recipients are stored masked; the masked form
    of address is replaced by ERASED too, and the address's digests and index entry go. Attempt errors were
    scrubbed (masked) when recorded. Found through the address index: no SCAN.
    """
    key = address_index_key(namespace, address)
    pids = sorted(keys.text(pid) for pid in client.hkeys(key))
    masked = mask_address(address)
    touched = 0
    digest = keys.address_digest(address)
    for payment in load_payments(client, namespace, pids):
        changes: dict[Any, Any] = {}
        erase_message = False
        stored = payment.stored_message
        if stored and stored != ERASED:
            try:
                erase_message = holds_address(json.loads(stored), address)
            except ValueError:
                erase_message = True  # unreadable: erase it rather than keep what might hold the address
        for role, _ in ROLES:
            if payment.fields.get(f"e.{role[0]}.to") == masked:
                changes[f"e.{role[0]}.to"] = ERASED
        digests = [name for name in ("w.ad", "e.ad") if payment.fields.get(name) == digest]
        if changes or erase_message or digests:
            touched += 1
            if not dry_run:
                changes["forgot"] = str(int(time.time()))
                pipe = client.pipeline(transaction=True)
                pipe.hset(payment_key(namespace, payment.pid), mapping=changes)
                if digests:
                    pipe.hdel(payment_key(namespace, payment.pid), *digests)
                if erase_message:
                    pipe.set(webhook_message_key(namespace, payment.pid), ERASED, keepttl=True)
                pipe.execute()
    if not dry_run:
        client.delete(key)
    return touched
