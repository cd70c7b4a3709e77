"""What became of one processed message, named once for metrics, counters, logs, the CLI and the ledger.

An ATTEMPT's outcome:
  delivered      it succeeded (a webhook got a 2xx, the emails went out)
  failed         it raised
  deferred       it was not attempted and no attempt is counted (a slow host's cap; a parked merchant)
What FOLLOWS a failed attempt (its disposition):
  retried        enqueued again by its queue's retry policy
  dead_lettered  failed for good (retries spent, a `throws` error, an invalid message): in the dead-letter queue
  parked         held back with its merchant's other messages, to run when the merchant recovers (its merchant's
                 breaker is open; MerchantBreakers marks the message with the `parked` option); a callback parked
                 without being attempted is `deferred` with disposition `parked`

`classify` is the one place that decides them; `Outcome.label` is what `whiskypay_deliveries_total{outcome}`
counts (delivered, retried, dead_lettered, parked, deferred). The outcome counters of `whiskypay status` keep
their Redis fields (`completed` counts delivered messages, `failed` dead-lettered ones: see `whiskypay.keys`).
`record_failure` is the one place that writes a failure onto a message (its `traceback` and
`failure_class` options, kept in Redis with a dead letter and shown by `whiskypay failed`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

from whiskypay.errors import Deferred, Parked
from whiskypay.redaction import error_summary, known_addresses

AttemptOutcome = Literal["delivered", "failed", "deferred"]
Disposition = Literal["retried", "dead_lettered", "parked"]

#: The values of the `outcome` label of whiskypay_deliveries_total, in the order they are documented.
METRIC_OUTCOMES = ("delivered", "retried", "dead_lettered", "parked", "deferred")


class _Processed(Protocol):
    @property
    def failed(self) -> bool: ...

    @property
    def options(self) -> dict[str, Any]: ...


class _WithOptions(Protocol):
    @property
    def options(self) -> dict[str, Any]: ...


class Outcome(NamedTuple):
    """An attempt's outcome and, after a failed attempt, what follows it."""

    attempt: AttemptOutcome
    disposition: Disposition | None = None

    @property
    def label(self) -> str:
        """The metric label: a failed attempt's disposition, else the attempt's outcome."""
        return self.disposition if self.attempt == "failed" and self.disposition else self.attempt


def classify(message: _Processed, exception: BaseException | None) -> Outcome:
    """Return what became of message's attempt, once the retry policy has decided (`message.failed`).

    Parameters:
      message: The processed message (a MessageProxy): `failed` is set when it is dead-lettered.
      exception: What the attempt raised, or None.
    """
    if message.failed:
        return Outcome("failed", "dead_lettered")
    if exception is None:
        return Outcome("delivered")
    if isinstance(exception, Parked):
        return Outcome("deferred", "parked")
    if isinstance(exception, Deferred):
        return Outcome("deferred")
    if message.options.get("parked"):
        return Outcome("failed", "parked")
    return Outcome("failed", "retried")


def failure_options(exception: BaseException | None, addresses: tuple[str, ...] = ()) -> dict[str, str]:
    """Return the `traceback` ("ErrorClass: text", scrubbed) and `failure_class` options for exception.

    Parameters:
      addresses: The message's known addresses, masked by their structure wherever the text quotes them.
    """
    if exception is None:
        return {"traceback": "failed without an error", "failure_class": "Unknown"}
    return {"traceback": error_summary(exception, addresses), "failure_class": type(exception).__name__}


def record_failure(message: _WithOptions, exception: BaseException | None) -> None:
    """Write exception onto message's options (`traceback`, `failure_class`), replacing an earlier one.

    The message's own addresses (its address arguments) are masked in the text by their structure.
    """
    message.options.update(failure_options(exception, known_addresses(getattr(message, "kwargs", None))))
