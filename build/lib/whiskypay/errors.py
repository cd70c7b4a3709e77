"""Errors raised by WhiskyPay Workers.

    WhiskyPayError
    ├── PermanentError            never retried: listed in the actors' `throws`
    │   ├── EndpointGone          the merchant answered 410 Gone
    │   ├── RefusedHost           the callback host resolved to a private/reserved address
    │   ├── InvalidMessage        a message in a queue failed its schema (dead-lettered unprocessed)
    │   └── SmtpPermanentError    the SMTP server answered 5xx
    ├── Deferred                  not a failure: run this message later, without counting an attempt
    ├── DeliveryError             one webhook attempt failed; retried by the queue's policy
    │   └── HttpStatusError       the merchant answered something other than 2xx
    └── SmtpTemporaryError        an SMTP 4xx reply or a lost connection; retried

DeliveryError and SmtpTemporaryError are also Dramatiq `Retry`s (with no delay of their own): an expected,
retryable failure is logged as one line by the actor instead of a traceback per attempt by the worker.

Every message is safe to log and to send to Sentry: hosts and status codes, never URLs with their query,
bodies, headers, addresses or secrets. Errors that wrap a library error are raised `from None` when the
library's text would carry a URL or an address.

`InvalidPayload` (in `whiskypay.schemas`) is a Dramatiq `MiddlewareError`: it makes `send()` raise in the
gateway and nothing is enqueued.
"""

from __future__ import annotations

from dramatiq import Retry


class WhiskyPayError(Exception):
    """Base class for every error of this service.

    Parameters:
      message(str): Safe-to-log text.
      tags(dict): Safe triage facts (host, http_status, smtp_code) copied to Sentry tags.
    """

    def __init__(self, message: str, **tags: str | int | None) -> None:
        super().__init__(message)
        self.tags = {key: value for key, value in tags.items() if value is not None}


class PermanentError(WhiskyPayError):
    """A failure that another attempt cannot fix: the message is dead-lettered at once."""


class EndpointGone(PermanentError):
    """The merchant answered 410 Gone: they told us the endpoint no longer exists."""


class RefusedHost(PermanentError):
    """The callback URL points at a loopback, private, link-local or reserved address."""


class InvalidMessage(PermanentError):
    """A message taken from a queue does not match its actor's schema."""


class SmtpPermanentError(PermanentError):
    """The SMTP server rejected the email with a 5xx reply."""


class Deferred(WhiskyPayError, Retry):
    """The message cannot run now (its merchant's host is saturated by slow deliveries); try again later.

    QueueRetryPolicy re-enqueues it after `delay` milliseconds without counting an attempt.
    """

    def __init__(self, message: str, *, delay_ms: int, **tags: str | int | None) -> None:
        super().__init__(message, **tags)
        self.delay = delay_ms


class DeliveryError(WhiskyPayError, Retry):
    """One webhook attempt failed (timeout, connection error, non-2xx); the retry policy decides what next."""


class HttpStatusError(DeliveryError):
    """The merchant answered with a status outside 2xx.

    Parameters:
      retry_after_ms(int|None): The wait the merchant asked for with Retry-After, if any.
    """

    def __init__(self, message: str, *, retry_after_ms: int | None = None, **tags: str | int | None) -> None:
        super().__init__(message, **tags)
        self.retry_after_ms = retry_after_ms


class SmtpTemporaryError(WhiskyPayError, Retry):
    """An SMTP 4xx reply, a timeout or a dropped connection: worth another attempt."""
