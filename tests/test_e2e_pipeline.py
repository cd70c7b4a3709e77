"""The middleware pipeline end to end: validation, signing, per-queue retries, dead letters, Sentry (issue 3)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from dramatiq import Message
from standardwebhooks.webhooks import Webhook

from tests.helpers import TEST_SECRET, all_queue_keys, dead_letters, queued, wait_until
from whiskypay.devstack import HttpReceiver, Received, Response
from whiskypay.schemas import InvalidPayload

pytestmark = pytest.mark.e2e

SECRET = TEST_SECRET
OLD_SECRET = "whsec_dGhpcy1pcy10aGUtb2xkLXNlY3JldC1mb3Itcm90YXRpb24="
BUYER = "buyer-private@example.com"


def good_callback(receiver: HttpReceiver, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(callback_url=receiver.url("/hook"), email=BUYER, plan="pro", price=19.99)
    kwargs.update(overrides)
    return kwargs


def push_unvalidated(actor_name: str, queue: str, kwargs: dict[str, Any]) -> str:
    """Put a message into Redis the way a foreign producer would: past send()'s validation."""
    import actors

    message = Message(queue_name=queue, actor_name=actor_name, args=(), kwargs=kwargs, options={"redis_message_id": ""})
    message = message.copy(options={"redis_message_id": message.message_id})
    actors.broker.do_enqueue(queue, message.message_id, message.encode())  # below the enqueue hooks
    return message.message_id


BAD_CALLBACKS = [
    ({"callback_url": "ftp://merchant.example/x"}, "callback_url"),
    ({"callback_url": "https://user:pw@merchant.example/x"}, "callback_url: must not carry credentials"),
    ({"callback_url": "/relative/path"}, "callback_url"),
    ({"email": "not-an-address"}, "email"),
    ({"plan": ""}, "plan"),
    ({"plan": "pro\nX-Evil: 1"}, "plan: must not contain control characters"),
    ({"price": -1}, "price"),
    ({"price": float("nan")}, "price"),
    ({"price": "19.99"}, "price"),
    ({"timestamp": "2026-11-27T21:00:00"}, "timestamp: must carry a time zone"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"surprise": 1}, "surprise: is not an argument"),
    ({"plan": "p" * 10_000}, "plan"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_CALLBACKS)
def test_a_bad_argument_is_refused_at_send_and_nothing_reaches_redis(redis_client, receiver, override, expected):
    from actors import send_callback

    with pytest.raises(InvalidPayload, match="send_callback: ") as caught:
        send_callback.send(**good_callback(receiver, **override))
    assert expected in str(caught.value)
    assert all_queue_keys(redis_client) == []


def test_an_https_only_gateway_refuses_http_callbacks(monkeypatch, redis_client):
    from dramatiq import Message as Msg

    import actors
    from middleware.validation import PayloadValidation
    from whiskypay.broker import middleware_of

    validation = middleware_of(actors.broker, PayloadValidation)
    monkeypatch.setattr(validation, "https_only", True)
    message = Msg(queue_name="callbackQueue", actor_name="send_callback", args=(), options={},
                  kwargs=dict(callback_url="http://merchant.example/x", email=BUYER, plan="p", price=1))
    with pytest.raises(InvalidPayload, match="WHISKYPAY_CALLBACK_HTTPS_ONLY=false allows http"):
        actors.broker.enqueue(message)
    assert all_queue_keys(redis_client) == []


def test_an_oversized_message_is_refused_at_send(redis_client, receiver, monkeypatch):
    import actors
    from actors import send_callback

    # (Every argument and option has a length limit, so the default 16 KiB cannot be reached: lower it.)
    monkeypatch.setattr(actors.broker, "max_message_bytes", 1000)
    long_url = receiver.url("/hook") + "?" + "a" * 1500
    with pytest.raises(InvalidPayload, match="over the 1000-byte limit"):
        send_callback.send_with_options(kwargs=good_callback(receiver, callback_url=long_url))
    assert all_queue_keys(redis_client) == []


