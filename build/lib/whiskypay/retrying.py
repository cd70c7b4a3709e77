"""Retry policies, pure: how long to wait before each retry of a queue's messages, and Retry-After parsing."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable
from dataclasses import dataclass

from settings import MAX_DELAY_MS, Settings, parse_schedule_ms
from whiskypay.queues import Queue


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


def policies_from_settings(settings: Settings) -> dict[str, RetryPolicy]:
    """Build the per-queue policies from the WHISKYPAY_CALLBACK_* and WHISKYPAY_EMAIL_* settings."""
    s = settings
    return {
        Queue.CALLBACKS: RetryPolicy(
            attempts=s.callback_attempts,
            backoff_ms=s.callback_backoff_ms,
            max_backoff_ms=s.callback_max_backoff_ms,
            jitter=s.callback_jitter,
            schedule=parse_schedule_ms(s.callback_schedule),
        ),
        Queue.EMAIL: RetryPolicy(
            attempts=s.email_attempts,
            backoff_ms=s.email_backoff_ms,
            max_backoff_ms=s.email_max_backoff_ms,
            jitter=s.email_jitter,
            schedule=parse_schedule_ms(s.email_schedule),
        ),
    }


def parse_retry_after_ms(value: str | None, *, now: float) -> int | None:
    """Return the wait a Retry-After header asks for, in milliseconds, or None if absent or unreadable.

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
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, int((when.timestamp() - now) * 1000))
