"""End to end through real `dramatiq actors` processes, a real Redis, HTTP receiver and SMTP sink (issue: core)."""

from __future__ import annotations

import json
import time
from email.message import EmailMessage

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from tests.helpers import TEST_SECRET, dead_letters, queued, wait_until
from whiskypay.devstack import HttpReceiver, Response

pytestmark = pytest.mark.e2e

SECRET = TEST_SECRET


def pay(receiver: HttpReceiver, path: str = "/hook", **overrides: object) -> str:
    from actors import send_callback

    kwargs: dict[str, object] = dict(
        callback_url=receiver.url(path), email="buyer@example.com", plan="pro", price=19.99,
        timestamp="2026-11-27T21:00:00Z",
    )
    kwargs.update(overrides)
    return send_callback.send(**kwargs).message_id


def test_a_callback_arrives_with_the_seed_body_signed_and_as_json(redis_client, receiver, start_workers, env):
    # Given a running callback worker
    start_workers(env=env)
    # When the gateway enqueues one payment
    message_id = pay(receiver)
    # Then the merchant receives exactly the seed's body, as JSON, with a valid Standard Webhooks signature
    hook = receiver.wait_for(1)[0]
    assert hook.method == "POST"
    assert hook.headers["content-type"] == "application/json"
    assert json.loads(hook.body) == {
        "email": "buyer@example.com", "plan": "pro", "price": 19.99, "status": "success",
        "timestamp": "2026-11-27T21:00:00Z",
    }
    assert b'"price":19.99' in hook.body
    assert hook.headers["webhook-id"] == f"msg_{message_id}"
    Webhook(SECRET).verify(hook.body, hook.headers)


def test_an_omitted_timestamp_is_the_send_time_in_utc(redis_client, receiver, start_workers, env):
    from actors import send_callback

    start_workers(env=env)
    before = time.time()
    send_callback.send(callback_url=receiver.url(), email="buyer@example.com", plan="pro", price=20)
    body = receiver.wait_for(1)[0].json()
    from datetime import datetime

    sent = datetime.fromisoformat(body["timestamp"])
    assert sent.utcoffset() is not None and sent.utcoffset().total_seconds() == 0
    assert before - 2 <= sent.timestamp() <= time.time() + 1
    assert body["price"] == 20 and isinstance(body["price"], int)


def test_a_500_then_200_is_delivered_on_the_second_try_with_the_same_webhook_id(
    redis_client, receiver, start_workers, env
):
    # Given a merchant that fails once
    receiver.respond("/hook", Response(status=500), Response(status=200))
    start_workers(env=env)
    # When one payment is sent
    pay(receiver)
    # Then the second attempt is accepted, both carry the same webhook-id, and nothing is dead-lettered
    first, second = receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    Webhook(SECRET).verify(second.body, second.headers)
    time.sleep(0.5)
    assert len(receiver.requests()) == 2
    assert dead_letters(redis_client, "callbackQueue") == []


def test_a_redirect_is_not_followed_and_counts_as_a_failure(redis_client, receiver, start_workers, env):
    # Given a merchant endpoint that redirects elsewhere
    receiver.respond("/hook", Response(status=302, headers={"Location": receiver.url("/elsewhere")}))
    start_workers(env={**env, "WHISKYPAY_CALLBACK_ATTEMPTS": "2"})
    # When one payment is sent
    pay(receiver)
    # Then both attempts hit /hook only, the redirect target saw nothing, and the message is dead-lettered
    wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="dead letter")
    assert len(receiver.requests("/hook")) == 2
    assert receiver.requests("/elsewhere") == []
    assert "HTTP 302" in dead_letters(redis_client, "callbackQueue")[0]["options"]["traceback"]


