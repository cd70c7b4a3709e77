"""The delivery ledger's pure parts (tier 1) and its recording on a real Redis with in-process workers (tier 3).

The end-to-end tests through real worker processes, the receiver and the SMTP sink are in test_ledger_e2e.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message, Worker

from middleware.ledger import DeliveryLedger
from middleware.retry_policy import QueueRetryPolicy
from tests.helpers import NAMESPACE, dead_letters, wait_until
from whiskypay import keys, ledger
from whiskypay.errors import Deferred, HttpStatusError
from whiskypay.ledger import LedgerConfig, LedgerWriter, Payment, load_payments, note_attempt, resolve
from whiskypay.redis_broker import WhiskyPayRedisBroker
from whiskypay.retrying import RetryPolicy

BUYER = "buyer-ledger@example.com"

# --------------------------------------------------------------------------------------------------------------------
# Tier 1: pure parts
# --------------------------------------------------------------------------------------------------------------------


def test_payment_ids_cannot_collide_across_the_merchant_and_event_boundary() -> None:
    a = ledger.payment_id(event_id="b:c", merchant_id="a", message_id="x")
    b = ledger.payment_id(event_id="c", merchant_id="a:b", message_id="x")
    c = ledger.payment_id(event_id="a:b:c", merchant_id=None, message_id="x")
    assert len({a, b, c}) == 3
    assert ledger.payment_id(event_id=None, merchant_id="a", message_id="m1") == "m:m1"


NOW = datetime(2026, 12, 1, 21, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", datetime(2026, 12, 1, 20, 30, tzinfo=UTC)),
        ("1h", datetime(2026, 12, 1, 20, 0, tzinfo=UTC)),
        ("2d", datetime(2026, 11, 29, 21, 0, tzinfo=UTC)),
        ("2026-12-01T18:00:00Z", datetime(2026, 12, 1, 18, 0, tzinfo=UTC)),
        ("2026-12-01T18:00:00+01:00", datetime(2026, 12, 1, 17, 0, tzinfo=UTC)),
        ("2026-12-01T18:00", datetime(2026, 12, 1, 18, 0, tzinfo=UTC)),
    ],
)
def test_since_takes_a_duration_back_from_now_or_an_iso_time(text: str, expected: datetime) -> None:
    assert ledger.parse_since(text, now=NOW) == int(expected.timestamp() * 1000)


@pytest.mark.parametrize("text", ["yesterday", "1y", "", "-5m"])
def test_a_bad_since_is_refused_with_the_forms_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match="30m, 1h, 2d or an ISO-8601 time"):
        ledger.parse_since(text, now=NOW)


def test_a_response_excerpt_is_printable_scrubbed_and_at_most_one_kib() -> None:
    body = b"\x00\x01ok for buyer@example.com see https://merchant.example/path?token=s3cret\n" + b"x" * 5000
    excerpt = ledger.response_excerpt(body)
    assert "buyer@example.com" not in excerpt and "b***@example.com" in excerpt
    assert "s3cret" not in excerpt and "token" not in excerpt
    assert "\x00" not in excerpt and "\n" not in excerpt
    assert len(excerpt.encode()) <= ledger.RESPONSE_EXCERPT_BYTES


def test_a_failure_before_any_email_was_tried_is_an_attempt_of_every_email_not_yet_sent() -> None:
    # Given an email job whose buyer email went out on attempt 1 and whose attempt 2 failed before any SMTP call
    rows = [
        {"j": "b", "n": 1, "at": 1, "o": "delivered", "c": 250},
        {"j": "m", "n": 1, "at": 1, "o": "failed", "c": 451, "err": "SmtpTemporaryError: SMTP 451"},
        {"j": "e", "n": 2, "at": 2, "o": "failed", "err": "ConnectionError: Redis"},
    ]
    payment = Payment("m:x", {"e.mid": "x", "e.b.state": "sent", "e.m.state": "retrying"}, rows)
    buyer, merchant = payment.emails() or []
    # Then the buyer shows its one attempt, the merchant both
    assert [a["attempt"] for a in buyer["attempts"]] == [1]
    assert [(a["attempt"], a["smtp_code"]) for a in merchant["attempts"]] == [(1, 451), (2, None)]
    assert payment.missing() == ["merchant email retrying"]


# --------------------------------------------------------------------------------------------------------------------
# Tier 3: real Redis, in-process workers on a broker of their own
# --------------------------------------------------------------------------------------------------------------------

CONFIG = LedgerConfig(namespace=NAMESPACE, retention_s=3600, max_payments=1000)


@pytest.fixture
def ledger_broker(redis_client: redis.Redis, redis_url: str) -> Iterator[WhiskyPayRedisBroker]:
    """A WhiskyPayRedisBroker carrying only DeliveryLedger and QueueRetryPolicy (3 attempts, 10 ms waits)."""
    broker = WhiskyPayRedisBroker(
        client=redis.Redis.from_url(redis_url),
        namespace=NAMESPACE,
        middleware=[
            DeliveryLedger(retention_s=CONFIG.retention_s, max_payments=CONFIG.max_payments),
            QueueRetryPolicy(policies={}, default=RetryPolicy(attempts=3, backoff_ms=10)),
        ],
    )
    yield broker
    broker.close()


@pytest.fixture
def run_worker(ledger_broker: WhiskyPayRedisBroker) -> Iterator[Callable[[], Worker]]:
    """Start an in-process worker on ledger_broker (stopped at teardown)."""
    workers: list[Worker] = []

    def _start() -> Worker:
        worker = Worker(ledger_broker, worker_timeout=20, worker_threads=2)
        worker.start()
        workers.append(worker)
        return worker

    yield _start
    for worker in workers:
        worker.stop()


def _payment(client: redis.Redis, ident: str) -> Payment | None:
    found = load_payments(client, NAMESPACE, resolve(client, NAMESPACE, ident))
    return found[0] if len(found) == 1 else None


def _callback_kwargs(**extra: Any) -> dict[str, Any]:
    return {"callback_url": "https://merchant.example/hook?token=t", "email": BUYER, "plan": "pro", "price": 1,
            **extra}


def test_send_enters_the_job_as_pending_with_the_retention_ttl_and_its_message_for_resend(
    redis_client: redis.Redis, ledger_broker: WhiskyPayRedisBroker
) -> None:
    @dramatiq.actor(broker=ledger_broker, actor_name="send_callback", queue_name="callbackQueue")
    def send_callback(**kwargs: Any) -> None: ...

    # When a callback with an event id is sent (no worker runs)
    message = send_callback.send(**_callback_kwargs(event_id="pay_pending"))
    # Then it is queued, and the ledger has it as pending, with its message, expiring with the retention
    assert redis_client.llen(f"{NAMESPACE}:callbackQueue") == 1
    payment = _payment(redis_client, "pay_pending")
    assert payment is not None and payment.webhook_state == "pending"
    assert json.loads(payment.stored_message or "")["message_id"] == message.message_id
    key = ledger.payment_key(NAMESPACE, payment.pid)
    assert 3590_000 < redis_client.pttl(key) <= 3600_000
    assert _payment(redis_client, message.message_id) is not None  # found by message id too
    assert payment.to_json()["webhook"]["webhook_id"] == "pay_pending"


def test_each_attempt_is_recorded_after_the_ack_numbered_like_whiskypay_failed(
    redis_client: redis.Redis, ledger_broker: WhiskyPayRedisBroker, run_worker: Callable[[], Worker]
) -> None:
    # Given a callback actor whose merchant answers 500, 503, then 200
    statuses = iter([500, 503, 200])

    @dramatiq.actor(broker=ledger_broker, actor_name="send_callback", queue_name="callbackQueue")
    def send_callback(**kwargs: Any) -> None:
        status = next(statuses)
        if status != 200:
            note_attempt("webhook", "failed", code=status, duration_ms=1.0, error=f"HttpStatusError: HTTP {status}",
                         response=b'{"error":"busy"}')
            raise HttpStatusError(f"HTTP {status} from merchant.example", http_status=status)
        note_attempt("webhook", "delivered", code=200, duration_ms=1.0, response=b"ok")

    message = send_callback.send(**_callback_kwargs())
    run_worker()
    # Then the ledger shows three attempts, numbered 1..3, and the webhook delivered
    payment = wait_until(lambda: (p := _payment(redis_client, message.message_id)) and p.webhook_state == "delivered"
                         and p, what="a delivered webhook")
    attempts = payment.to_json()["webhook"]["attempts"]
    assert [(a["attempt"], a["outcome"], a["http_status"]) for a in attempts] == [
        (1, "failed", 500), (2, "failed", 503), (3, "delivered", 200)
    ]
    assert attempts[0]["error"] == "HttpStatusError: HTTP 500" and attempts[0]["response"] == '{"error":"busy"}'
    assert attempts[2]["error"] is None and attempts[2]["at"].endswith("Z")


def test_a_dead_lettered_job_is_failed_and_its_last_attempt_is_the_attempts_failed_shows(
    redis_client: redis.Redis, ledger_broker: WhiskyPayRedisBroker, run_worker: Callable[[], Worker]
) -> None:
    @dramatiq.actor(broker=ledger_broker, actor_name="send_callback", queue_name="callbackQueue")
    def send_callback(**kwargs: Any) -> None:
        raise HttpStatusError("HTTP 502 from merchant.example", http_status=502)

    message = send_callback.send(**_callback_kwargs())
    run_worker()
    letter = wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="a dead letter")[0]
    payment = wait_until(lambda: (p := _payment(redis_client, message.message_id)) and p.webhook_state == "failed"
                         and p, what="a failed webhook")
    attempts = payment.to_json()["webhook"]["attempts"]
    # No note from the actor: the row comes from the exception, with its status
    assert [(a["attempt"], a["http_status"]) for a in attempts] == [(1, 502), (2, 502), (3, 502)]
    assert attempts[-1]["attempt"] == letter["options"]["retries"] + 1  # `whiskypay failed`'s ATTEMPTS


def test_a_deferral_is_not_an_attempt(
    redis_client: redis.Redis, ledger_broker: WhiskyPayRedisBroker, run_worker: Callable[[], Worker]
) -> None:
    calls = []

    @dramatiq.actor(broker=ledger_broker, actor_name="send_callback", queue_name="callbackQueue")
    def send_callback(**kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Deferred("slow host; deferred", delay_ms=10)
        note_attempt("webhook", "delivered", code=204)

    message = send_callback.send(**_callback_kwargs())
    run_worker()
    payment = wait_until(lambda: (p := _payment(redis_client, message.message_id)) and p.webhook_state == "delivered"
                         and p, what="a delivered webhook")
    assert len(calls) == 2
    assert [(a["attempt"], a["http_status"]) for a in payment.to_json()["webhook"]["attempts"]] == [(1, 204)]


def test_a_ledger_write_that_fails_never_fails_or_repeats_the_delivery(
    redis_client: redis.Redis, ledger_broker: WhiskyPayRedisBroker, run_worker: Callable[[], Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a payment key Redis refuses every ledger write to (WRONGTYPE: it holds a string)
    key = ledger.payment_key(NAMESPACE, ledger.payment_id(event_id="pay_refused", merchant_id=None, message_id=""))
    redis_client.set(key, "not a hash")
    calls = []

    @dramatiq.actor(broker=ledger_broker, actor_name="send_callback", queue_name="callbackQueue")
    def send_callback(**kwargs: Any) -> None:
        calls.append(1)

    # When it is sent (the pending record is refused inside the enqueue's script) and delivered
    send_callback.send_with_options(kwargs=_callback_kwargs(event_id="pay_refused"), max_retries=0)
    worker = run_worker()
    wait_until(lambda: calls, what="the delivery")
    ledger_broker.join("callbackQueue", timeout=5000)
    worker.join()
    # Then send() succeeded and the message ran once and was acked: nothing in flight, nothing dead-lettered;
    # both refusals (the pending record's at send(), the attempt's after the ack) were logged
    wait_until(lambda: "Could not record" in caplog.text, what="the attempt's failure logged")
    time.sleep(0.3)
    assert calls == [1]
    assert not dead_letters(redis_client, "callbackQueue")
    assert not any(redis_client.scard(k) for k in redis_client.keys(f"{NAMESPACE}:__acks__*"))
    assert "is enqueued but not entered in the delivery ledger" in caplog.text and "WRONGTYPE" in caplog.text
    assert redis_client.get(key) == b"not a hash"


def _enter(client: redis.Redis, config: LedgerConfig, message: Message[Any], now_ms: int) -> None:
    op = ledger.pending_op(config, message, now_ms=now_ms)
    assert op is not None
    LedgerWriter(client).write(op, data=message.encode())


def _callback(event_id: str | None = None, merchant_id: str | None = None, email: str = BUYER) -> Message[Any]:
    kwargs = _callback_kwargs(email=email)
    if event_id:
        kwargs["event_id"] = event_id
    if merchant_id:
        kwargs["merchant_id"] = merchant_id
    return Message(queue_name="callbackQueue", actor_name="send_callback", args=(), kwargs=kwargs, options={})


def test_the_cap_drops_the_oldest_payments_with_every_key_that_points_at_them(redis_client: redis.Redis) -> None:
    config = LedgerConfig(namespace=NAMESPACE, retention_s=3600, max_payments=3)
    messages = [_callback(event_id=f"pay_{n}", email=f"b{n}@example.com") for n in range(5)]
    for n, message in enumerate(messages):
        _enter(redis_client, config, message, now_ms=int(time.time() * 1000) + n)
    # Then only the newest three remain, and nothing of the two oldest
    assert redis_client.zcard(ledger.time_index_key(NAMESPACE)) == 3
    for old in messages[:2]:
        assert _payment(redis_client, old.kwargs["event_id"]) is None
        assert not redis_client.exists(ledger.event_index_key(NAMESPACE, old.kwargs["event_id"]))
        assert not redis_client.exists(ledger.message_index_key(NAMESPACE, old.message_id))
        assert not redis_client.exists(ledger.address_index_key(NAMESPACE, old.kwargs["email"]))
    assert all(_payment(redis_client, m.kwargs["event_id"]) for m in messages[2:])
    assert not [key for key in redis_client.keys("*") if b"pay_0" in key or b"pay_1" in key]


def test_a_merchants_payments_are_indexed_newest_first_and_the_cap_drops_them_from_its_index(
    redis_client: redis.Redis,
) -> None:
    # Given five payments of merchant acme (and one of acme:eu) and a cap of three payments
    config = LedgerConfig(namespace=NAMESPACE, retention_s=3600, max_payments=3)
    now = int(time.time() * 1000)
    _enter(redis_client, config, _callback(event_id="pay_eu", merchant_id="acme:eu"), now)
    for n in range(5):
        _enter(redis_client, config, _callback(event_id=f"pay_{n}", merchant_id="acme"), now + 1 + n)
        if n == 1:  # then the merchant index holds both, newest first, each once (an attempt adds nothing)
            assert ledger.merchant_payments(redis_client, NAMESPACE, "acme") == [
                ledger.payment_id(event_id=f"pay_{k}", merchant_id="acme", message_id="") for k in (1, 0)]
    # Then the cap dropped the oldest three from the merchants' indexes too, and the rest are paged newest first
    pids = ledger.merchant_payments(redis_client, NAMESPACE, "acme")
    found = load_payments(redis_client, NAMESPACE, pids)
    assert [p.event_id for p in found] == ["pay_4", "pay_3", "pay_2"]
    assert ledger.merchant_payments(redis_client, NAMESPACE, "acme", start=1, num=1) == pids[1:2]
    assert ledger.merchant_payments(redis_client, NAMESPACE, "acme:eu") == []
    assert 0 < redis_client.pttl(ledger.merchant_index_key(NAMESPACE, "acme")) <= 3600_000


def _email_job(event_id: str | None = None, merchant_id: str | None = None) -> Message[Any]:
    kwargs: dict[str, Any] = {"buyer_email": BUYER, "merchant_email": "owner@merchant.example", "plan": "pro",
                              "saas_name": "Acme"}
    if event_id:
        kwargs["event_id"] = event_id
    if merchant_id:
        kwargs["merchant_id"] = merchant_id
    return Message(queue_name="emailQueue", actor_name="send_email", args=(), kwargs=kwargs, options={})


def _with_options(message: Message[Any], **options: Any) -> Message[Any]:
    return message.copy(options=options)


def _ledger_dump(client: redis.Redis, namespace: str) -> dict[str, tuple[str, Any, int]]:
    """Every ledger key of namespace, named without its prefix: (type, value, TTL in ms or -1 for none)."""
    prefix = ledger.ledger_prefix(namespace)
    read = {
        "hash": client.hgetall, "string": client.get, "list": lambda key: client.lrange(key, 0, -1),
        "zset": lambda key: client.zrange(key, 0, -1, withscores=True),
    }
    dump = {}
    for raw in client.keys(f"{prefix}*"):
        kind = keys.text(client.type(raw))
        dump[keys.text(raw).removeprefix(prefix)] = (kind, read[kind](raw), int(client.pttl(raw)))
    return dump


#: Sequences of ledger writes: ("pending", message) at send(), or ("state", message, state) (an attempt's, the
#: breaker's parked), each a millisecond after the one before.
PENDING_SCENARIOS: dict[str, list[tuple[Any, ...]]] = {
    "a callback with an event id": [("pending", _callback(event_id="pay_a"))],
    "a callback without one": [("pending", _callback())],
    "a merchant's callback with a webhook_id of its own": [
        ("pending", _with_options(_callback(event_id="pay_b", merchant_id="acme"), webhook_id="wh_own"))],
    "an email job without an event id": [("pending", _email_job())],
    "the email job, then the callback of one payment": [
        ("pending", _email_job(event_id="pay_c", merchant_id="acme")),
        ("pending", _callback(event_id="pay_c", merchant_id="acme"))],
    "the callback delivered, then the email job, then another callback of the event": [
        ("pending", _callback(event_id="pay_d")), ("state", _callback(event_id="pay_d"), "delivered"),
        ("pending", _email_job(event_id="pay_d")), ("pending", _callback(event_id="pay_d"))],
    "a webhook's second delivery (a resend) after its first failed": [
        ("pending", _callback(event_id="pay_e")), ("state", _callback(event_id="pay_e"), "failed"),
        ("pending", _with_options(_callback(event_id="pay_e"), **{ledger.DELIVERY_OPTION: 2})),
        ("pending", _callback(event_id="pay_e"))],
    "five payments over a cap of three": [
        ("pending", _callback(event_id=f"pay_f{n}", merchant_id="acme" if n % 2 else None,
                              email=f"b{n}@example.com"))
        for n in range(5)],
}


@pytest.mark.parametrize("scenario", sorted(PENDING_SCENARIOS))
def test_the_enqueues_pending_record_writes_what_the_ledgers_own_write_does(
    redis_client: redis.Redis, scenario: str
) -> None:
    # Given the same writes, once through ledger_write (pending_op) and once through the enqueue script's own
    # pending record (pending_args), each in a namespace of its own
    steps = PENDING_SCENARIOS[scenario]
    general, lean = f"{NAMESPACE}-general", f"{NAMESPACE}-lean"
    configs = {ns: LedgerConfig(namespace=ns, retention_s=3600, max_payments=3) for ns in (general, lean)}
    broker = WhiskyPayRedisBroker(client=redis_client, namespace=lean, middleware=[])
    writer = LedgerWriter(redis_client)
    now = int(time.time() * 1000)
    try:
        for n, (what, message, *state) in enumerate(steps):
            for ns, config in configs.items():
                if what == "state":
                    op = ledger.state_op(config, message, state[0], now_ms=now + n)
                    assert op is not None
                    writer.write(op)
                elif ns == general:
                    op = ledger.pending_op(config, message, now_ms=now + n)
                    assert op is not None
                    writer.write(op, data=message.encode())
                else:
                    redis_id = f"r{n}"
                    args = ledger.pending_args(config, message, now_ms=now + n)
                    assert args is not None
                    ledger.stage_pending(redis_id, args)
                    broker.do_enqueue(message.queue_name, redis_id, message.encode(), holder=message.message_id)
    finally:
        broker.close()
    # Then both wrote the same keys, fields, members and scores, with the same TTLs (to the second)
    written = {ns: _ledger_dump(redis_client, ns) for ns in (general, lean)}
    assert written[general], "the scenario wrote nothing"
    assert sorted(written[lean]) == sorted(written[general])
    for name, (kind, value, ttl) in written[general].items():
        lean_kind, lean_value, lean_ttl = written[lean][name]
        assert (lean_kind, lean_value) == (kind, value), name
        assert (lean_ttl < 0) == (ttl < 0) and abs(lean_ttl - ttl) < 1000, (name, ttl, lean_ttl)


def test_records_and_their_indexes_expire_after_the_retention(redis_client: redis.Redis) -> None:
    config = LedgerConfig(namespace=NAMESPACE, retention_s=1, max_payments=10)
    _enter(redis_client, config, _callback(event_id="pay_short"), now_ms=int(time.time() * 1000))
    assert _payment(redis_client, "pay_short") is not None
    time.sleep(1.2)
    assert _payment(redis_client, "pay_short") is None
    assert redis_client.keys(f"{ledger.ledger_prefix(NAMESPACE)}*") == [ledger.time_index_key(NAMESPACE).encode()]


def test_one_event_id_of_two_merchants_is_ambiguous_unless_the_merchant_is_given(redis_client: redis.Redis) -> None:
    now = int(time.time() * 1000)
    _enter(redis_client, CONFIG, _callback(event_id="pay_same", merchant_id="acme"), now)
    _enter(redis_client, CONFIG, _callback(event_id="pay_same", merchant_id="acme:eu"), now)
    assert len(resolve(redis_client, NAMESPACE, "pay_same")) == 2
    found = load_payments(redis_client, NAMESPACE, resolve(redis_client, NAMESPACE, "pay_same", "acme"))
    assert [payment.merchant_id for payment in found if payment.merchant_id == "acme"] == ["acme"]


def test_a_state_never_goes_back_and_an_older_delivery_never_overrides_a_newer_one(redis_client: redis.Redis) -> None:
    now = int(time.time() * 1000)
    message = _callback(event_id="pay_states")
    _enter(redis_client, CONFIG, message, now)
    writer = LedgerWriter(redis_client)

    def attempt(msg: Message[Any], n: int, exception: BaseException | None, failed: bool = False) -> None:
        op = ledger.attempt_op(CONFIG, msg, attempt=n, notes=[], exception=exception, failed=failed, now_ms=now,
                               started_ms=now, duration_ms=1.0)
        assert op is not None
        writer.write(op)

    attempt(message, 1, None)
    attempt(message, 1, HttpStatusError("HTTP 500", http_status=500))  # a duplicate copy failing later
    assert _payment(redis_client, "pay_states").webhook_state == "delivered"  # type: ignore[union-attr]
    # A resend (delivery 2) goes back to pending; a late attempt of delivery 1 does not change it
    resent = message.copy(options={ledger.DELIVERY_OPTION: 2})
    op = ledger.pending_op(CONFIG, resent, now_ms=now, replay=True)
    assert op is not None
    writer.write(op)
    attempt(message, 2, HttpStatusError("HTTP 500", http_status=500), failed=True)
    payment = _payment(redis_client, "pay_states")
    assert payment is not None and payment.webhook_state == "pending" and payment.fields["w.n"] == "2"


def test_forget_erases_the_address_from_the_ledger_and_counts_the_records(redis_client: redis.Redis) -> None:
    now = int(time.time() * 1000)
    _enter(redis_client, CONFIG, _callback(event_id="pay_f1", email="Forget.Me@example.com"), now)
    _enter(redis_client, CONFIG, _callback(event_id="pay_f2", email="forget.me@example.com"), now)
    _enter(redis_client, CONFIG, _callback(event_id="pay_keep", email="keep@example.com"), now)
    email_job = Message(queue_name="emailQueue", actor_name="send_email", args=(), options={},
                        kwargs={"buyer_email": "forget.me@example.com", "merchant_email": "o@example.org",
                                "plan": "p", "saas_name": "s"})
    _enter(redis_client, CONFIG, email_job, now)
    assert ledger.forget_address(redis_client, NAMESPACE, "forget.me@example.com") == 3
    dump = b"".join(
        b"".join(redis_client.hvals(key)) if redis_client.type(key) == b"hash" else redis_client.get(key) or b""
        for key in redis_client.keys(f"{NAMESPACE}:*ledger:[pw]:*")
    ).lower()
    assert b"forget.me@example.com" not in dump and b"f***@example.com" not in dump
    assert b"keep@example.com" in dump
    assert ledger.forget_address(redis_client, NAMESPACE, "forget.me@example.com") == 0


# --------------------------------------------------------------------------------------------------------------------
# Tier 3: the commands on dead letters (no worker: what they write into Redis)
# --------------------------------------------------------------------------------------------------------------------


def _dead_letter(client: redis.Redis, *, merchant_id: str | None, failed_at_ms: int, email: str = BUYER) -> str:
    """Store one dead-lettered callback as Dramatiq and DeadLetterReasons leave it; return its message id."""
    kwargs = _callback_kwargs(email=email)
    if merchant_id:
        kwargs["merchant_id"] = merchant_id
    message = Message(queue_name="callbackQueue", actor_name="send_callback", args=(), kwargs=kwargs,
                      options={"redis_message_id": f"r-{failed_at_ms}-{merchant_id}", "retries": 4,
                               "failed_at": failed_at_ms, "traceback": "HttpStatusError: HTTP 503 from x"})
    redis_id = message.options["redis_message_id"]
    client.zadd(f"{NAMESPACE}:callbackQueue.XQ", {redis_id: failed_at_ms})
    client.hset(f"{NAMESPACE}:callbackQueue.XQ.msgs", redis_id, message.encode())
    return message.message_id


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from whiskypay.cli import main

    capsys.readouterr()
    status = main(list(argv))
    return status, capsys.readouterr().out


def test_retry_of_one_merchant_since_a_time_moves_only_its_newer_dead_letters_into_the_replay_lane(
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    from whiskypay import keys

    now = int(time.time() * 1000)
    old_acme = _dead_letter(redis_client, merchant_id="acme", failed_at_ms=now - 3 * 3600_000)
    new_acme = _dead_letter(redis_client, merchant_id="acme", failed_at_ms=now - 60_000)
    other = _dead_letter(redis_client, merchant_id="globex", failed_at_ms=now - 60_000)
    none = _dead_letter(redis_client, merchant_id=None, failed_at_ms=now - 60_000)
    # When one merchant's dead letters of the last hour are re-driven
    status, out = _cli(capsys, "retry", "--queue", "callbackQueue", "--merchant", "acme", "--since", "1h")
    # Then only that one moved, into the lane (workers take it after fresh work), as the webhook's 2nd delivery
    assert status == 0 and "Re-drove 1 dead letter(s) of merchant acme onto callbackQueue." in out and new_acme in out
    lane = redis_client.hvals(keys.replay_lane_messages(NAMESPACE, "callbackQueue"))
    assert [json.loads(raw)["message_id"] for raw in lane] == [new_acme]
    moved = json.loads(lane[0])
    assert "retries" not in moved["options"] and moved["options"][ledger.DELIVERY_OPTION] == 2
    left = {letter["message_id"] for letter in dead_letters(redis_client, "callbackQueue")}
    assert left == {old_acme, other, none}
    # And `status` says one replay waits in callbackQueue's lane
    status, out = _cli(capsys, "status", "--json")
    assert json.loads(out)["replays_waiting"] == {"callbackQueue": 1, "emailQueue": 0, "maintenanceQueue": 0}
    assert "Replays waiting" in _cli(capsys, "status")[1]
    # And the ledger has it as pending again
    payment = _payment(redis_client, new_acme)
    assert payment is not None and payment.webhook_state == "pending"
    # A bad --since is refused (exit 2) with the forms it takes
    with pytest.raises(SystemExit) as caught:
        _cli(capsys, "retry", "--queue", "callbackQueue", "--merchant", "acme", "--since", "last week")
    assert caught.value.code == 2


def test_forget_masks_the_address_in_dead_letters_which_retry_then_skips(
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    erased = _dead_letter(redis_client, merchant_id="acme", failed_at_ms=now - 1000, email="gone@example.com")
    kept = _dead_letter(redis_client, merchant_id="globex", failed_at_ms=now - 1000, email="stay@example.com")
    status, out = _cli(capsys, "forget", "--email", "GONE@example.com")
    assert status == 0 and "from 0 ledger record(s) and 1 dead letter(s)" in out and "gone@" not in out
    raw = b"".join(redis_client.hvals(f"{NAMESPACE}:callbackQueue.XQ.msgs"))
    assert b"gone@example.com" not in raw and b"stay@example.com" in raw
    status, out = _cli(capsys, "retry", "--queue", "callbackQueue", "--all")
    assert "skipped (address erased by forget)" in out and erased in out
    assert [letter["message_id"] for letter in dead_letters(redis_client, "callbackQueue")] == [erased]
    assert kept in out and "Re-drove 1 dead letter(s)" in out


def test_event_exits_1_for_an_unknown_id_and_events_filters_by_state(
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    _enter(redis_client, CONFIG, _callback(event_id="pay_listed", merchant_id="acme"), now)
    assert _cli(capsys, "event", "pay_unknown")[0] == 1
    status, out = _cli(capsys, "events", "--state", "pending", "--merchant", "acme")
    assert status == 0 and "pay_listed" in out and BUYER not in out
    assert _cli(capsys, "events", "--state", "delivered")[0] == 1
    status, out = _cli(capsys, "events", "--json", "--since", "1h")
    assert [item["event_id"] for item in json.loads(out)] == ["pay_listed"]


def test_one_payment_costs_about_three_kib_of_redis_memory(redis_client: redis.Redis, report: Any) -> None:
    # Given 1,000 typical payments: a callback delivered on its second attempt and an email job sent at once
    def payment(n: int) -> None:
        now = int(time.time() * 1000)
        callback = _callback(event_id=f"pay_mem_{n:06d}", merchant_id="merchant_acme_01", email=f"buyer{n}@example.com")
        callback.options["webhook_id"] = callback.kwargs["event_id"]
        email = Message(queue_name="emailQueue", actor_name="send_email", args=(), options={},
                        kwargs={"buyer_email": f"buyer{n}@example.com", "merchant_email": "owner@acme.example",
                                "plan": "pro", "saas_name": "Acme Analytics", "event_id": callback.kwargs["event_id"],
                                "merchant_id": "merchant_acme_01"})
        writer = LedgerWriter(redis_client)
        for message in (callback, email):
            _enter(redis_client, CONFIG, message, now)
        failed = [ledger.Note("webhook", "failed", 503, 41.0, "HttpStatusError: HTTP 503 from shop.acme.example",
                              '{"error":"maintenance"}')]
        delivered = [ledger.Note("webhook", "delivered", 200, 38.0, None, '{"ok":true}')]
        sent = [ledger.Note("buyer", "delivered", 250, 12.0), ledger.Note("merchant", "delivered", 250, 11.0)]
        for msg, attempt, notes, exc in ((callback, 1, failed, HttpStatusError("HTTP 503", http_status=503)),
                                         (callback, 2, delivered, None), (email, 1, sent, None)):
            op = ledger.attempt_op(CONFIG, msg, attempt=attempt, notes=notes, exception=exc, failed=False,
                                   now_ms=now, started_ms=now, duration_ms=40.0)
            assert op is not None
            writer.write(op)

    payment(0)
    before = int(redis_client.info("memory")["used_memory"])
    for n in range(1, 1001):
        payment(n)
    per_payment = (int(redis_client.info("memory")["used_memory"]) - before) / 1000
    one = ledger.payment_id(event_id="pay_mem_000500", merchant_id="merchant_acme_01", message_id="")
    hash_bytes = redis_client.memory_usage(ledger.payment_key(NAMESPACE, one))
    attempts_bytes = redis_client.memory_usage(ledger.attempts_key(NAMESPACE, one))
    report(f"one payment (callback 2 attempts + 2 emails) in Redis: {per_payment:.0f} B with its index entries "
           f"(used_memory over 1,000); MEMORY USAGE of its hash {hash_bytes} B, of its attempts {attempts_bytes} B")
    assert per_payment < 3500


def test_resend_dry_run_names_the_delivery_it_would_send_and_sends_nothing(
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    from whiskypay import keys

    _enter(redis_client, CONFIG, _callback(event_id="pay_dry", merchant_id="acme"), int(time.time() * 1000))
    status, out = _cli(capsys, "resend", "pay_dry", "--dry-run")
    assert status == 0 and "would resend pay_dry (webhook-id pay_dry, delivery 2)" in out
    assert redis_client.zcard(keys.replay_lane(NAMESPACE, "callbackQueue")) == 0
    status, out = _cli(capsys, "resend", "pay_missing")
    assert status == 1 and "not found" in out


def test_resend_works_on_a_redis_that_has_not_loaded_the_ledger_script(
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    from whiskypay import keys

    # Given a payment, and a Redis whose script cache is empty (restarted, or failed over to a replica)
    _enter(redis_client, CONFIG, _callback(event_id="pay_fresh", merchant_id="acme"), int(time.time() * 1000))
    redis_client.script_flush()
    # When it is resent, then it goes into the replay lane and the ledger records its new delivery as pending
    status, out = _cli(capsys, "resend", "pay_fresh")
    assert status == 0, out
    assert redis_client.zcard(keys.replay_lane(NAMESPACE, "callbackQueue")) == 1
    payment = _payment(redis_client, "pay_fresh")
    assert payment is not None and payment.fields["w.n"] == "2" and payment.webhook_state == "pending"


def test_a_parked_callback_is_parked_in_the_ledger_and_only_an_attempt_made_is_a_row(redis_client: redis.Redis) -> None:
    from whiskypay.errors import Parked

    now = int(time.time() * 1000)
    message = _callback(event_id="pay_parked", merchant_id="acme")
    _enter(redis_client, CONFIG, message, now)
    writer = LedgerWriter(redis_client)
    # An attempt that failed and was parked by its merchant's breaker: a row, and the state parked
    message.options["parked"] = True
    op = ledger.attempt_op(CONFIG, message, attempt=1, notes=[], failed=False, now_ms=now, started_ms=now,
                           duration_ms=1.0, exception=HttpStatusError("HTTP 503", http_status=503))
    assert op is not None
    writer.write(op)
    # A later one parked before it ran (the breaker was open): no row
    del message.options["parked"]
    op = ledger.attempt_op(CONFIG, message, attempt=2, notes=[], failed=False, now_ms=now, started_ms=now,
                           duration_ms=0.0, exception=Parked("merchant acme is unreachable: parked"))
    assert op is not None
    writer.write(op)
    payment = _payment(redis_client, "pay_parked")
    assert payment is not None and payment.webhook_state == "parked"
    assert [(row["n"], row["o"], row.get("c")) for row in payment.rows] == [(1, "failed", 503)]


def test_one_refused_record_in_a_batch_loses_none_of_the_others(
    redis_client: redis.Redis, ledger_broker: WhiskyPayRedisBroker
) -> None:
    from middleware.ledger import DeliveryLedger
    from whiskypay.broker import middleware_of

    now = int(time.time() * 1000)
    messages = [_callback(event_id=f"pay_batch_{n}") for n in range(3)]
    redis_client.set(ledger.payment_key(NAMESPACE, ledger.message_payment_id(messages[1])), "not a hash")
    middleware = middleware_of(ledger_broker, DeliveryLedger)
    for message in messages:
        op = ledger.attempt_op(CONFIG, message, attempt=1, notes=[], exception=None, failed=False, now_ms=now,
                               started_ms=now, duration_ms=1.0)
        assert op is not None
        middleware._backlog.append(op)
    # When the writer sends them in one call, the middle one refused (WRONGTYPE)
    assert middleware.flush(ledger_broker) == 2
    # Then the other two are recorded, and the refused one is dropped (a configuration error), not retried
    assert [(_payment(redis_client, m.kwargs["event_id"]) or Payment("", {})).webhook_state for m in messages] == [
        "delivered", None, "delivered"
    ]
    assert not middleware._backlog


@pytest.mark.parametrize("argv", [["event", "pay_x"], ["events"], ["reconcile", "--since", "1h"], ["resend", "pay_x"],
                                  ["forget", "--email", "a@example.com"]])
def test_every_ledger_command_exits_2_naming_the_setting_when_redis_is_unreachable(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from settings import get_settings
    from whiskypay.devstack import free_port

    monkeypatch.setenv("WHISKYPAY_REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()
    try:
        from whiskypay.cli import main

        status = main(argv)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert status == 2 and "WHISKYPAY_REDIS_URL" in err and "hunter2" not in err


def test_a_write_queued_on_a_pipeline_works_on_a_redis_that_never_ran_the_ledger_script(
    redis_client: redis.Redis,
) -> None:
    # Given a Redis whose script cache is empty (fresh, restarted, or SCRIPT FLUSHed), as `whiskypay resend` meets it
    redis_client.script_flush()
    message = _callback(event_id="pay_fresh_redis")
    op = ledger.pending_op(CONFIG, message, now_ms=int(time.time() * 1000))
    assert op is not None
    # When the write is queued on a pipeline (EVALSHA cannot fall back to loading the script there)
    pipe = redis_client.pipeline(transaction=False)
    LedgerWriter(redis_client).queue(pipe, op, data=message.encode())
    replies = pipe.execute(raise_on_error=False)
    # Then it ran: no NoScriptError, and the payment is in the ledger
    assert not any(isinstance(reply, Exception) for reply in replies), replies
    assert _payment(redis_client, "pay_fresh_redis") is not None
