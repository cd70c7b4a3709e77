"""Tier 1: masking addresses, scrubbing URLs and secrets, and keeping message arguments out of log lines."""

from __future__ import annotations

import logging

import dramatiq
import pytest
from dramatiq.broker import MessageProxy

from whiskypay.redaction import (
    RedactMessageArgs,
    cut_url,
    describe_message,
    dramatiq_message_loggers,
    install_log_redaction,
    mask_address,
    mask_arguments,
    mask_email,
    scrub,
    scrub_text,
)


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("buyer@example.com", "b***@example.com"),
        ("Jane.Doe+tag@mail.example.co.uk", "J***@mail.example.co.uk"),
        ("x@example.io", "x***@example.io"),
        ("to buyer@example.com now", "to b***@example.com now"),
        ("a@example.com, b.c@example.org", "a***@example.com, b***@example.org"),
        ("no address here", "no address here"),
        ("jane.doe'@example.com", "j***@example.com"),
        ("to <o'hara+x@example.com>", "to <o***@example.com>"),
        ("'buyer@example.com'", "'b***@example.com'"),
        ("a!b#c$d%e&f*g=h?i^j`k{l|m}n~o/p@example.com", "a***@example.com"),
        ("buyer@example.xn--p1ai", "b***@example.xn--p1ai"),
    ],
)
def test_email_addresses_keep_only_their_first_letter_and_domain(address: str, masked: str) -> None:
    # Given text with addresses, when masked, then each local part is cut to its first character
    assert mask_email(address) == masked


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("POST https://m.example.com/hooks/42?token=SECRET123 failed", "POST https://m.example.com/… failed"),
        ("http://10.0.0.1:8080/x#frag", "http://10.0.0.1:8080/…"),
        ("see https://m.example.com?token=SECRET123", "see https://m.example.com/…"),
        ("'https://m.example.com/p'", "'https://m.example.com/…'"),
        ("https://m.example.com", "https://m.example.com/…"),
    ],
)
def test_urls_are_cut_down_to_scheme_and_host(text: str, scrubbed: str) -> None:
    # Given text with a URL, when scrubbed, then path, query and fragment are gone
    assert scrub_text(text) == scrubbed


def test_scrub_text_masks_addresses_cuts_urls_and_replaces_secrets_at_once() -> None:
    # Given an error text mixing an address, a URL with a token and a configured secret
    text = "550 for buyer@example.com via https://relay.example.com/a?k=SECRET123 using pw hunter2"
    # When scrubbed with the secret list
    scrubbed = scrub_text(text, secrets=["hunter2", ""])
    # Then nothing personal or secret remains
    assert scrubbed == "550 for b***@example.com via https://relay.example.com/… using pw [redacted]"


def test_an_empty_secret_is_ignored_rather_than_redacting_everything() -> None:
    # Given an unset (empty) secret, when scrubbing, then the text is unchanged
    assert scrub_text("plain text", secrets=[""]) == "plain text"


def test_scrub_walks_dicts_lists_and_tuples_and_keeps_other_values() -> None:
    # Given nested arguments
    value = {"email": "buyer@example.com", "urls": ["https://m.example.com/x?t=1"], "pair": ("pw", 3), "price": 9.5}
    # When scrubbed, then every string inside is scrubbed and the shapes and non-strings are kept
    assert scrub(value, ("pw",)) == {
        "email": "b***@example.com",
        "urls": ["https://m.example.com/…"],
        "pair": ("[redacted]", 3),
        "price": 9.5,
    }


def test_an_uppercase_scheme_url_is_scrubbed_too() -> None:
    # Given a URL written with an uppercase scheme, when scrubbed, then its query is gone
    assert "SECRET123" not in scrub_text("HTTPS://m.example.com/hook?token=SECRET123")


@pytest.mark.parametrize("address", ["buyer@exämple.com", "jörg.müller@example.com"], ids=["idn-domain", "utf8-local"])
def test_internationalised_addresses_are_masked(address: str) -> None:
    # Given an address EmailStr accepts, when masked, then only the first letter of its local part is left
    local, domain = address.split("@")
    assert mask_email(address) == f"{local[0]}***@{domain}"


def _message() -> dramatiq.Message[object]:
    return dramatiq.Message(
        queue_name="callbackQueue",
        actor_name="send_callback",
        args=(),
        kwargs={"email": "buyer@example.com", "callback_url": "https://m.example.com/h?token=SECRET123"},
        options={},
        message_id="0b1c2d3e-aaaa-bbbb-cccc-000000000001",
    )


