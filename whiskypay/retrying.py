"""Retry policies, pure: how long to wait before each retry of a queue's messages; durations, schedules and
Retry-After parsed into milliseconds."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from whiskypay.queues import Queue

#: The longest delay Dramatiq accepts for a message, in milliseconds (7 days).
#: Backoffs, schedules and Retry-After waits above it are rejected at start or clamped.
MAX_DELAY_MS = 7 * 24 * 60 * 60 * 1000

_DURATION = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,6})?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """Parse "500ms", "5s", "5m", "2h", "1d" or a bare number of milliseconds into milliseconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; write it like 500ms, 5s, 5m, 2h or 1d")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2) or "ms"])


def parse_schedule_ms(text: str) -> tuple[int, ...]:
    """Parse a comma-separated retry schedule ("5s,5m,30m") into waits in milliseconds."""
    waits = tuple(parse_duration_ms(part) for part in text.split(",") if part.strip())
    for wait in waits:
        if wait > MAX_DELAY_MS:
            raise ValueError(f"a wait of {wait} ms exceeds {MAX_DELAY_MS} ms (7 days), the longest Dramatiq allows")
    return waits


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry one queue's messages.

    Parameters:
      attempts: Total tries including the first (BullMQ's meaning); ignored when schedule is set.
      backoff_ms: The first wait; each later wait doubles it (exponential), in milliseconds.
      max_backoff_ms: The cap on any single wait, in milliseconds.
      jitter: 0 for exact waits; j in (0, 1] shortens each wait by a random fraction of up to j.
      schedule: Explicit waits in milliseconds, one per retry; replaces the formula and sets attempts.
    """

    attempts: int
    backoff_ms: int
    max_backoff_ms: int = MAX_DELAY_MS
    jitter: float = 0.0
    schedule: tuple[int, ...] = ()

    @property
    def max_retries(self) -> int:
        """How many retries follow the first attempt."""
        return len(self.schedule) if self.schedule else self.attempts - 1

    def delay_ms(self, retries_done: int, *, rand: Callable[[], float]) -> int:
        """Return the wait before retry number retries_done + 1, in milliseconds.

        Parameters:
          retries_done: Retries already made (0 before the first retry).
          rand: A source of floats in [0, 1), for jitter.
        """
        if self.schedule:
            base = self.schedule[min(retries_done, len(self.schedule) - 1)]
        else:
            base = self.backoff_ms * 2 ** min(retries_done, 40)
        base = min(base, self.max_backoff_ms, MAX_DELAY_MS)
        return int(base * (1.0 - self.jitter * rand()))


#: The policies the Node/BullMQ service had, the defaults of WHISKYPAY_CALLBACK_* and WHISKYPAY_EMAIL_*:
#: 5 tries from 5 s for webhooks, 3 tries from 10 s for emails, exponential.
DEFAULT_POLICIES: Mapping[str, RetryPolicy] = MappingProxyType({
    Queue.CALLBACKS: RetryPolicy(attempts=5, backoff_ms=5_000),
    Queue.EMAIL: RetryPolicy(attempts=3, backoff_ms=10_000),
})


def attempts_made(options: Mapping[str, Any]) -> int:
    """Return how many attempts a processed message had, from its options (what operators are shown).

    QueueRetryPolicy writes `attempts` on every failed attempt. A message failed before it did (a dead letter
    stored by an earlier version) has only `retries`, which then counted the retries after the first attempt
    and never the final failure: its attempts are retries + 1. (Dramatiq's own count, which QueueRetryPolicy now
    keeps in `retries`, adds the final failure too: retries = attempts once retries ran out.)
    """
    attempts = options.get("attempts")
    if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 1:
        return attempts
    retries = options.get("retries", 0)
    return (retries if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0 else 0) + 1


def parse_retry_after_ms(value: str | None, *, now: float) -> int | None:
    """Return the wait a Retry-After header asks for, in milliseconds, or None if absent or unreadable.

    Never raises: an absurd date (a year of 20 digits, an out-of-range offset) is unreadable, so the queue's
    own backoff applies. A far but valid date is returned as is; QueueRetryPolicy caps the wait.

    Parameters:
      value: The header: delta-seconds ("120") or an HTTP date.
      now: The current time, in unix seconds.
    """
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return int(value) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        return max(0, int((when.timestamp() - now) * 1000))
    except (TypeError, ValueError, OverflowError, IndexError, AttributeError):
        # parsedate_to_datetime raises OverflowError for a huge year or hour ("Python int too large")
        return None
