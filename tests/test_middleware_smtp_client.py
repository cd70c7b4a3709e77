"""Tier 2: SmtpClients against the real aiosmtpd sink: one connection per thread, reopened once, classified errors."""

from __future__ import annotations

import threading
from email.message import EmailMessage
from types import SimpleNamespace
from typing import Any

import pytest
from dramatiq.brokers.stub import StubBroker

from middleware.smtp_client import SmtpClients
from whiskypay.devstack import SmtpSink, free_port
from whiskypay.errors import SmtpPermanentError, SmtpTemporaryError, WorkerStartRefused
from whiskypay.smtp import SmtpRelay

SENDER = "payments@whiskypay.test"
PASSWORD = "smtp-PW-5ec2e7"
CONNECTION_FAILED = r"SMTP connection to 127\.0\.0\.1 failed"


def clients(sink: SmtpSink | None = None, *, mail_from: str | None = SENDER, **overrides: Any) -> SmtpClients:
    options: dict[str, Any] = dict(
        host="127.0.0.1", port=sink.port if sink else free_port(), tls="off", username=None, password=None,
        timeout_s=2,
    )
    return SmtpClients(relay=SmtpRelay(**{**options, **overrides}), mail_from=mail_from)


def email(to: str = "buyer@example.com", subject: str = "Your receipt") -> EmailMessage:
    message = EmailMessage()
    message["To"], message["From"], message["Subject"] = to, SENDER, subject
    message.set_content("Thanks for your payment.")
    return message


def boot(smtp: SmtpClients, queues: set[str] | None) -> None:
    """Run the before_worker_boot hook for a worker consuming queues (None: every queue)."""
    smtp.before_worker_boot(StubBroker(middleware=[]), SimpleNamespace(consumer_whitelist=queues))  # type: ignore[arg-type]


def shutdown(smtp: SmtpClients) -> None:
    smtp.after_worker_shutdown(StubBroker(middleware=[]), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("queues", [None, {"emailQueue"}, {"emailQueue", "callbackQueue"}], ids=str)
def test_given_no_sender_when_a_worker_that_sends_email_boots_then_it_refuses_naming_the_setting(
    queues: set[str] | None,
) -> None:
    with pytest.raises(WorkerStartRefused, match="WHISKYPAY_MAIL_FROM"):
        boot(clients(mail_from=None), queues)


def test_given_no_sender_when_a_callback_only_worker_boots_then_it_starts() -> None:
    boot(clients(mail_from=None), {"callbackQueue"})


def test_given_a_thread_when_it_sends_three_emails_then_they_go_over_one_connection_from_the_sender(
    smtp_sink: SmtpSink,
) -> None:
    smtp = clients(smtp_sink)
    for index in range(3):
        smtp.send(email(subject=f"receipt {index}"))
    mails = smtp_sink.wait_for(3)
    assert [str(mail.message["Subject"]) for mail in mails] == ["receipt 0", "receipt 1", "receipt 2"]
    assert {mail.mail_from for mail in mails} == {SENDER}
    assert smtp_sink.connections == 1
    # And another thread opens its own
    threading.Thread(target=lambda: smtp.send(email())).start()
    smtp_sink.wait_for(4)
    assert smtp_sink.connections == 2
    shutdown(smtp)


def test_given_the_server_dropped_the_connection_when_the_next_email_is_sent_then_it_reconnects_once(
    smtp_sink: SmtpSink,
) -> None:
    smtp = clients(smtp_sink)
    smtp.send(email(subject="first"))
    # When the server drops the connection mid-transaction, then the email goes out over a new one
    smtp_sink.drop_connections(1)
    smtp.send(email(subject="second"))
    assert [str(mail.message["Subject"]) for mail in smtp_sink.wait_for(2)] == ["first", "second"]
    assert smtp_sink.connections == 2
    shutdown(smtp)


def test_given_a_fresh_connection_that_drops_when_sending_then_it_fails_temporarily_without_a_second_try(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.drop_connections(1)
    with pytest.raises(SmtpTemporaryError, match=CONNECTION_FAILED):
        clients(smtp_sink).send(email())
    assert smtp_sink.connections == 1 and smtp_sink.mails() == []


def test_given_a_5xx_reply_when_sending_then_it_fails_permanently_and_the_connection_is_kept(
    smtp_sink: SmtpSink,
) -> None:
    smtp = clients(smtp_sink)
    smtp_sink.fail_next(1, code=550, text="5.1.1 mailbox unavailable", stage="RCPT")
    with pytest.raises(SmtpPermanentError) as raised:
        smtp.send(email())
    assert raised.value.tags == {"host": "127.0.0.1", "smtp_code": 550}
    assert "buyer@example.com" not in str(raised.value)
    smtp.send(email())
    smtp_sink.wait_for(1)
    assert smtp_sink.connections == 1
    shutdown(smtp)


def test_given_a_4xx_reply_when_sending_then_it_fails_temporarily_with_its_code(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(1, code=451, stage="DATA")
    with pytest.raises(SmtpTemporaryError) as raised:
        clients(smtp_sink).send(email())
    assert raised.value.tags["smtp_code"] == 451


def test_given_no_relay_listening_when_sending_then_it_fails_temporarily() -> None:
    with pytest.raises(SmtpTemporaryError, match=CONNECTION_FAILED):
        clients().send(email())


def test_given_a_relay_that_requires_auth_when_sending_with_its_credentials_then_it_is_accepted() -> None:
    with SmtpSink(username="relay", password=PASSWORD) as sink:
        smtp = clients(sink, username="relay", password=PASSWORD)
        smtp.send(email())
        sink.wait_for(1)
        assert PASSWORD not in repr(smtp) and PASSWORD not in repr(smtp.relay)
        shutdown(smtp)


def test_given_a_worker_that_sent_email_when_it_shuts_down_then_its_connections_are_closed_and_reopen_later(
    smtp_sink: SmtpSink,
) -> None:
    smtp = clients(smtp_sink)
    smtp.send(email())
    # When the worker shuts down, then the connection is closed (QUIT); a later send opens a new one
    shutdown(smtp)
    smtp.send(email())
    smtp_sink.wait_for(2)
    assert smtp_sink.connections == 2
    shutdown(smtp)