def _record(msg: str, args: tuple[object, ...]) -> logging.LogRecord:
    return logging.LogRecord("dramatiq.worker.WorkerThread", logging.ERROR, __file__, 1, msg, args, None)


def test_describe_message_names_the_actor_and_id_only() -> None:
    # Given a message, when described, then only its actor and id show
    assert describe_message(_message()) == "send_callback(0b1c2d3e-aaaa-bbbb-cccc-000000000001)"


@pytest.mark.parametrize("wrap", [lambda m: m, MessageProxy], ids=["message", "message-proxy"])
def test_the_filter_replaces_a_message_in_log_arguments_by_its_actor_and_id(wrap: object) -> None:
    # Given a log record like Dramatiq's "Failed to process message %s", with the message (or its proxy) as argument
    message = wrap(_message())  # type: ignore[operator]
    record = _record("Failed to process message %s (attempt %d).", (message, 3))
    # When the filter runs
    kept = RedactMessageArgs().filter(record)
    # Then the record is kept, and its text names the message without any argument
    assert kept is True
    text = record.getMessage()
    assert text == "Failed to process message send_callback(0b1c2d3e-aaaa-bbbb-cccc-000000000001) (attempt 3)."
    assert "buyer@example.com" not in text
    assert "SECRET123" not in text
    assert record.args == ("send_callback(0b1c2d3e-aaaa-bbbb-cccc-000000000001)", 3)


def test_the_filter_leaves_records_without_messages_alone() -> None:
    # Given records with ordinary arguments, a mapping argument, or none
    plain = _record("retrying %s in %d ms", ("x", 5))
    mapping = logging.LogRecord("x", logging.INFO, __file__, 1, "%(a)s", ({"a": 1},), None)
    empty = _record("nothing", ())
    # When filtered, then they are kept unchanged
    for record in (plain, mapping, empty):
        before = record.args
        assert RedactMessageArgs().filter(record) is True
        assert record.args == before


def test_the_message_loggers_cover_each_queue_and_its_delay_queue() -> None:
    # Given two queues, then the worker, worker-thread and each consumer logger (with .DQ) are listed
    assert dramatiq_message_loggers(["callbackQueue", "emailQueue"]) == [
        "dramatiq.worker.WorkerThread",
        "dramatiq.worker.Worker",
        "dramatiq.worker.ConsumerThread(callbackQueue)",
        "dramatiq.worker.ConsumerThread(callbackQueue.DQ)",
        "dramatiq.worker.ConsumerThread(emailQueue)",
        "dramatiq.worker.ConsumerThread(emailQueue.DQ)",
    ]


def test_installing_the_redaction_twice_adds_one_filter_per_logger() -> None:
    # Given a queue name used only by this test
    queue = "redactionTestQueue"
    names = dramatiq_message_loggers([queue])
    try:
        # When the redaction is installed twice
        install_log_redaction([queue])
        install_log_redaction([queue])
        # Then each logger holds exactly one filter
        for name in names:
            assert sum(isinstance(f, RedactMessageArgs) for f in logging.getLogger(name).filters) == 1
    finally:
        for name in names:
            logger = logging.getLogger(name)
            for existing in [f for f in logger.filters if isinstance(f, RedactMessageArgs)]:
                logger.removeFilter(existing)


@pytest.mark.parametrize(
    ("address", "masked"),
    [("jane.doe'@example.com", "j***@example.com"), ('"john doe"@example.com', '"***@example.com'),
     ("a@b@example.com", "a***@example.com"), ("not an address", "***"), ("@example.com", "***")],
)  # fmt: skip
def test_a_known_address_is_masked_by_its_structure(address: str, masked: str) -> None:
    assert mask_address(address) == masked


def test_known_addresses_are_masked_by_structure_inside_any_text() -> None:
    # Given an error text quoting an address the text mask cannot see as one (a quoted local part)
    text = 'SMTP 550 for <"jane doe"@example.com>: rejected'
    # When scrubbed knowing the message's addresses, then it is masked
    assert scrub_text(text, addresses=['"jane doe"@example.com']) == 'SMTP 550 for <"***@example.com>: rejected'


def test_shown_arguments_have_addresses_masked_and_urls_cut() -> None:
    shown = mask_arguments({"buyer_email": "jane.doe'@example.com", "logo_url": "https://cdn.example/l.png?sig=S",
                            "plan": "pro", "price": 5})  # fmt: skip
    assert shown == {"buyer_email": "j***@example.com", "logo_url": "https://cdn.example/l.png?…", "plan": "pro",
                     "price": 5}  # fmt: skip
    assert cut_url("https://u:p@m.example:8443/a?b#c") == "https://m.example:8443/a?…"
