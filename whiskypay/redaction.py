"""Keep personal data and secrets out of logs, Sentry events and the error text stored in Redis."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from dramatiq import Message
from dramatiq.broker import MessageProxy

# An address in free text. The local part takes every character an address may carry (RFC 5322 atext: the
# apostrophe of jane.doe'@example.com included, and UTF-8) except those that end a token in our texts; its first
# character is not a quote, so the quotes of a repr stay outside ('buyer@example.com' -> 'b***@example.com').
# The TLD is letters or an IDNA label (xn--...). A text mask is the second line: known address fields are masked
# by their structure (`mask_address`, `mask_arguments`, the `addresses` parameters below).
_EMAIL = re.compile(
    r"([^\s@<>\"'`(),;:\[\]\\])[^\s@<>\"(),;:\[\]\\]*@([^\s@<>\"'(),;:\[\]\\]+\.(?:[^\W\d_]{2,}|(?i:xn--[a-z0-9-]+)))"
)

#: The message arguments that hold an email address: masked by their structure wherever a message is shown.
ADDRESS_FIELDS = frozenset({"email", "buyer_email", "merchant_email"})

#: The message arguments that hold a URL: shown with their query string and fragment cut.
URL_FIELDS = frozenset({"callback_url", "logo_url"})
_URL_TAIL = re.compile(r"(https?://[^/\s'\"?#]+)[^\s'\"]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return url with its password (user-info or `password=` query parameter) replaced by `***`."""
    netloc = urlsplit(url).netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            url = url.replace(netloc, f"{userinfo.split(':', 1)[0]}:***@{host}", 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def url_password(url: str) -> str | None:
    """Return the password in url (user-info or `password=` query parameter), or None."""
    parts = urlsplit(url)
    if parts.password:
        return parts.password
    match = re.search(r"(?i)(?:^|&)password=([^&]*)", parts.query)
    return match.group(1) if match and match.group(1) else None


def url_host(url: object) -> str | None:
    """Return the host of url (never its path or query), or None if it is not a readable URL."""
    if not isinstance(url, str):
        return None
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def mask_email(address: str) -> str:
    """Return text with every address in it masked: "b***@example.com" for "buyer@example.com"."""
    return _EMAIL.sub(_mask_match, address)


def _mask_match(match: re.Match[str]) -> str:
    local = match.group(0).rpartition("@")[0]
    if local.endswith("***") and len(local) <= 4:  # masked already (by structure, or by an earlier pass)
        return match.group(0)
    return f"{match.group(1)}***@{match.group(2)}"


def mask_address(address: str) -> str:
    """Mask one known address by its structure: the local part's first character, "***", "@" and the domain.

    Whatever characters the local part holds (apostrophes, quotes, UTF-8), only its first one is kept; a value
    without "@" or without a local part becomes "***".
    """
    local, at, domain = address.rpartition("@")
    return f"{local[0]}***@{domain}" if at and local else "***"


def known_addresses(arguments: object) -> tuple[str, ...]:
    """Return the addresses in a message's keyword arguments (its ADDRESS_FIELDS), for structural masking."""
    if not isinstance(arguments, dict):
        return ()
    return tuple(value for name, value in arguments.items() if name in ADDRESS_FIELDS and isinstance(value, str))


def cut_url(url: str) -> str:
    """Return url with its user-info dropped and its query string and fragment cut ("https://h/p?…")."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        host = parts.hostname or ""
    except ValueError:
        return "***"
    host = f"[{host}]" if ":" in host else host
    cut = "?…" if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")) else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{cut}" if parts.scheme else scrub_text(url)


def scrub_text(text: str, secrets: Iterable[str] = (), addresses: Iterable[str] = ()) -> str:
    """Mask email addresses, cut URLs down to scheme and host, and replace each secret with [redacted].

    Parameters:
      secrets: Exact values replaced by "[redacted]".
      addresses: Known addresses (a message's address fields): each is masked by its structure wherever it
        appears, whatever characters it holds, before the text mask catches the others.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    for address in sorted({a for a in addresses if a}, key=len, reverse=True):
        text = text.replace(address, mask_address(address))
    return _URL_TAIL.sub(r"\1/…", mask_email(text))


def error_summary(exception: BaseException, addresses: Iterable[str] = ()) -> str:
    """Return "ErrorClass: text" with addresses masked and URLs cut to their host: safe to store and show.

    Parameters:
      addresses: The message's known addresses (see `scrub_text`).
    """
    return f"{type(exception).__name__}: {scrub_text(str(exception), addresses=addresses)}"[:1000]


def scrub(value: Any, secrets: tuple[str, ...], addresses: tuple[str, ...] = ()) -> Any:
    """Apply scrub_text to every string inside value (dicts, lists, tuples), returning a copy."""
    if isinstance(value, str):
        return scrub_text(value, secrets, addresses)
    if isinstance(value, dict):
        return {key: scrub(item, secrets, addresses) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(item, secrets, addresses) for item in value)
    return value


#: A known address field inside text that is not a message (an undecodable message's bytes): "email": "...".
_ADDRESS_FIELD_IN_TEXT = re.compile(r'("(?:' + "|".join(sorted(ADDRESS_FIELDS)) + r')"\s*:\s*")((?:[^"\\]|\\.)*)(")')


def masked_sample(data: bytes, secrets: Iterable[str] = ()) -> str:
    """Return raw bytes (an undecodable message) as text safe to show: decoded as UTF-8 (undecodable bytes as
    \\x escapes), the values of known address fields masked by structure, then scrubbed like any text."""
    text = data.decode("utf-8", errors="backslashreplace")
    text = _ADDRESS_FIELD_IN_TEXT.sub(lambda m: m.group(1) + mask_address(m.group(2)) + m.group(3), text)
    return scrub_text(text, secrets)


def mask_arguments(arguments: dict[str, Any], secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return a copy of a message's keyword arguments safe to show: address fields masked by their structure,
    URL fields cut before their query string, every other string scrubbed (with those addresses known)."""
    addresses = known_addresses(arguments)
    shown: dict[str, Any] = {}
    for name, value in arguments.items():
        if name in ADDRESS_FIELDS and isinstance(value, str):
            shown[name] = mask_address(value)
        elif name in URL_FIELDS and isinstance(value, str):
            shown[name] = cut_url(value)
        else:
            shown[name] = scrub(value, secrets, addresses)
    return shown


def describe_message(message: Message[Any] | MessageProxy) -> str:
    """Return "send_callback(<message id>)": a message named without its arguments."""
    return f"{message.actor_name}({message.message_id})"


class RedactMessageArgs(logging.Filter):
    """Replace Dramatiq messages in log arguments by their actor and id, so args never reach a log line.

    Dramatiq's worker logs "Failed to process message %s" with `Message.__str__`, which prints every argument.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                describe_message(arg) if isinstance(arg, Message | MessageProxy) else arg for arg in record.args
            )
        return True


def dramatiq_message_loggers(queue_names: Iterable[str]) -> list[str]:
    """Return the names of the Dramatiq loggers that print messages (with their arguments) for these queues."""
    names = ["dramatiq.worker.WorkerThread", "dramatiq.worker.Worker"]
    for queue in queue_names:
        names += [f"dramatiq.worker.ConsumerThread({queue})", f"dramatiq.worker.ConsumerThread({queue}.DQ)"]
    return names


def install_log_redaction(queue_names: Iterable[str]) -> None:
    """Add RedactMessageArgs to Dramatiq's message-printing loggers (idempotent)."""
    for name in dramatiq_message_loggers(queue_names):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RedactMessageArgs) for existing in logger.filters):
            logger.addFilter(RedactMessageArgs())
