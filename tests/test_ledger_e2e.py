"""The delivery ledger end to end: real worker processes, the real receiver and SMTP sink, the real CLI (issue 11).

One worker process (4 threads) serves every test of this module; each test uses its own event ids and receiver
paths, so they share it without flushing between them.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from tests.helpers import NAMESPACE, TEST_SECRET, dead_letters, wait_until
from whiskypay.devstack import HttpReceiver, Received, Response, SmtpSink, WorkerProcess

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent
BUYER = "ledger-buyer@example.com"
MERCHANT = "ledger-owner@merchant.example"


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the test database, flushed once before the module's worker starts and after the module."""
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as rcv:
        yield rcv


@pytest.fixture(scope="module")
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def worker(
    client: redis.Redis, smtp_sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One `dramatiq actors` process with 4 threads, fast retries (300 ms doubling) and fast idle polling."""
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "PYTHONUNBUFFERED": "1",
        "WHISKYPAY_SMTP_HOST": smtp_sink.host,
        "WHISKYPAY_SMTP_PORT": str(smtp_sink.port),
        "WHISKYPAY_WEBHOOK_SECRET": TEST_SECRET,
        "WHISKYPAY_CALLBACK_BACKOFF_MS": "300",
        "WHISKYPAY_EMAIL_BACKOFF_MS": "100",
        "dramatiq_worker_timeout": "100",
        "WHISKYPAY_REPLAY_RATE": "200",
    })
    log = tmp_path_factory.mktemp("ledger-worker") / "worker.log"
    process = WorkerProcess(env=env, cwd=str(REPO_ROOT), threads=4, log_path=str(log))
    process.start(wait_ready=True, timeout_s=30)
    yield process
    process.stop()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run `whiskypay ARGV...` in this process; return its exit status and stdout."""
    from whiskypay.cli import main

    capsys.readouterr()
    status = main(list(argv))
    return status, capsys.readouterr().out


def event_json(capsys: pytest.CaptureFixture[str], ident: str) -> dict[str, Any] | None:
    status, out = cli(capsys, "event", ident, "--json")
    return json.loads(out) if status == 0 else None


def wait_state(capsys: pytest.CaptureFixture[str], ident: str, state: str, timeout_s: float = 15) -> dict[str, Any]:
    """Wait until the webhook of ident is in state; return its `event --json`."""
    def ready() -> dict[str, Any] | None:
        found = event_json(capsys, ident)
        return found if found and found["webhook"] and found["webhook"]["state"] == state else None

    return wait_until(ready, timeout_s=timeout_s, what=f"webhook of {ident} {state}")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def pay(receiver: HttpReceiver, path: str, event_id: str, **extra: Any) -> Any:
    from actors import send_callback

    return send_callback.send(callback_url=receiver.url(path), email=BUYER, plan="pro", price=19.99,
                              event_id=event_id, **extra)


def test_a_500_then_200_webhook_has_two_attempts_with_those_statuses(
    worker: WorkerProcess, receiver: HttpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a merchant that answers 500, then 200
    receiver.respond("/flaky", Response(status=500, body=b'{"error":"db down"}'), Response(status=200, body=b"ok"))
    event_id = new_id("pay_flaky")
    pay(receiver, "/flaky", event_id)
    # When the webhook is delivered on the second try
    found = wait_state(capsys, event_id, "delivered")
    # Then `event --json` shows both attempts with their statuses, in order
    webhook = found["webhook"]
    assert found["event_id"] == event_id and webhook["webhook_id"] == event_id
    assert [(a["attempt"], a["outcome"], a["http_status"]) for a in webhook["attempts"]] == [
        (1, "failed", 500), (2, "delivered", 200)
    ]
    first, second = webhook["attempts"]
    assert first["error"] == "HttpStatusError: HTTP 500 from 127.0.0.1" and second["error"] is None
    assert first["response"] == '{"error":"db down"}' and second["response"] == "ok"
    assert first["at"] < second["at"] and all(a["duration_ms"] is not None for a in webhook["attempts"])
    assert found["emails"] is None  # a callback-only payment
    # And the human view says the same, with the buyer nowhere in it
    status, out = cli(capsys, "event", event_id)
    assert status == 0 and "delivered" in out and "500" in out and BUYER not in out


def test_an_email_that_failed_once_then_went_out_shows_both_attempts(
    worker: WorkerProcess, smtp_sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    from actors import send_email

    # Given an SMTP relay that refuses the merchant's email once (the buyer's goes out)
    merchant = f"{uuid.uuid4().hex[:8]}-{MERCHANT}"
    smtp_sink.fail_next(1, code=451, rcpt=merchant)
    message = send_email.send(buyer_email=BUYER, merchant_email=merchant, plan="pro", saas_name="Acme")

    def both_sent() -> dict[str, Any] | None:
        found = event_json(capsys, message.message_id)
        return found if found and all(email["state"] == "sent" for email in found["emails"]) else None

    found = wait_until(both_sent, what="both emails sent")
    buyer, owner = found["emails"]
    # Then the buyer's email has one attempt, the merchant's two: 451, then 250
    assert (buyer["role"], buyer["to"]) == ("buyer", "l***@example.com")
    assert [(a["attempt"], a["outcome"], a["smtp_code"]) for a in buyer["attempts"]] == [(1, "delivered", 250)]
    assert owner["role"] == "merchant" and "@merchant.example" in owner["to"] and merchant not in owner["to"]
    assert [(a["attempt"], a["outcome"], a["smtp_code"]) for a in owner["attempts"]] == [
        (1, "failed", 451), (2, "delivered", 250)
    ]
    assert "451" in owner["attempts"][0]["error"]
    assert found["webhook"] is None


def test_a_payment_shows_its_webhook_and_both_emails_together_and_one_merchants_event_id_is_its_own(
    worker: WorkerProcess, receiver: HttpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    from actors import send_email

    # Given one payment (callback and email job with the same event_id and merchant) and the same event id used
    # by another merchant
    event_id = new_id("pay_both")
    pay(receiver, "/both", event_id, merchant_id="acme")
    send_email.send(buyer_email=BUYER, merchant_email=MERCHANT, plan="pro", saas_name="Acme", event_id=event_id,
                    merchant_id="acme")
    pay(receiver, "/both", event_id, merchant_id="globex")

    def complete() -> dict[str, Any] | None:
        status, out = cli(capsys, "event", event_id, "--merchant", "acme", "--json")
        found = json.loads(out) if status == 0 else None
        done = found and found["webhook"]["state"] == "delivered" and found["emails"] and all(
            email["state"] == "sent" for email in found["emails"])
        return found if done else None

    # Then the ledger shows them as one payment
    found = wait_until(complete, what="the payment complete")
    assert found["event_id"] == event_id and found["merchant_id"] == "acme"
    assert [email["role"] for email in found["emails"]] == ["buyer", "merchant"]
    # And without --merchant the id is ambiguous: both are listed and the exit status is 1
    status, out = cli(capsys, "event", event_id)
    assert status == 1 and "acme" in out and "globex" in out and "--merchant" in out
    # And `events` lists them one line per payment, with the buyer masked
    status, out = cli(capsys, "events", "--merchant", "acme", "--since", "10m")
    assert status == 0 and event_id in out and BUYER not in out and "sent/sent" in out


def test_a_delivered_webhook_resent_arrives_again_with_the_same_webhook_id_and_a_valid_signature(
    worker: WorkerProcess, receiver: HttpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    event_id = new_id("pay_resend")
    pay(receiver, "/resend", event_id)
    wait_state(capsys, event_id, "delivered")
    first = receiver.wait_for(1, "/resend")[0]
    # When the merchant says they lost it and the operator resends it
    status, out = cli(capsys, "resend", event_id)
    assert status == 0 and f"resent {event_id}" in out
    second = receiver.wait_for(2, "/resend")[1]
    # Then it arrives again: the same webhook-id and body, signed anew (a valid signature, its own timestamp)
    assert second.headers["webhook-id"] == first.headers["webhook-id"] == event_id
    assert second.body == first.body
    Webhook(TEST_SECRET).verify(second.body, second.headers)
    # And the ledger shows it as a second delivery of the same payment, with its own attempt count
    found = wait_until(lambda: (f := event_json(capsys, event_id)) and f["webhook"]["deliveries"] == 2
                       and f["webhook"]["state"] == "delivered" and f, what="the resend recorded")
    assert [(a["delivery"], a["attempt"], a["outcome"]) for a in found["webhook"]["attempts"]] == [
        (1, 1, "delivered"), (2, 1, "delivered")
    ]
    # And idempotency still refuses a second *send* of the payment
    pay(receiver, "/resend", event_id)
    time.sleep(0.5)
    assert len(receiver.requests("/resend")) == 2


def test_reconcile_lists_a_payment_whose_merchant_is_down_and_stops_once_it_is_delivered(
    worker: WorkerProcess, receiver: HttpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a merchant that is down
    up = threading.Event()
    receiver.set_handler("/down", lambda request: Response(status=200 if up.is_set() else 503))
    event_id = new_id("pay_down")
    pay(receiver, "/down", event_id)
    wait_state(capsys, event_id, "retrying")
    # Then reconcile lists it, with what is missing, and exits 1
    status, out = cli(capsys, "reconcile", "--since", "10m", "--json")
    missing = {item["event_id"]: item["missing"] for item in json.loads(out)}
    assert status == 1 and missing[event_id] == ["webhook retrying"]
    # When the merchant is back and the retry goes through
    up.set()
    wait_state(capsys, event_id, "delivered")
    # Then reconcile no longer lists it
    status, out = cli(capsys, "reconcile", "--since", "10m", "--json")
    assert event_id not in {item["event_id"] for item in json.loads(out)}


def test_forget_removes_an_address_from_the_ledger_and_the_dead_letters(
    worker: WorkerProcess, receiver: HttpReceiver, client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    from actors import send_callback, send_email

    address = f"forget-{uuid.uuid4().hex[:8]}@example.com"
    # Given a delivered webhook, a dead-lettered one and an email job, all for this buyer
    delivered_id = new_id("pay_forget")
    send_callback.send(callback_url=receiver.url("/forget"), email=address, plan="p", price=1, event_id=delivered_id)
    receiver.respond("/forget-dead", Response(status=503))
    dead = send_callback.send_with_options(
        kwargs=dict(callback_url=receiver.url("/forget-dead"), email=address, plan="p", price=1), max_retries=0
    )
    mail = send_email.send(buyer_email=address, merchant_email=MERCHANT, plan="p", saas_name="Acme")
    wait_state(capsys, delivered_id, "delivered")
    wait_until(lambda: any(letter["message_id"] == dead.message_id
                           for letter in dead_letters(client, "callbackQueue")), what="the dead letter")
    wait_until(lambda: (f := event_json(capsys, mail.message_id)) and f["emails"][0]["state"] == "sent",
               what="the emails sent")
    wait_until(lambda: (f := event_json(capsys, dead.message_id)) and f["webhook"]["state"] == "failed",
               what="the failed webhook recorded")
    # When the buyer asks to be forgotten
    status, out = cli(capsys, "forget", "--email", address)
    # Then it says how many records it touched, and the address is nowhere in the ledger or the dead letters
    assert status == 0
    assert "from 3 ledger record(s) and 1 dead letter(s)" in out and address not in out
    stored = []
    for key in client.keys(f"{NAMESPACE}:whiskypay.ledger:*"):
        kind = client.type(key)
        stored += client.hvals(key) if kind == b"hash" else client.lrange(key, 0, -1) if kind == b"list" else []
    ledger_dump = b"".join(stored)
    letters = json.dumps(dead_letters(client, "callbackQueue")).encode()
    assert address.encode() not in ledger_dump and address.encode() not in letters
    # And the erased webhook cannot be resent (its body needed the address)
    status, out = cli(capsys, "resend", delivered_id)
    assert status == 1 and "erased" in out
    # And a second forget finds nothing
    assert cli(capsys, "forget", "--email", address)[0] == 1


def test_retention_expires_records(
    worker: WorkerProcess, receiver: HttpReceiver, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import actors
    from middleware.ledger import DeliveryLedger
    from whiskypay.broker import middleware_of

    # Given a ledger keeping records 2 s (the pending record sets the TTL; the worker's writes keep it)
    monkeypatch.setattr(middleware_of(actors.broker, DeliveryLedger), "retention_s", 2)
    event_id = new_id("pay_short")
    pay(receiver, "/short", event_id)
    wait_state(capsys, event_id, "delivered")
    assert event_id in cli(capsys, "events", "--since", "5m")[1]
    # Then after 2 s neither `event` nor `events` find it
    wait_until(lambda: cli(capsys, "event", event_id)[0] == 1, timeout_s=5, what="the record expired")
    assert event_id not in cli(capsys, "events", "--since", "5m")[1]


def _latencies(receiver: HttpReceiver, path: str, count: int, *, spacing_s: float) -> list[float]:
    """Send count payments to path, spacing_s apart; return each one's send-to-arrival time in ms."""
    sent: dict[str, float] = {}
    for _ in range(count):
        event_id = new_id("pay_fresh")
        sent[event_id] = time.monotonic()
        pay(receiver, path, event_id)
        time.sleep(spacing_s)
    arrived: list[Received] = receiver.wait_for(count, path, timeout_s=30)
    return sorted((hook.at - sent[hook.headers["webhook-id"]]) * 1000 for hook in arrived[:count])


def test_two_thousand_replays_do_not_delay_new_payments(
    worker: WorkerProcess, receiver: HttpReceiver, client: redis.Redis, capsys: pytest.CaptureFixture[str],
    report: Any,
) -> None:
    from whiskypay.ledger import LedgerConfig, LedgerWriter, pending_op

    # Given the usual latency of new payments on this worker
    baseline = _latencies(receiver, "/fresh-before", 20, spacing_s=0.05)
    # And 2,000 payments in the ledger, all resent at once at 200 per second
    config = LedgerConfig(namespace=NAMESPACE, retention_s=3600, max_payments=100_000)
    writer = LedgerWriter(client)
    from dramatiq import Message

    ids = []
    pipe = client.pipeline(transaction=False)
    for _ in range(2000):
        event_id = new_id("pay_replay")
        ids.append(event_id)
        message = Message(queue_name="callbackQueue", actor_name="send_callback", args=(),
                          kwargs=dict(callback_url=receiver.url("/replay"), email=BUYER, plan="pro", price=1,
                                      event_id=event_id),
                          options={"webhook_id": event_id})
        op = pending_op(config, message, now_ms=int(time.time() * 1000))
        assert op is not None
        writer.queue(pipe, op, data=message.encode())
    pipe.execute()
    started = time.monotonic()
    status, out = cli(capsys, "resend", *ids)
    assert status == 0 and "Resent 2000 webhook(s)" in out
    # When new payments come in while the replays go out
    time.sleep(1.0)
    during = _latencies(receiver, "/fresh-during", 40, spacing_s=0.1)
    replays_so_far = len(receiver.requests("/replay"))
    # Then they are delivered within their usual latency (a few replays ahead of them, never thousands)
    p50_before, p95_before = statistics.median(baseline), baseline[int(len(baseline) * 0.95) - 1]
    p50_during, p95_during = statistics.median(during), during[int(len(during) * 0.95) - 1]
    report(f"new payments, p50/p95 ms: {p50_before:.0f}/{p95_before:.0f} alone, {p50_during:.0f}/{p95_during:.0f} "
           f"with 2,000 replays queued at 200/s ({replays_so_far} replayed meanwhile)")
    assert p95_during <= max(3 * p95_before, p95_before + 100), (baseline, during)
    assert 0 < replays_so_far < 2000
    # And the replays go out at the lane's pace: no more than 200 per second, all of them in the end
    arrivals = sorted(hook.at for hook in receiver.wait_for(2000, "/replay", timeout_s=60))
    elapsed = arrivals[-1] - started
    report(f"2,000 replays delivered in {elapsed:.1f} s (lane: 200/s, so at least 9.8 s with the saved-up fifth)")
    assert elapsed >= 9.5
    per_second = max(sum(1 for at in arrivals if second <= at < second + 1) for second in arrivals)
    report(f"busiest second of the replays: {per_second} (WHISKYPAY_REPLAY_RATE=200, a fifth of a second saved up)")
    assert per_second <= 200 * 1.3
