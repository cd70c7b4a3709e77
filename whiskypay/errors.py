"""Every exception class of WhiskyPay Workers, in one tree.

    WhiskyPayError
    ├── ConfigurationError        a WHISKYPAY_ setting is missing or malformed (`settings.load_settings`)
    ├── WorkerStartRefused        a worker cannot start with this configuration (a Dramatiq MiddlewareError)
    ├── InvalidPayload            send() refused the arguments; nothing was enqueued (a Dramatiq MiddlewareError)
    ├── DuplicateEvent            send() found its event_id already enqueued (a Dramatiq MiddlewareError)
    ├── EnqueueError              send() could not reach Redis or Redis refused it: the job was NOT accepted
    │   └── NotReplicated         the primary took it but too few replicas confirmed: it MAY have been accepted
    ├── WebhookVerificationError  a received webhook's headers or signature do not check out (merchant side)
    ├── OpsError                  an operations command cannot use Redis or the configuration (exit status 2)
    ├── PermanentError            never retried: listed in the actors' `throws`
    │   ├── EndpointGone          the merchant answered 410 Gone
    │   ├── RefusedHost           the callback host resolved to a private/reserved address
    │   ├── InvalidMessage        a message in a queue failed its schema (dead-lettered unprocessed)
    │   └── SmtpPermanentError    the SMTP server answered 5xx
    ├── Deferred                  not a failure: run this message later, without counting an attempt
    ├── DeferredTooLong           deferred longer than WHISKYPAY_MAX_DEFERRAL_S: dead-lettered unattempted
    ├── Parked                    not attempted: its merchant's breaker is open, it waits in the parked list
    ├── ParkLimitExceeded         a callback stayed parked past WHISKYPAY_PARK_MAX_MS (so it was dead-lettered)
    ├── DeliveryError             one webhook attempt failed; retried by the queue's policy
    │   └── HttpStatusError       the merchant answered something other than 2xx
    └── SmtpTemporaryError        an SMTP 4xx reply or a lost connection; retried
        └── SmtpTimedOut          an SMTP exchange passed its deadline (WHISKYPAY_SMTP_TIMEOUT_S) and was cut off

The MiddlewareErrors follow Dramatiq's contract: raised from a `before_*` hook, they make `send()` (or the
worker's start) fail, where any other exception would be logged and ignored; Parked is one too, so that raised
in `before_process_message` it stops the message before the actor runs. Deferred, Parked,
DeliveryError and SmtpTemporaryError are also Dramatiq `Retry`s (with no delay of their own): an expected,
retryable failure is logged as one line by the actor instead of a traceback per attempt by the worker.

Every message is safe to log and to send to Sentry: hosts and status codes, never URLs with their query,
bodies, headers, addresses or secrets. Errors that wrap a library error are raised `from None` when the
library's text would carry a URL or an address.

Public import paths kept by re-export: `settings.ConfigurationError`, `whiskypay.schemas.InvalidPayload`,
`whiskypay.actor.EnqueueError`, `whiskypay.signing.WebhookVerificationError` (and `whiskypay.cli.ops.OpsError`,
`middleware.signing.WorkerStartRefused`, `middleware.idempotency.DuplicateEvent`, where they are raised).
This module imports nothing from the project: every other module may import it.
"""

from __future__ import annotations

from dramatiq import Retry
from dramatiq.middleware import MiddlewareError


class WhiskyPayError(Exception):
    """Base class for every error of this service.

    Parameters:
      message(str): Safe-to-log text.
      tags(dict): Safe triage facts (host, http_status, smtp_code) copied to Sentry tags.
    """

    #: How long the attempt that raised this took, in milliseconds, when it was timed (webhook attempts).
    duration_ms: float | None = None
    #: The first bytes of the merchant's response when the error is an HTTP answer (kept by the delivery ledger).
    response_head: bytes = b""

    def __init__(self, message: str, **tags: str | int | None) -> None:
        super().__init__(message)
        self.tags = {key: value for key, value in tags.items() if value is not None}


class ConfigurationError(WhiskyPayError):
    """A setting is missing or malformed; the text names the WHISKYPAY_ variable and the fix."""


class WorkerStartRefused(WhiskyPayError, MiddlewareError):
    """A worker cannot start with this configuration; the text names the setting and the fix."""


class InvalidPayload(WhiskyPayError, MiddlewareError):
    """An actor's arguments failed its schema; nothing was enqueued. The text names each field and problem."""


class DuplicateEvent(WhiskyPayError, MiddlewareError):
    """This event_id was already enqueued within the window; `WhiskyPayActor.send` returns the first message.

    Parameters:
      holder(str): The message id of the first message, which holds the event_id's reservation.
    """

    def __init__(self, message: str, *, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class EnqueueError(WhiskyPayError):
    """The job was NOT accepted (Redis unreachable or failing); the gateway must retry or record it."""


class NotReplicated(EnqueueError):
    """The primary accepted the job but fewer replicas than WHISKYPAY_REDIS_MIN_REPLICA_ACKS confirmed it in time.

    Unlike its parent, the job MAY have been accepted (it is in the primary's queue and may well be delivered).
    Its event_id reservation is kept: send it again with the same event_id, which cannot enqueue it twice.
    """


class WebhookVerificationError(WhiskyPayError):
    """The webhook's headers or signature do not check out; the receiver must reject it (HTTP 400)."""


class OpsError(WhiskyPayError):
    """Redis or the configuration cannot be used by `whiskypay status/failed/retry`; the text names the setting
    and the fix."""


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
    """The message cannot run now (its merchant's server is saturated by slow deliveries); try again later.

    QueueRetryPolicy re-enqueues it after `delay` milliseconds without counting an attempt, for at most
    WHISKYPAY_MAX_DEFERRAL_S in a row; then it dead-letters it with `DeferredTooLong`.
    """

    def __init__(self, message: str, *, delay_ms: int, **tags: str | int | None) -> None:
        super().__init__(message, **tags)
        self.delay = delay_ms


class DeferredTooLong(WhiskyPayError):
    """A message was deferred, without an attempt, for longer than WHISKYPAY_MAX_DEFERRAL_S: dead-lettered."""


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


class SmtpTimedOut(SmtpTemporaryError):
    """An exchange with the relay passed its deadline and was cut off (`whiskypay.smtp.smtp_exchange`).

    Cut off after the data, it is as ambiguous as a connection dropped there: the relay may have accepted the email.
    """


class Parked(WhiskyPayError, Retry, MiddlewareError):
    """The callback's merchant is unreachable (its breaker is open): it is parked, not attempted, no attempt counted.

    MerchantBreakers raises it from `before_process_message` (a MiddlewareError, so Dramatiq does not swallow it,
    and a Retry, so the worker logs no traceback); the message is already in its merchant's parked list, and
    QueueRetryPolicy leaves it alone.
    """


class ParkLimitExceeded(WhiskyPayError):
    """A callback stayed parked longer than WHISKYPAY_PARK_MAX_MS: dead-lettered with this as its reason."""
