"""Merchant breakers, the pure part: who a callback's merchant is, which failures mean "unreachable", the state.

A merchant is a callback's `merchant_id` when it has one, else its callback URL's host, normalised, as a breaker
named `host=<host>` (`merchant_of`; stored as the tagged pair `breaker_member`, so the two kinds never meet). Its
breaker (the Redis part
is `whiskypay.breakers`) is

  closed   callbacks are attempted; consecutive outage failures are counted
  open     the last WHISKYPAY_BREAKER_FAILURES attempts all failed (or an operator held the merchant): callbacks are
           parked, one probe per WHISKYPAY_BREAKER_PROBE_INTERVAL_MS (none while held); a probe's 2xx closes it

An outage failure is what says the merchant's server is not answering: a 5xx, 408 or 429 reply, a timeout or a
connection error. Any other reply (a 4xx, a 3xx) means it is up, and resets the count like a 2xx.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from whiskypay import keys
from whiskypay.errors import DeliveryError, HttpStatusError
from whiskypay.keys import iso_ms
from whiskypay.redaction import url_host

#: HTTP statuses outside 5xx that count as the merchant being unreachable.
OUTAGE_STATUSES = frozenset({408, 429})

#: The actor whose messages have merchants (and breakers).
CALLBACK_ACTOR = "send_callback"

State = Literal["open", "closed"]


#: The two kinds of breaker identity and how a host's breaker is named (`keys.breaker_member`).
HOST_NAME_PREFIX = keys.HOST_BREAKER_PREFIX
breaker_member = keys.breaker_member
breaker_name = keys.breaker_name


def normalise_host(host: str) -> str | None:
    """Return host as one breaker knows it: lower-case, no trailing dot, IDNA (punycode), IPv6 unbracketed and
    compressed; None when nothing is left.

    "Shop.Example." and "shop.example" are one host; so are "Bücher.example" and "xn--bcher-kva.example", and
    "[::1]" and "0:0:0:0:0:0:0:1".
    """
    import ipaddress

    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0]).compressed + ("%" + text.split("%", 1)[1]
                                                                               if "%" in text else "")
        except ValueError:
            return text or None
    text = text.rstrip(".")
    try:
        text = text.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # not IDNA-encodable (an empty label, a label over 63 characters): kept lower-cased as it was
    return text or None


def host_breaker_name(host: str) -> str | None:
    """Return the name of host's breaker (`host=shop.example`), normalised, or None for an empty host."""
    normal = normalise_host(host)
    return None if normal is None else HOST_NAME_PREFIX + normal


def merchant_of(kwargs: object) -> str | None:
    """Return a send_callback message's breaker name: its `merchant_id`, else `host=<its normalised callback host>`;
    None if neither.

    The two kinds never meet: merchant_id "shop.example" and a callback to host "shop.example" (no merchant_id) are
    two breakers, and "Shop.Example." and "shop.example" are one.

    Parameters:
      kwargs: The message's keyword arguments.
    """
    if not isinstance(kwargs, Mapping):
        return None
    merchant_id = kwargs.get("merchant_id")
    if isinstance(merchant_id, str) and merchant_id:
        return merchant_id
    host = url_host(kwargs.get("callback_url"))
    return host_breaker_name(host) if host else None


def operator_name(text: str) -> str:
    """Return the breaker name an operator typed, normalised: `host=Shop.Example.` is `host=shop.example`; anything
    else is a merchant_id, as typed."""
    if text.startswith(HOST_NAME_PREFIX):
        return host_breaker_name(text[len(HOST_NAME_PREFIX):]) or text
    return text


def is_outage(exception: BaseException) -> bool:
    """Return True if exception says the merchant is unreachable (5xx, 408, 429, timeout, connection error)."""
    if isinstance(exception, HttpStatusError):
        status = exception.tags.get("http_status")
        return isinstance(status, int) and (status >= 500 or status in OUTAGE_STATUSES)
    return isinstance(exception, DeliveryError)



def park_limit_reason(merchant: str, *, parked_at_ms: int, since_ms: int | None, limit_ms: int, now_ms: int) -> str:
    """Return the reason a callback parked past the limit is dead-lettered with (no URL, no arguments).

    Parameters:
      merchant: The merchant.
      parked_at_ms: When the callback was first parked (unix ms).
      since_ms: Since when the merchant's breaker has been open (unix ms), None if it is closed now.
      limit_ms: WHISKYPAY_PARK_MAX_MS.
      now_ms: Now (unix ms).
    """
    since = iso_ms(since_ms if since_ms is not None else parked_at_ms)
    hours = (now_ms - parked_at_ms) / 3_600_000
    return (
        f"merchant {merchant} unreachable since {since}: parked {hours:.1f} h, past WHISKYPAY_PARK_MAX_MS "
        f"({limit_ms} ms); re-drive it with `whiskypay retry` once the merchant is back"
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Breaker:
    """One merchant's breaker as stored in Redis, and how many of its callbacks are parked.

    Parameters:
      merchant: The merchant (its breaker name: the merchant_id, else `host=<normalised callback host>`).
      state: "open" or "closed".
      failures: Consecutive outage failures counted.
      parked: Callbacks parked now.
      since_ms: When it opened (unix ms), None while closed.
      last_error: The last failure's text ("HttpStatusError: HTTP 503 from host"), if any.
      next_probe_at_ms: When the next probe may go (unix ms), None while closed or held.
      held: Opened by an operator (`whiskypay breaker open`): parked and never probed until closed by hand.
      host: The callback host of the last failure or park.
      queue: The queue its callbacks come from (they go back there).
    """

    merchant: str
    state: State
    failures: int
    parked: int
    since_ms: int | None
    last_error: str | None
    next_probe_at_ms: int | None
    held: bool
    host: str | None
    queue: str | None

    @classmethod
    def of(cls, merchant: str, fields: Mapping[str, str], *, parked: int) -> Breaker:
        """Build a Breaker from its hash fields (text) and its parked count."""
        state: State = "open" if fields.get("state") == "open" else "closed"
        held = fields.get("held") == "1"
        return cls(
            merchant=merchant,
            state=state,
            failures=_int(fields.get("failures")) or 0,
            parked=parked,
            since_ms=_int(fields.get("since")) if state == "open" else None,
            last_error=fields.get("last_error") or None,
            next_probe_at_ms=_int(fields.get("next_probe_at")) if state == "open" and not held else None,
            held=held,
            host=fields.get("host") or None,
            queue=fields.get("queue") or None,
        )

    @property
    def listed(self) -> bool:
        """Shown by `whiskypay merchants`: not closed, or callbacks parked."""
        return self.state != "closed" or self.parked > 0

    def summary(self) -> dict[str, Any]:
        """Return the `whiskypay merchants --json` fields."""
        return {
            "merchant": self.merchant,
            "state": self.state,
            "parked": self.parked,
            "failures": self.failures,
            "since": iso_ms(self.since_ms),
            "last_error": self.last_error,
            "next_probe_at": iso_ms(self.next_probe_at_ms),
            "held": self.held,
            "host": self.host,
        }


def open_longer_than(breakers: list[Breaker], *, now_ms: int, limit_ms: int) -> list[Breaker]:
    """Return the breakers open longer than limit_ms (held ones included), longest first."""
    found = [b for b in breakers if b.state == "open" and b.since_ms is not None and now_ms - b.since_ms > limit_ms]
    return sorted(found, key=lambda b: b.since_ms or 0)
