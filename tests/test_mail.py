"""Tier 1: composing the payment emails, and classifying SMTP failures as permanent or temporary."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from typing import Any

import pytest

from whiskypay.errors import SmtpPermanentError, SmtpTemporaryError
from whiskypay.mail import compose
from whiskypay.smtp import classify_smtp_error

MESSAGE_ID = "<pay-42.buyer@whiskypay.test>"


def build(**overrides: Any) -> EmailMessage:
    arguments: dict[str, Any] = {
        "role": "buyer",
        "to": "buyer@example.com",
        "mail_from": "payments@whiskypay.test",
        "message_id": MESSAGE_ID,
        "plan": "Pro",
        "saas_name": "Acme Analytics",
        "logo_url": None,
    }
    arguments.update(overrides)
    role = arguments.pop("role")
    return compose(role, **arguments)


def parts(email: EmailMessage) -> tuple[EmailMessage, EmailMessage]:
    plain, html = list(email.iter_parts())
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    return plain, html


@pytest.mark.parametrize("role", ["buyer", "merchant"])
def test_an_email_is_multipart_alternative_with_plain_text_first_then_html(role: str) -> None:
    # Given a receipt or sale notice, when composed
    email = build(role=role)
    # Then it is multipart/alternative with exactly a text/plain part followed by a text/html part
    assert email.get_content_type() == "multipart/alternative"
    plain, html = parts(email)
    assert plain.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert "Acme Analytics" in plain.get_content()
    assert "Acme Analytics" in html.get_content()


@pytest.mark.parametrize(
    ("role", "subject"),
    [("buyer", "Your Acme Analytics receipt: Pro"), ("merchant", "New sale on Acme Analytics: Pro")],
)
def test_headers_carry_the_subject_sender_recipient_and_the_given_message_id(role: str, subject: str) -> None:
    # Given a role, when composed
    email = build(role=role)
    # Then the headers are as given
    assert email["Subject"] == subject
    assert email["To"] == "buyer@example.com"
    assert email["From"].addresses[0].addr_spec == "payments@whiskypay.test"
    assert email["From"].addresses[0].display_name == "Acme Analytics via WhiskyPay"
    assert email["Message-ID"] == MESSAGE_ID


def test_html_in_the_plan_is_escaped_in_the_html_part_and_left_as_text_in_the_plain_part() -> None:
    # Given a plan name carrying markup
    email = build(plan="<script>alert(1)</script>", saas_name="Tom & Jerry's <b>")
    # When composed
    plain, html = parts(email)
    body = html.get_content()
    # Then the HTML part shows it as text, never as markup
    assert "<script>" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "<b>" not in body
    # And the plain part shows it verbatim
    assert "<script>alert(1)</script>" in plain.get_content()


@pytest.mark.parametrize("field", ["saas_name", "plan", "to", "message_id"])
@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\r", "\u2028"])
def test_a_line_break_in_a_header_field_cannot_add_a_header(field: str, breaker: str) -> None:
    # Given a value trying to smuggle a Bcc header into the subject or the sender's name
    value = f"Acme{breaker}Bcc: attacker@evil.example"
    # When composed, then either compose refuses, or no extra header appears in the serialised email
    try:
        email = build(**{field: value})
    except ValueError:
        return
    head = email.as_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in head and b"\nBcc:" not in head
    assert email["Bcc"] is None


def test_a_logo_is_shown_in_the_html_only_when_given() -> None:
    # Given one email with a logo and one without
    with_logo = build(logo_url="https://cdn.example.com/acme-logo.png")
    without_logo = build(logo_url=None)
    # Then only the first shows an image, and never in the plain part
    plain, html = parts(with_logo)
    assert '<img src="https://cdn.example.com/acme-logo.png"' in html.get_content()
    assert "acme-logo" not in plain.get_content()
    assert "<img" not in parts(without_logo)[1].get_content()


def test_a_logo_url_with_quotes_cannot_break_out_of_the_img_attribute() -> None:
    # Given a logo URL carrying a quote (the schema forbids it, the template must hold anyway)
    html = parts(build(logo_url='https://cdn.example.com/x" onerror="alert(1)'))[1].get_content()
    # Then the quote is escaped
    assert 'onerror="alert(1)"' not in html


@pytest.mark.parametrize(
    "exc",
    [
        smtplib.SMTPDataError(550, b"5.7.1 message rejected"),
        smtplib.SMTPSenderRefused(553, b"sender refused", "payments@whiskypay.test"),
        smtplib.SMTPRecipientsRefused({"a@b": (550, b"no such user")}),
        smtplib.SMTPAuthenticationError(535, b"bad credentials"),
    ],
    ids=["data-550", "sender-553", "recipients-550", "auth-535"],
)
def test_a_5xx_reply_is_a_permanent_error_tagged_with_the_code(exc: smtplib.SMTPException) -> None:
    # Given an smtplib error carrying a 5xx reply, when classified
    error = classify_smtp_error(exc, host="smtp.example.com")
    # Then it is permanent, with the host and code as tags and in the text
    assert isinstance(error, SmtpPermanentError)
    code = error.tags["smtp_code"]
    assert isinstance(code, int) and 500 <= code < 600
    assert error.tags["host"] == "smtp.example.com"
    assert f"SMTP {code} from smtp.example.com" in str(error)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (smtplib.SMTPDataError(451, b"4.3.0 try later"), 451),
        (smtplib.SMTPRecipientsRefused({"a@b": (450, b"mailbox busy")}), 450),
        (smtplib.SMTPSenderRefused(421, b"closing", "payments@whiskypay.test"), 421),
    ],
    ids=["data-451", "recipients-450", "sender-421"],
)
def test_a_4xx_reply_is_a_temporary_error_tagged_with_the_code(exc: smtplib.SMTPException, code: int) -> None:
    # Given a 4xx reply, when classified, then it is temporary (retried) and keeps the code
    error = classify_smtp_error(exc, host="smtp.example.com")
    assert isinstance(error, SmtpTemporaryError)
    assert error.tags == {"host": "smtp.example.com", "smtp_code": code}


@pytest.mark.parametrize(
    "exc",
    [
        smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        smtplib.SMTPRecipientsRefused({}),
    ],
    ids=["disconnected", "refused", "timeout", "no-recipients-listed"],
)
def test_a_lost_or_refused_connection_is_a_temporary_error_without_a_code(exc: BaseException) -> None:
    # Given a connection-level failure, when classified
    error = classify_smtp_error(exc, host="smtp.example.com")
    # Then it is temporary, names the host and the error class, and has no smtp_code
    assert isinstance(error, SmtpTemporaryError)
    assert error.tags == {"host": "smtp.example.com"}
    assert type(exc).__name__ in str(error)


def test_classified_errors_do_not_repeat_the_servers_reply_text() -> None:
    # Given a reply whose text names the recipient
    exc = smtplib.SMTPRecipientsRefused({"buyer@example.com": (550, b"<buyer@example.com>: no such user")})
    # When classified, then the address does not appear in the safe-to-log text
    assert "buyer@example.com" not in str(classify_smtp_error(exc, host="smtp.example.com"))