def test_invalid_messages_in_the_queue_are_dead_lettered_unprocessed_and_the_worker_carries_on(
    redis_client, receiver, smtp_sink, start_workers, env
):
    # Given messages that skipped send()'s checks: wrong types, missing and unknown fields, a bad email
    bad = [
        push_unvalidated("send_callback", "callbackQueue", good_callback(receiver, price="free")),
        push_unvalidated("send_callback", "callbackQueue", {"callback_url": receiver.url("/hook")}),
        push_unvalidated("send_callback", "callbackQueue", good_callback(receiver, debug=True)),
        push_unvalidated("send_email", "emailQueue", dict(buyer_email="x", merchant_email="y", plan="p",
                                                          saas_name="s")),
    ]
    # And a good message behind them
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    worker = start_workers(env=env)
    # Then the good one is delivered, the bad ones are dead-lettered once each with the reason, never run
    receiver.wait_for(1)
    letters = wait_until(
        lambda: (dead_letters(redis_client, "callbackQueue") + dead_letters(redis_client, "emailQueue"))
        if len(dead_letters(redis_client, "callbackQueue") + dead_letters(redis_client, "emailQueue")) == 4 else None,
        what="four dead letters",
    )
    assert sorted(letter["message_id"] for letter in letters) == sorted(bad)
    for letter in letters:
        assert letter["options"]["traceback"].startswith("InvalidMessage: ")
        assert letter["options"].get("retries", 0) == 0  # never retried
    reasons = " ".join(letter["options"]["traceback"] for letter in letters)
    assert "price" in reasons and "email: is required" in reasons and "debug: is not an argument" in reasons
    assert len(receiver.requests()) == 1 and smtp_sink.mails() == []
    assert worker.running()


def _verify_each(hook: Received, *secrets: str) -> None:
    for secret in secrets:
        Webhook(secret).verify(hook.body, hook.headers)


def test_rotation_signs_with_every_secret_and_a_retry_has_a_fresh_timestamp_and_the_same_id(
    redis_client, receiver, start_workers, env
):
    # Given two secrets during a rotation, and a merchant that fails the first attempt
    receiver.respond("/hook", Response(status=500), Response(status=200))
    start_workers(env={**env, "WHISKYPAY_WEBHOOK_SECRET": f"{SECRET} {OLD_SECRET}",
                       "WHISKYPAY_CALLBACK_BACKOFF_MS": "1100"})
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    first, second = receiver.wait_for(2)
    # Then each attempt carries two signatures, each verifiable with its own secret alone
    for hook in (first, second):
        assert len(hook.headers["webhook-signature"].split()) == 2
        _verify_each(hook, SECRET, OLD_SECRET)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert first.body == second.body


def test_an_event_id_is_enqueued_once_and_becomes_the_webhook_id(redis_client, receiver, start_workers, env):
    from actors import send_callback

    first = send_callback.send(**good_callback(receiver, event_id="pay_123"))
    again = send_callback.send(**good_callback(receiver, event_id="pay_123"))
    assert queued(redis_client, "callbackQueue") == 1
    assert again.message_id == first.message_id  # the duplicate returned the first message; nothing enqueued
    start_workers(env=env)
    hook = receiver.wait_for(1)[0]
    assert hook.headers["webhook-id"] == "pay_123"
    time.sleep(0.5)
    assert len(receiver.requests()) == 1


def _gaps(requests: list[Received]) -> list[float]:
    return [later.at - earlier.at for earlier, later in itertools.pairwise(requests)]


def test_the_callback_schedule_is_exponential_without_jitter_and_ends_in_the_dead_letter_queue(
    redis_client, receiver, start_workers, env
):
    # Given a merchant that is down, 4 attempts and a 300 ms first backoff
    receiver.respond("/hook", Response(status=503))
    start_workers(env={**env, "WHISKYPAY_CALLBACK_ATTEMPTS": "4", "WHISKYPAY_CALLBACK_BACKOFF_MS": "300"})
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    # Then it is tried exactly 4 times, waiting about 300, 600 and 1200 ms in between
    letters = wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="dead letter")
    hits = receiver.requests()
    assert len(hits) == 4
    for gap, expected in zip(_gaps(hits), (0.3, 0.6, 1.2), strict=True):
        assert expected * 0.95 <= gap <= expected + 0.7, (gap, expected)
    # And the dead letter carries its last error and attempt count
    assert letters[0]["options"]["traceback"] == "HttpStatusError: HTTP 503 from 127.0.0.1"
    assert letters[0]["options"]["attempts"] == 4
    assert letters[0]["options"]["retries"] == 4  # Dramatiq's count: max_retries + 1 once retries ran out


def test_an_explicit_schedule_replaces_the_formula(redis_client, receiver, start_workers, env):
    receiver.respond("/hook", Response(status=503))
    start_workers(env={**env, "WHISKYPAY_CALLBACK_SCHEDULE": "100ms,1s"})
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="dead letter")
    hits = receiver.requests()
    assert len(hits) == 3
    short, long = _gaps(hits)
    assert 0.09 <= short <= 0.8 and 0.95 <= long <= 1.7


def test_410_gone_is_tried_once(redis_client, receiver, start_workers, env):
    receiver.respond("/hook", Response(status=410))
    start_workers(env=env)
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    letters = wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="dead letter")
    assert letters[0]["options"]["traceback"].startswith("EndpointGone: HTTP 410 Gone from 127.0.0.1")
    time.sleep(0.5)
    assert len(receiver.requests()) == 1


