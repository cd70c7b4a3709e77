"""Keep personal data and secrets out of logs, Sentry events and the error text stored in Redis."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from dramatiq import Message
from dramatiq.broker import MessageProxy

_EMAIL = re.compile(r"([^\s@<>\"',;:()\[\]])[^\s@<>\"',;:()\[\]]*@([^\s@<>\"',;:()\[\]]+\.[^\W\d_]{2,})")
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
    """Return "b***@example.com" for "buyer@example.com"."""
    return _EMAIL.sub(r"\1***@\2", address)


def scrub_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask email addresses, cut URLs down to scheme and host, and replace each secret with [redacted]."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _URL_TAIL.sub(r"\1/…", mask_email(text))


def error_summary(exception: BaseException) -> str:
    """Return "ErrorClass: text" with addresses masked and URLs cut to their host: safe to store and show."""
    return f"{type(exception).__name__}: {scrub_text(str(exception))}"[:1000]


def scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """Apply scrub_text to every string inside value (dicts, lists, tuples), returning a copy."""
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {key: scrub(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(item, secrets) for item in value)
    return value


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
