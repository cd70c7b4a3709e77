"""Tier 1: the actors' argument schemas and the error text that names fields without echoing values."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from whiskypay.schemas import MAX_URL_LENGTH, CallbackArgs, EmailArgs, describe, validate_args

GOOD_CALLBACK: dict[str, Any] = {
    "callback_url": "https://merchant.example.com/hooks/whiskypay?tenant=42",
    "email": "buyer@example.com",
    "plan": "Pro (yearly)",
    "price": 49.5,
    "timestamp": "2026-11-27T21:00:00Z",
    "event_id": "evt_01HZX:pay-42.1",
}
GOOD_EMAIL: dict[str, Any] = {
    "buyer_email": "buyer@example.com",
    "merchant_email": "sales@merchant.example.com",
    "plan": "Pro",
    "saas_name": "Acme Analytics",
    "logo_url": "https://cdn.example.com/logo.png",
}
#: A distinctive value that must never come back in an error text.
LEAK = "leak-me-please"


def problems(model: type[CallbackArgs | EmailArgs], arguments: dict[str, Any], *, https_only: bool = True) -> str:
    """Return describe() of the ValidationError that arguments must raise."""
    with pytest.raises(ValidationError) as caught:
        validate_args(model, arguments, https_only=https_only)
    return describe(caught.value)


def test_a_complete_callback_is_accepted() -> None:
    # Given every callback argument, when validated, then the model holds them
    args = validate_args(CallbackArgs, GOOD_CALLBACK, https_only=True)
    assert isinstance(args, CallbackArgs)
    assert args.price == 49.5
    assert args.event_id == "evt_01HZX:pay-42.1"


def test_a_minimal_callback_is_accepted_with_optional_fields_absent() -> None:
    # Given only the seed's four fields, with an integer price
    arguments = {"callback_url": "https://m.example.com/", "email": "b@example.com", "plan": "P", "price": 0}
    # When validated, then timestamp and event_id default to None
    args = validate_args(CallbackArgs, arguments, https_only=True)
    assert isinstance(args, CallbackArgs)
    assert (args.timestamp, args.event_id) == (None, None)


def test_a_complete_email_is_accepted_and_logo_is_optional() -> None:
    # Given the email arguments with and without a logo, when validated, then both pass
    validate_args(EmailArgs, GOOD_EMAIL, https_only=True)
    validate_args(EmailArgs, {**GOOD_EMAIL, "logo_url": None}, https_only=True)
    without_logo = dict(GOOD_EMAIL)
    del without_logo["logo_url"]
    validate_args(EmailArgs, without_logo, https_only=True)


def test_http_callbacks_are_accepted_only_when_https_only_is_off() -> None:
    # Given an http:// callback URL
    arguments = {**GOOD_CALLBACK, "callback_url": "http://merchant.example.com/hook"}
    # When validated with https_only off, then it passes
    validate_args(CallbackArgs, arguments, https_only=False)
    # When validated with https_only on, then the error names the field and the switch
    text = problems(CallbackArgs, arguments, https_only=True)
    assert text.startswith("callback_url: must be an absolute https URL")
    assert "WHISKYPAY_CALLBACK_HTTPS_ONLY=false" in text


def test_an_http_logo_is_refused_even_when_http_callbacks_are_allowed() -> None:
    # Given an http:// logo, when validated with https_only off, then logo_url is still refused
    text = problems(EmailArgs, {**GOOD_EMAIL, "logo_url": "http://cdn.example.com/logo.png"}, https_only=False)
    assert text.startswith("logo_url: must be an absolute https URL")
    assert "WHISKYPAY_CALLBACK_HTTPS_ONLY" not in text


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("callback_url", "ftp://merchant.example.com/hook", "must be an absolute https URL"),
        ("callback_url", "//merchant.example.com/hook", "must be an absolute https URL"),
        ("callback_url", "merchant.example.com/hook", "must be an absolute https URL"),
        ("callback_url", "https:///hook", "must have a host"),
        ("callback_url", "https://user:pw@merchant.example.com/", "must not carry credentials"),
        ("callback_url", "https://token@merchant.example.com/", "must not carry credentials"),
        ("callback_url", "https://@merchant.example.com/", "must not carry credentials"),
        ("callback_url", "https://merchant.example.com/a b", "must not contain spaces"),
        ("callback_url", "https://merchant.example.com/\r\nX-Injected: 1", "control characters"),
        ("callback_url", "https://merchant.example.com:99999/", "is not a valid URL"),
        ("callback_url", "https://merchant.example.com:port/", "is not a valid URL"),
        ("callback_url", "https://[::1/", "is not a valid URL"),
        ("callback_url", "https://m.example.com/" + "a" * MAX_URL_LENGTH, "the limit is 2048"),
        ("callback_url", 42, "valid string"),
        ("email", "not-an-address", "not a valid email address"),
        ("email", "buyer@example.com\r\nBcc: x@example.com", "not a valid email address"),
        ("email", "", "not a valid email address"),
        ("plan", "", "at least 1 character"),
        ("plan", "   ", "must not be blank"),
        ("plan", "x" * 201, "at most 200 characters"),
        ("plan", "Pro\nBcc: evil@example.com", "control characters"),
        ("plan", "Pro\u2028", "control characters"),
        ("plan", "Pro\x00", "control characters"),
        ("plan", 7, "valid string"),
        ("price", -1, "non-negative finite number"),
        ("price", float("nan"), "non-negative finite number"),
        ("price", float("inf"), "non-negative finite number"),
        ("price", float("-inf"), "non-negative finite number"),
        ("price", True, "non-negative finite number"),
        ("price", "10", "non-negative finite number"),
        ("price", None, "non-negative finite number"),
        ("timestamp", "yesterday", "ISO-8601"),
        ("timestamp", "2026-11-27T21:00:00", "must carry a time zone"),
        ("timestamp", "2026-11-27T21:00:00Z" + " " * 30, "too long"),
        ("timestamp", 1_790_000_000, "valid string"),
        ("event_id", "", "1-128 characters"),
        ("event_id", "evt 1", "1-128 characters"),
        ("event_id", "e" * 129, "1-128 characters"),
        ("event_id", "evt/1", "1-128 characters"),
    ],
)
def test_each_bad_callback_argument_is_reported_by_field_name(field: str, value: Any, expected: str) -> None:
    # Given a valid callback with one bad argument
    # When validated
    text = problems(CallbackArgs, {**GOOD_CALLBACK, field: value})
    # Then the text starts with the field's name and says what is wrong
    assert text.startswith(f"{field}: ")
    assert expected in text


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("buyer_email", "nobody", "not a valid email address"),
        ("merchant_email", "sales@", "not a valid email address"),
        ("saas_name", "Acme\r\nBcc: evil@example.com", "control characters"),
        ("saas_name", "", "at least 1 character"),
        ("saas_name", "\t", "control characters"),
        ("plan", "y" * 201, "at most 200 characters"),
        ("logo_url", "javascript:alert(1)", "must be an absolute https URL"),
        ("logo_url", "https://u:p@cdn.example.com/logo.png", "must not carry credentials"),
    ],
)
def test_each_bad_email_argument_is_reported_by_field_name(field: str, value: Any, expected: str) -> None:
    # Given valid email arguments with one bad argument, when validated, then the field and problem are named
    text = problems(EmailArgs, {**GOOD_EMAIL, field: value})
    assert text.startswith(f"{field}: ")
    assert expected in text


def test_missing_and_unknown_arguments_are_named() -> None:
    # Given a callback without a price and with an argument the actor does not take
    arguments = {**GOOD_CALLBACK, "amount": 10}
    del arguments["price"]
    # When validated
    text = problems(CallbackArgs, arguments)
    # Then both fields are named, separated by "; "
    assert set(text.split("; ")) == {"price: is required", "amount: is not an argument of this actor"}


def test_several_problems_are_all_reported() -> None:
    # Given three bad fields, when validated, then each is named once
    text = problems(CallbackArgs, {**GOOD_CALLBACK, "email": "x", "plan": "", "price": -3})
    assert [part.split(":")[0] for part in text.split("; ")] == ["email", "plan", "price"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", f"{LEAK}@@x"),
        ("email", f"{LEAK}"),
        ("email", f"{LEAK}@localhost"),
        ("callback_url", f"https://{LEAK}:pw@example.com/"),
        ("callback_url", f"https://example.com/{LEAK} x"),
        ("callback_url", f"https://example.com/{LEAK}" + "a" * MAX_URL_LENGTH),
        ("plan", f"{LEAK}\n"),
        ("plan", LEAK * 20),
        ("price", f"{LEAK}"),
        ("timestamp", f"{LEAK}"),
        ("event_id", f"{LEAK} !"),
        ("amount", f"{LEAK}"),
    ],
)
def test_describe_never_echoes_the_input_value(field: str, value: str) -> None:
    # Given a bad argument carrying a distinctive value
    # When the error is described
    text = problems(CallbackArgs, {**GOOD_CALLBACK, field: value})
    # Then the field is named but the value does not appear
    assert text.startswith(f"{field}: ")
    assert LEAK not in text


def test_describe_does_not_echo_an_email_domain_that_fails_idna() -> None:
    # Given an address whose domain holds a character IDNA refuses
    text = problems(EmailArgs, {**GOOD_EMAIL, "buyer_email": f"buyer@{LEAK}\u2764.com"})
    # Then the domain (possibly personal) is not in the error text
    assert text.startswith("buyer_email: ")
    assert LEAK not in text


def test_an_event_id_with_a_trailing_newline_is_refused() -> None:
    # Given an event_id ending in a newline (it becomes the webhook-id header)
    # When validated, then it is refused like any other control character
    text = problems(CallbackArgs, {**GOOD_CALLBACK, "event_id": "evt_1\n"})
    assert text.startswith("event_id: ")


def test_a_huge_integer_price_is_a_validation_error_not_an_overflow() -> None:
    # Given a price too large for a float (JSON allows it)
    # When validated, then it is a ValidationError naming price (any verdict, but never a crash)
    try:
        validate_args(CallbackArgs, {**GOOD_CALLBACK, "price": 10**400}, https_only=True)
    except ValidationError as exc:
        assert describe(exc).startswith("price: ")


@pytest.mark.parametrize("url", ["https://m.example.com/a\u00a0b", "https://exa\u3000mple.com/"], ids=["nbsp", "ideo"])
def test_a_callback_url_with_unicode_whitespace_is_refused(url: str) -> None:
    # Given a URL with a non-ASCII space, when validated, then it is refused like an ASCII space
    text = problems(CallbackArgs, {**GOOD_CALLBACK, "callback_url": url})
    assert text.startswith("callback_url: ")


def test_the_refused_format_characters_are_unicode_category_cf_without_the_joiners() -> None:
    import re
    import sys
    import unicodedata

    from whiskypay.schemas import FORMAT_CHARACTERS

    # Given the character class the schemas refuse, and the Cf characters of this Python's Unicode database
    refused = re.compile(f"[{FORMAT_CHARACTERS}]")
    cf = {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"}
    # Then the class is exactly Cf minus ZWNJ and ZWJ
    assert {c for c in cf if refused.fullmatch(c)} == cf - {"\u200c", "\u200d"}
    assert not any(refused.fullmatch(chr(c)) for c in range(0x20000) if chr(c) not in cf)