def test_a_timeout_counts_as_a_failed_attempt(redis_client, receiver, start_workers, env):
    # Given a merchant that hangs longer than the read timeout once, then answers
    receiver.respond("/hook", Response(status=200, delay_s=2.0), Response(status=200))
    start_workers(env={**env, "WHISKYPAY_WEBHOOK_READ_TIMEOUT_S": "0.5"})
    # When one payment is sent
    pay(receiver)
    # Then a second attempt follows the timed-out one and succeeds
    receiver.wait_for(2, timeout_s=10)
    time.sleep(0.5)
    assert len(receiver.requests()) == 2
    assert dead_letters(redis_client, "callbackQueue") == []


def test_a_private_callback_host_is_refused_at_once_when_the_flag_is_off(redis_client, receiver, start_workers, env):
    # Given a worker that refuses private networks (production default)
    worker = start_workers(env={**env, "WHISKYPAY_ALLOW_PRIVATE_CALLBACKS": "false"})
    # When a payment's callback points at loopback
    pay(receiver)
    # Then it is dead-lettered after one attempt with the reason, and the receiver never saw a request
    letters = wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="dead letter")
    assert letters[0]["options"]["traceback"].startswith("RefusedHost: callback host 127.0.0.1")
    assert letters[0]["options"].get("retries", 0) == 0
    assert receiver.requests() == []
    assert "WHISKYPAY_ALLOW_PRIVATE_CALLBACKS" in worker.log()


def test_a_private_callback_host_is_allowed_when_the_flag_is_on(redis_client, receiver, start_workers, env):
    start_workers(env={**env, "WHISKYPAY_ALLOW_PRIVATE_CALLBACKS": "true"})
    pay(receiver)
    assert receiver.wait_for(1)[0].path == "/hook"


def _send_email(**overrides: object) -> str:
    from actors import send_email

    kwargs: dict[str, object] = dict(
        buyer_email="buyer@example.com", merchant_email="owner@merchant.example", plan="pro",
        saas_name="Acme Analytics", logo_url="https://merchant.example/logo.png",
    )
    kwargs.update(overrides)
    return send_email.send(**kwargs).message_id


def _html(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def test_one_email_job_sends_the_buyer_and_the_merchant_a_two_part_email(
    redis_client, smtp_sink, start_workers, env
):
    start_workers("--queues", "emailQueue", env=env)
    message_id = _send_email()
    mails = smtp_sink.wait_for(2)
    by_rcpt = {mail.rcpt_tos: mail for mail in mails}
    assert set(by_rcpt) == {("buyer@example.com",), ("owner@merchant.example",)}
    for mail in mails:
        assert mail.message.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in mail.message.iter_parts()] == ["text/plain", "text/html"]
        assert mail.mail_from == "payments@whiskypay.test"
        assert "Acme Analytics" in mail.message["Subject"] and "pro" in mail.message["Subject"]
        assert 'src="https://merchant.example/logo.png"' in _html(mail.message)
    assert by_rcpt[("buyer@example.com",)].message["Message-ID"] == f"<{message_id}.buyer@whiskypay.test>"


def test_an_smtp_failure_after_the_buyers_email_resends_only_the_merchants(
    redis_client, smtp_sink, start_workers, env
):
    # Given an SMTP server that refuses the merchant's email once with a temporary error
    smtp_sink.fail_next(1, code=451, stage="DATA", rcpt="owner@merchant.example")
    start_workers("--queues", "emailQueue", env=env)
    # When one email job runs
    message_id = _send_email()
    # Then the buyer got one email, the merchant got one (on the retry), with a stable Message-ID
    mails = smtp_sink.wait_for(2)
    time.sleep(1.0)
    recipients = sorted(rcpt for mail in smtp_sink.mails() for rcpt in mail.rcpt_tos)
    assert recipients == ["buyer@example.com", "owner@merchant.example"]
    merchant = next(m for m in mails if m.rcpt_tos == ("owner@merchant.example",))
    assert merchant.message["Message-ID"] == f"<{message_id}.merchant@whiskypay.test>"