def test_retry_after_sets_the_next_wait(redis_client, receiver, start_workers, env):
    receiver.respond("/hook", Response(status=503, headers={"Retry-After": "2"}), Response(status=200))
    start_workers(env=env)
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    first, second = receiver.wait_for(2, timeout_s=10)
    assert 1.95 <= second.at - first.at <= 3.0


def test_retry_after_is_capped(redis_client, receiver, start_workers, env):
    receiver.respond("/hook", Response(status=429, headers={"Retry-After": "3600"}), Response(status=200))
    start_workers(env={**env, "WHISKYPAY_RETRY_AFTER_MAX_MS": "500"})
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    first, second = receiver.wait_for(2, timeout_s=10)
    assert 0.45 <= second.at - first.at <= 1.5


def _email_kwargs() -> dict[str, Any]:
    return dict(buyer_email=BUYER, merchant_email="owner@merchant.example", plan="pro", saas_name="Acme")


def test_email_temporary_failures_are_retried_three_times_then_dead_lettered(
    redis_client, smtp_sink, start_workers, env
):
    smtp_sink.fail_next(10, code=451, stage="RCPT")
    start_workers("--queues", "emailQueue", env=env)
    from actors import send_email

    send_email.send(**_email_kwargs())
    letters = wait_until(lambda: dead_letters(redis_client, "emailQueue"), what="dead letter")
    assert letters[0]["options"]["attempts"] == 3 and letters[0]["options"]["retries"] == 3
    assert letters[0]["options"]["traceback"].startswith("SmtpTemporaryError: SMTP 451")
    assert smtp_sink.mails() == []


def test_an_email_5xx_is_not_retried(redis_client, smtp_sink, start_workers, env):
    smtp_sink.fail_next(1, code=550, text="5.1.1 no such user", stage="RCPT", rcpt=BUYER)
    start_workers("--queues", "emailQueue", env=env)
    from actors import send_email

    send_email.send(**_email_kwargs())
    letters = wait_until(lambda: dead_letters(redis_client, "emailQueue"), what="dead letter")
    assert letters[0]["options"]["traceback"].startswith("SmtpPermanentError: SMTP 550")
    assert letters[0]["options"].get("retries", 0) == 0
    time.sleep(0.5)
    assert smtp_sink.mails() == []


def test_an_smtp_server_that_drops_the_connection_gets_a_fresh_one(redis_client, smtp_sink, start_workers, env):
    start_workers("--queues", "emailQueue", env=env, threads=1)
    from actors import send_email

    send_email.send(**_email_kwargs())
    smtp_sink.wait_for(2)
    smtp_sink.drop_connections(1)
    send_email.send(**_email_kwargs())
    mails = smtp_sink.wait_for(4)
    time.sleep(0.5)
    assert len(mails) == 4 == len(smtp_sink.mails())


# ---------------------------------------------------------------------------------------------------------------
# Sentry, with the real sentry-sdk posting to the fake Sentry (tests/conftest.py).


def test_sentry_gets_one_scrubbed_triage_ready_event_per_finally_failed_message(
    redis_client, receiver, sentry, start_workers, env
):
    # Given a merchant whose endpoint is down, and Sentry on (its breaker's threshold above the 2 x 5 failed
    # attempts, so both messages end as dead letters rather than parked: this test is about the dead letters' events)
    receiver.respond("/hook", Response(status=503))
    worker = start_workers(env={**env, "WHISKYPAY_BREAKER_FAILURES": "11",
                                **sentry.env(WHISKYPAY_RELEASE="whiskypay@test", WHISKYPAY_ENVIRONMENT="ci")})
    from actors import send_callback

    # When two payments to it exhaust their 5 attempts each
    for _ in range(2):
        send_callback.send(**good_callback(receiver, callback_url=receiver.url("/hook?token=QUERYSECRET")))
    wait_until(lambda: len(dead_letters(redis_client, "callbackQueue")) == 2, what="two dead letters")
    wait_until(lambda: len(sentry.events()) >= 2, what="two sentry events")
    time.sleep(1.0)
    # Then there is exactly one event per message, none for the 8 retried attempts
    found = sentry.events()
    assert len(found) == 2
    for event in found:
        tags = event["tags"]
        assert tags["queue"] == "callbackQueue" and tags["actor"] == "send_callback"
        assert tags["attempts"] == "5" or tags["attempts"] == 5
        assert tags["callback_host"] == "127.0.0.1" and str(tags["http_status"]) == "503"
        assert event["fingerprint"] == ["send_callback", "HttpStatusError", "127.0.0.1"]
        assert event["environment"] == "ci" and event["release"] == "whiskypay@test"
    assert {event["tags"]["message_id"] for event in found} == {m["message_id"] for m in
                                                                dead_letters(redis_client, "callbackQueue")}
    # And nothing personal or secret is in any envelope, or in the worker's log
    raw = b"".join(sentry.bodies()) + worker.log().encode()
    for leak in (BUYER.encode(), SECRET.encode(), SECRET.removeprefix("whsec_").encode(), b"QUERYSECRET",
                 b'"status":"success"', b"webhook-signature", b"v1,"):
        assert leak not in raw, leak


