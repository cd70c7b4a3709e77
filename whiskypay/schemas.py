"""The argument schema of each actor, as pydantic models; InvalidPayload (re-exported) stops a bad send().

The same models run at `send()` in the gateway (nothing invalid reaches Redis) and before processing in the
worker (a message from a foreign producer or an old version is dead-lettered with the reason).
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from whiskypay.errors import InvalidPayload
from whiskypay.signing import MAX_KEY_VERSION, MERCHANT_ID

__all__ = ["MAX_PRICE", "MAX_URL_LENGTH", "CallbackArgs", "EmailArgs", "InvalidPayload", "check_email", "describe",
           "validate_args"]

#: The longest URL we accept, in characters.
MAX_URL_LENGTH = 2048

#: The largest price we accept: far above any real payment, far below where floats lose whole units.
MAX_PRICE = 10**12

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: Unicode format characters (category Cf, Unicode 14 as in Python 3.11): bidirectional controls (U+202A-U+202E,
#: U+2066-U+2069, U+200E, U+200F, U+061C) that reorder what a reader sees, and invisible ones (U+200B, U+2060,
#: U+FEFF, soft hyphen, tags...). The joiners U+200C and U+200D are left out: Persian and Indic names need them.
#: tests/test_schemas.py checks this class against unicodedata.
FORMAT_CHARACTERS = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b\u200e-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_FORMAT = re.compile(f"[{FORMAT_CHARACTERS}]")
#: An RFC 2047 encoded word starts with "=?": the email library decodes it in an address header, so the mail
#: would go to the decoded address instead of the one validated here.
_ENCODED_WORD_START = "=?"
_CONTROL_OR_SPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]")
_EVENT_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def _no_format_characters(value: str) -> None:
    found = _FORMAT.search(value)
    if found:
        raise ValueError(
            f"must not contain invisible or bidirectional format characters (found U+{ord(found.group()):04X}); "
            "remove it (the joiners U+200C and U+200D are allowed)"
        )


def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (CR, LF, tab, NUL...)")
    _no_format_characters(value)
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _check_url(value: str, *, https_only: bool, field: str) -> str:
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"is {len(value)} characters long; the limit is {MAX_URL_LENGTH}")
    if _CONTROL_OR_SPACE.search(value):
        raise ValueError("must not contain spaces or control characters")
    _no_format_characters(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  raises on a malformed port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    allowed = ("https",) if https_only else ("https", "http")
    if parts.scheme not in allowed:
        hint = "" if not https_only or field != "callback_url" else " (WHISKYPAY_CALLBACK_HTTPS_ONLY=false allows http)"
        raise ValueError(f"must be an absolute {' or '.join(allowed)} URL, got scheme {parts.scheme!r}{hint}")
    if not parts.hostname:
        raise ValueError("must have a host")
    if "@" in parts.netloc:  # exactly when parts.username or parts.password is not None (urllib's _userinfo)
        raise ValueError("must not carry credentials (user:password@); use the webhook signature instead")
    return value


def _check_event_id(value: str | None) -> str | None:
    if value is not None and not _EVENT_ID.fullmatch(value):
        raise ValueError("must be 1-128 characters of letters, digits and _ . : -")
    return value


def _check_merchant_id(value: str | None) -> str | None:
    if value is not None and not MERCHANT_ID.fullmatch(value):
        raise ValueError("must be 1-64 characters of letters, digits and _ . : -")
    return value


Text = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_no_control_characters)]

# The common case of an email address, checked by regular expression: a dot-atom local part and an ASCII domain
# of LDH labels under an alphabetic TLD. Anything else (quoted local parts, internationalised or punycode
# domains, labels with "--") goes to email-validator, which also has the last word on everything this accepts
# (tests/test_schemas_property.py checks that it never accepts what email-validator refuses). It is here for
# speed: email-validator costs about 40 us an address, a third of a whole send(); it is imported at its first
# use (its module compiles its regular expressions at import: about 20 ms of every worker's start-up).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"(?!-)(?!..--)[A-Za-z0-9-]{1,63}(?<!-)"
_SIMPLE_EMAIL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@(?:{_LABEL}\.)+(?P<tld>[A-Za-z]{{2,63}})")
#: email_validator.SPECIAL_USE_DOMAIN_NAMES, copied so that the fast path does not import it
#: (tests/test_startup_imports.py checks the copy against the installed email-validator).
_SPECIAL_USE_TLDS = frozenset({"arpa", "invalid", "local", "localhost", "onion", "test"})


def check_email(value: str) -> str:
    """Return value unchanged if it is a deliverable-looking email address; raise ValueError otherwise."""
    if _ENCODED_WORD_START in value:
        raise ValueError("must not contain an RFC 2047 encoded word (=?...?=); give the plain address")
    _no_format_characters(value)
    match = _SIMPLE_EMAIL.fullmatch(value)
    if (
        match is not None
        and len(value) <= 254
        and len(value.partition("@")[0]) <= 64
        and match.group("tld").lower() not in _SPECIAL_USE_TLDS
        and "xn--" not in value.lower()
    ):
        return value
    import email_validator

    try:
        email_validator.validate_email(value, check_deliverability=False)
    except email_validator.EmailNotValidError:
        raise ValueError("is not a valid email address") from None
    return value


EmailAddress = Annotated[str, Field(max_length=320), AfterValidator(check_email)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, str_strip_whitespace=False)


class CallbackArgs(_Schema):
    """Arguments of `send_callback`: the seed's webhook job, plus an optional idempotency key."""

    callback_url: str
    email: EmailAddress
    plan: Text
    price: int | float
    timestamp: str | None = None
    event_id: str | None = None
    merchant_id: str | None = None
    key_version: int = 1

    @field_validator("callback_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        https_only = (info.context or {}).get("https_only", True)
        return _check_url(value, https_only=https_only, field="callback_url")

    @field_validator("price", mode="before")
    @classmethod
    def _price(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a non-negative finite number (int or float)")
        if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= MAX_PRICE:
            raise ValueError(f"must be a non-negative finite number no larger than {MAX_PRICE:.0e}")
        return value

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if len(value) > 40:
            raise ValueError("is too long for an ISO-8601 timestamp")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an ISO-8601 timestamp like 2026-11-27T21:00:00Z") from None
        if parsed.tzinfo is None:
            raise ValueError("must carry a time zone (Z or +hh:mm)")
        return value

    @field_validator("event_id")
    @classmethod
    def _event_id(cls, value: str | None) -> str | None:
        return _check_event_id(value)

    @field_validator("merchant_id")
    @classmethod
    def _merchant_id(cls, value: str | None) -> str | None:
        return _check_merchant_id(value)

    @field_validator("key_version")
    @classmethod
    def _key_version(cls, value: int, info: ValidationInfo) -> int:
        if not 1 <= value <= MAX_KEY_VERSION:
            raise ValueError(f"must be an integer from 1 to {MAX_KEY_VERSION}")
        # merchant_id is absent from info.data when it failed its own check: that error is the one to show.
        if value > 1 and "merchant_id" in info.data and info.data["merchant_id"] is None:
            raise ValueError("needs merchant_id (the master secret has no versions: rotate WHISKYPAY_WEBHOOK_SECRET)")
        return value


class EmailArgs(_Schema):
    """Arguments of `send_email`: one payment's buyer receipt and merchant notice."""

    buyer_email: EmailAddress
    merchant_email: EmailAddress
    plan: Text
    saas_name: Text
    logo_url: str | None = None
    merchant_id: str | None = None
    event_id: str | None = None

    @field_validator("merchant_id")
    @classmethod
    def _merchant_id(cls, value: str | None) -> str | None:
        return _check_merchant_id(value)

    @field_validator("event_id")
    @classmethod
    def _event_id(cls, value: str | None) -> str | None:
        return _check_event_id(value)

    @field_validator("logo_url")
    @classmethod
    def _logo(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, https_only=True, field="logo_url")


#: The longest delay Dramatiq accepts for a message, in milliseconds (7 days; settings.MAX_DELAY_MS).
_MAX_DELAY_MS = 7 * 24 * 60 * 60 * 1000

_Ms = Annotated[int, Field(ge=0, le=_MAX_DELAY_MS)]
_UnixMs = Annotated[int, Field(ge=0, lt=2**53)]
_Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")]
#: _Identifier's pattern, and the options that are _Identifier and nothing else (validate_options' fast path).
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_IDENTIFIER_OPTIONS = frozenset({"webhook_id", "redis_message_id", "failure_class"})


class MessageOptions(BaseModel):
    """The options a message of our actors may carry, each with its type and range.

    At `send()` (`send_with_options(**options)`) every option is checked and unknown ones are refused: the
    gateway can set nothing unchecked. The broker and our middleware add the second group on the way; they
    are checked too, so a caller cannot pass off a malformed one (a `retries` option no longer skips anything).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # What a caller may choose.
    #: The webhook-id header of every attempt (default: event_id, else msg_<message id>).
    webhook_id: _Identifier | None = None
    max_retries: Annotated[int, Field(ge=0, le=100)] | None = None
    min_backoff: Annotated[int, Field(gt=0, le=_MAX_DELAY_MS)] | None = None
    max_backoff: Annotated[int, Field(gt=0, le=_MAX_DELAY_MS)] | None = None
    retry_schedule: Annotated[list[_Ms] | tuple[_Ms, ...], Field(min_length=1, max_length=100)] | None = None
    max_age: Annotated[int, Field(gt=0)] | None = None
    time_limit: Annotated[int, Field(gt=0)] | None = None
    # What the broker and our middleware add (also valid from a caller, with these types).
    redis_message_id: _Identifier | None = None
    eta: _UnixMs | None = None
    retries: Annotated[int, Field(ge=0, le=100)] | None = None
    requeue_timestamp: _UnixMs | None = None
    traceback: Annotated[str, Field(max_length=4000)] | None = None
    failure_class: _Identifier | None = None
    failed_at: _UnixMs | None = None
    #: When this message was first deferred (not attempted: its merchant's server was saturated), unix ms.
    deferred_since: _UnixMs | None = None
    #: How many times it was deferred in a row.
    deferrals: Annotated[int, Field(ge=0)] | None = None


def validate_options(options: dict[str, Any], *, allow_unknown: bool) -> None:
    """Check a message's options against MessageOptions; raise ValidationError.

    Parameters:
      allow_unknown: Pass options this service does not know (a message already in a queue), checking the rest.
    """
    if all(type(value) is str and name in _IDENTIFIER_OPTIONS and _IDENTIFIER.fullmatch(value)
           for name, value in options.items()):
        return  # what every send() carries (its redis_message_id): valid, without building the model
    known = options if not allow_unknown else {k: v for k, v in options.items() if k in MessageOptions.model_fields}
    MessageOptions.model_validate(known)


def describe(error: ValidationError, *, of: str = "arguments") -> str:
    """Return "field: problem; field: problem" without echoing the input values (they may be personal data).

    Parameters:
      of: "arguments" or "options": what the model checked (options are named "options.<name>").
    """
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or of
        if of == "options":
            field = f"options.{field}"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "is not an argument of this actor" if of == "arguments" else "is not an option this service knows"
        elif item["type"] == "missing":
            message = "is required"
        elif message.startswith("value is not a valid email address"):
            message = "is not a valid email address"  # email-validator's detail quotes parts of the input
        problems.append(f"{field}: {message}")
    return "; ".join(problems)


def validate_args(model: type[BaseModel], arguments: dict[str, Any], *, https_only: bool) -> BaseModel:
    """Validate one call's arguments against model; raise ValidationError."""
    return model.model_validate(arguments, context={"https_only": https_only})