def test_html_in_the_plan_is_escaped_in_the_html_part(redis_client, smtp_sink, start_workers, env):
    start_workers("--queues", "emailQueue", env=env)
    _send_email(plan="<script>alert(1)</script>")
    for mail in smtp_sink.wait_for(2):
        html = _html(mail.message)
        assert "<script>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_cr_lf_in_a_field_cannot_add_a_header(redis_client, smtp_sink, start_workers, env):
    from dramatiq import Message

    import actors
    from whiskypay.schemas import InvalidPayload

    # Given the gateway tries to send a saas_name carrying a header
    with pytest.raises(InvalidPayload, match="saas_name: must not contain control characters"):
        _send_email(saas_name="Acme\r\nBcc: attacker@evil.example")
    # And a foreign producer bypasses send() and puts such a message straight into the queue
    foreign = Message(
        queue_name="emailQueue", actor_name="send_email", args=(), options={},
        kwargs=dict(buyer_email="buyer@example.com", merchant_email="owner@merchant.example", plan="pro",
                    saas_name="Acme\r\nBcc: attacker@evil.example"),
    )
    foreign = foreign.copy(options={"redis_message_id": foreign.message_id})
    actors.broker.do_enqueue("emailQueue", foreign.message_id, foreign.encode())  # below the enqueue hooks
    start_workers("--queues", "emailQueue", env=env)
    # Then no email went out, and the message is dead-lettered with the reason
    letters = wait_until(lambda: dead_letters(redis_client, "emailQueue"), what="dead letter")
    assert "saas_name" in letters[0]["options"]["traceback"]
    assert smtp_sink.mails() == []


def test_an_email_only_worker_leaves_the_callback_queue_untouched(
    redis_client, receiver, smtp_sink, start_workers, env
):
    # Given a worker started with --queues emailQueue
    start_workers("--queues", "emailQueue", env=env)
    # When one payment enqueues both jobs
    pay(receiver)
    _send_email()
    # Then the emails go out while the callback stays queued, undelivered
    smtp_sink.wait_for(2)
    time.sleep(0.5)
    assert receiver.requests() == []
    assert queued(redis_client, "callbackQueue") == 1


def test_the_callback_worker_refuses_to_start_without_a_secret(redis_client, start_workers, env):
    worker = start_workers("--queues", "callbackQueue", env={**env, "WHISKYPAY_WEBHOOK_SECRET": ""}, wait_ready=False)
    wait_until(lambda: worker.returncode is not None, timeout_s=30, what="the worker to exit")
    assert worker.returncode != 0
    assert "WHISKYPAY_WEBHOOK_SECRET is not set" in worker.log()


def test_a_malformed_setting_stops_the_worker_with_the_variable_named_and_no_secret_echoed(
    redis_client, start_workers, env
):
    bad_secret = "whsec_not-base64-SENSITIVE"
    worker = start_workers(env={**env, "WHISKYPAY_WEBHOOK_SECRET": bad_secret, "WHISKYPAY_CALLBACK_ATTEMPTS": "zero"},
                           wait_ready=False)
    wait_until(lambda: worker.returncode is not None, timeout_s=30, what="the worker to exit")
    log = worker.log()
    assert worker.returncode != 0
    assert "WHISKYPAY_WEBHOOK_SECRET" in log and "WHISKYPAY_CALLBACK_ATTEMPTS" in log
    assert "SENSITIVE" not in log


def test_smtp_connections_are_reused_across_messages(redis_client, smtp_sink, start_workers, env):
    start_workers("--queues", "emailQueue", env=env, threads=1)
    for _ in range(3):
        _send_email()
    smtp_sink.wait_for(6)
    assert smtp_sink.connections == 1


def test_the_redis_client_has_bounded_timeouts():
    import actors

    kwargs = actors.broker.client.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] and kwargs["socket_timeout"]
    assert isinstance(actors.broker.client, redis.Redis)