def test_sentry_reports_an_invalid_message_once(redis_client, receiver, sentry, start_workers, env):
    start_workers(env={**env, **sentry.env()})
    push_unvalidated("send_callback", "callbackQueue", good_callback(receiver, price=-5))
    wait_until(lambda: sentry.events(), what="a sentry event")
    time.sleep(0.5)
    (event,) = sentry.events()
    assert event["fingerprint"][:2] == ["send_callback", "InvalidMessage"]
    assert BUYER.encode() not in b"".join(sentry.bodies())


def test_without_a_dsn_nothing_is_sent(redis_client, receiver, sentry, start_workers, env):
    receiver.respond("/hook", Response(status=410))
    start_workers(env=env)
    from actors import send_callback

    send_callback.send(**good_callback(receiver))
    wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="dead letter")
    time.sleep(0.5)
    assert sentry.endpoint.requests() == []


def test_addresses_with_an_apostrophe_are_masked_in_logs_sentry_the_cli_and_the_dashboard(
    redis_client, smtp_sink, sentry, start_workers, env, capsys
):
    import json
    import threading
    import wsgiref.simple_server

    import requests

    import actors
    from whiskypay.dashboard import build_app

    # Given addresses a regular expression over text did not mask, and a relay that refuses the merchant's one
    buyer, merchant = "jane.doe'@example.com", "o'brien+sales@merchant.example"
    smtp_sink.fail_next(1, code=550, text="5.1.1 mailbox unavailable", stage="RCPT", rcpt=merchant)
    worker = start_workers("--queues", "emailQueue",
                           env={**env, **sentry.env(WHISKYPAY_MAIL_FROM="payments@whiskypay.example")})
    # When a payment's emails are sent: the buyer's goes out (a log line, a Sentry breadcrumb), the merchant's is
    # refused with a 5xx (a dead letter, a Sentry event carrying that breadcrumb)
    actors.send_email.send(buyer_email=buyer, merchant_email=merchant, plan="pro", saas_name="Acme")
    smtp_sink.wait_for(1)
    (letter,) = wait_until(lambda: dead_letters(redis_client, "emailQueue"), what="a dead letter")
    wait_until(lambda: sentry.events(), what="a sentry event")
    # And an operator lists the dead letters and opens the message in the dashboard
    code, listed, _ = cli(capsys, "failed", "--json")
    assert code == 0
    app = build_app(actors.broker, username="ops", password="pw-for-this-test")
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        redis_id = letter["options"]["redis_message_id"]
        pages = [requests.get(f"{base}{path}", auth=("ops", "pw-for-this-test"), timeout=10)
                 for path in ("/dramatiq/queues/emailQueue/failed", f"/dramatiq/queues/emailQueue/failed/{redis_id}",
                              "/dead-letters", f"/events/{letter['message_id']}")]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert all(page.status_code == 200 for page in pages)
    # Then neither address shows anywhere, each is masked to its first character and domain
    wait_until(lambda: "to=j***@example.com sent" in worker.log(), timeout_s=5, what="the buyer's sent line")
    log = worker.log()
    sentry_raw = b"".join(sentry.bodies()).decode()
    shown = {"worker log": log, "sentry": sentry_raw, "cli": listed, "dashboard": "".join(p.text for p in pages)}
    for where, text in shown.items():
        for secret in ("jane.doe", "o'brien", "o&#39;brien", "brien+sales"):
            assert secret not in text, f"{secret} in the {where}"
    assert "to=j***@example.com sent" in log
    assert "role=buyer" in sentry_raw and "***@example.com sent" in sentry_raw  # the buyer's log line, a breadcrumb
    assert json.loads(listed)["dead_letters"][0]["buyer"] == "j***@example.com"
    assert "j***@example.com" in shown["dashboard"] and "o***@merchant.example" in shown["dashboard"]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `whiskypay argv...` in this process; return (exit status, stdout, stderr)."""
    from whiskypay.cli import main

    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


class _QuietHandler(__import__("wsgiref.simple_server").simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass
