"""Tier 1: retry waits per queue policy, and Retry-After parsing."""

from __future__ import annotations

import email.utils
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from settings import Settings
from whiskypay.queues import Queue
from whiskypay.retrying import MAX_DELAY_MS, RetryPolicy, parse_retry_after_ms, parse_schedule_ms

NOW = 1_790_000_000.0


def never_random() -> float:
    return 0.0


def almost_one() -> float:
    return 0.999


@pytest.mark.parametrize(("retries_done", "expected_ms"), [(0, 5_000), (1, 10_000), (2, 20_000), (3, 40_000)])
def test_exponential_waits_double_exactly_from_the_backoff(retries_done: int, expected_ms: int) -> None:
    # Given the callback queue's default policy: 5 attempts, 5 s backoff, no jitter
    policy = RetryPolicy(attempts=5, backoff_ms=5_000)
    # When the wait before the next retry is computed, then it is exactly 5, 10, 20, 40 s
    assert policy.delay_ms(retries_done, rand=never_random) == expected_ms


def test_five_attempts_mean_four_retries() -> None:
    # Given attempts counted BullMQ-style (the first try included), then four retries follow it
    assert RetryPolicy(attempts=5, backoff_ms=5_000).max_retries == 4
    assert RetryPolicy(attempts=1, backoff_ms=5_000).max_retries == 0


@pytest.mark.parametrize(("retries_done", "expected_ms"), [(0, 5_000), (1, 10_000), (2, 15_000), (10, 15_000)])
def test_each_wait_is_capped_by_max_backoff(retries_done: int, expected_ms: int) -> None:
    # Given a 15 s cap
    policy = RetryPolicy(attempts=20, backoff_ms=5_000, max_backoff_ms=15_000)
    # When computed, then no wait exceeds the cap
    assert policy.delay_ms(retries_done, rand=never_random) == expected_ms


@pytest.mark.parametrize("retries_done", [30, 40, 41, 1_000, 10**9])
def test_waits_never_exceed_dramatiqs_seven_day_limit_even_after_many_retries(retries_done: int) -> None:
    # Given an uncapped policy and a very high retry count
    policy = RetryPolicy(attempts=10**9, backoff_ms=5_000, max_backoff_ms=10**15)
    # When computed, then the wait is clamped to 7 days (and computing it does not blow up)
    assert policy.delay_ms(retries_done, rand=never_random) == MAX_DELAY_MS


SCHEDULE = "5s,5m,30m,2h,5h,10h,14h,20h,24h"


def test_a_nine_step_schedule_means_nine_retries_whatever_attempts_says() -> None:
    # Given the BullMQ-era schedule
    policy = RetryPolicy(attempts=2, backoff_ms=1, schedule=parse_schedule_ms(SCHEDULE))
    # Then there are nine retries
    assert policy.max_retries == 9


@pytest.mark.parametrize(
    ("retries_done", "expected_ms"),
    [
        (0, 5_000),
        (1, 300_000),
        (2, 1_800_000),
        (3, 7_200_000),
        (4, 18_000_000),
        (5, 36_000_000),
        (6, 50_400_000),
        (7, 72_000_000),
        (8, 86_400_000),
        (9, 86_400_000),
    ],
)
def test_a_schedule_gives_each_retry_its_listed_wait_and_repeats_the_last(retries_done: int, expected_ms: int) -> None:
    # Given the schedule policy
    policy = RetryPolicy(attempts=5, backoff_ms=5_000, schedule=parse_schedule_ms(SCHEDULE))
    # When computed, then the listed wait is used
    assert policy.delay_ms(retries_done, rand=never_random) == expected_ms


def test_a_schedule_is_still_capped_by_max_backoff() -> None:
    # Given a schedule with a step above the cap
    policy = RetryPolicy(attempts=5, backoff_ms=1, max_backoff_ms=60_000, schedule=(1_000, 3_600_000))
    # Then the long step is capped
    assert policy.delay_ms(1, rand=never_random) == 60_000


@pytest.mark.parametrize(
    ("jitter", "rand", "expected_ms"),
    [
        (0.0, almost_one, 10_000),
        (0.5, never_random, 10_000),
        (0.5, almost_one, 5_005),
        (1.0, never_random, 10_000),
        (1.0, almost_one, 10),
    ],
)
def test_jitter_only_shortens_the_wait_by_up_to_its_fraction(jitter: float, rand: object, expected_ms: int) -> None:
    # Given a 10 s wait and a jitter fraction
    policy = RetryPolicy(attempts=3, backoff_ms=10_000, jitter=jitter)
    # When computed with the extreme random draws
    wait = policy.delay_ms(0, rand=rand)  # type: ignore[arg-type]
    # Then the wait is the expected fraction (to the truncated millisecond), never above the base
    assert wait == pytest.approx(expected_ms, abs=1)
    assert 10_000 * (1 - jitter) - 1 <= wait <= 10_000


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No WHISKYPAY_* variables and no .env file: Settings sees only what the test passes."""
    for name in list(os.environ):
        if name.startswith("WHISKYPAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("clean_env")
def test_the_settings_hold_one_policy_per_queue() -> None:
    # Given settings with a callback schedule and exponential email retries
    settings = Settings(
        callback_schedule="5s,1m",
        callback_attempts=7,
        callback_jitter=0.25,
        email_attempts=4,
        email_backoff_ms=2_000,
        email_max_backoff_ms=30_000,
    )
    # When the policies are read
    policies = settings.retry_policies
    # Then each queue's policy carries its own settings
    assert set(policies) == {Queue.CALLBACKS, Queue.EMAIL}
    assert policies["callbackQueue"].schedule == (5_000, 60_000)
    assert policies["callbackQueue"].max_retries == 2
    assert policies["callbackQueue"].jitter == 0.25
    assert policies["emailQueue"] == RetryPolicy(attempts=4, backoff_ms=2_000, max_backoff_ms=30_000)
    assert policies["emailQueue"].max_retries == 3


@pytest.mark.parametrize(
    ("header", "expected_ms"),
    [
        ("7", 7_000),
        ("0", 0),
        ("120", 120_000),
        (" 30 ", 30_000),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after_in_seconds_or_garbage(header: str | None, expected_ms: int | None) -> None:
    # Given a Retry-After header value, when parsed, then seconds become ms and garbage becomes None
    assert parse_retry_after_ms(header, now=NOW) == expected_ms


def test_retry_after_as_a_future_http_date_is_the_time_until_then() -> None:
    # Given an HTTP date 90 s after now
    header = email.utils.formatdate(NOW + 90, usegmt=True)
    # When parsed, then the wait is 90 s
    assert parse_retry_after_ms(header, now=NOW) == 90_000


def test_retry_after_as_a_past_http_date_means_no_wait() -> None:
    # Given an HTTP date an hour ago
    header = email.utils.formatdate(NOW - 3_600, usegmt=True)
    # When parsed, then the wait is zero, never negative
    assert parse_retry_after_ms(header, now=NOW) == 0


@pytest.mark.parametrize("header", ["²", "9" * 5_000], ids=["superscript-two", "5000-digits"])
def test_a_retry_after_that_only_looks_numeric_is_garbage_not_a_crash(header: str) -> None:
    # Given a Retry-After a merchant's server could send (latin-1 '²', or an absurdly long number)
    # When parsed, then it is treated as unreadable
    assert parse_retry_after_ms(header, now=NOW) is None


@pytest.mark.parametrize(
    "header",
    ["Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "Mon, 01 Jan 2026 99999999999999999999:00:00 GMT",
     "Fri, 31 Dec 99999 23:59:59 GMT", "Mon, 01 Jan 2026 00:00:00 +99999999", "Mon, 01 Jan 2026 00:00:00"],
    ids=["20-digit-year", "20-digit-hour", "5-digit-year", "absurd-offset", "no-zone"],
)
def test_a_retry_after_with_an_absurd_date_is_ignored_not_a_crash(header: str) -> None:
    # Given a Retry-After date no calendar holds (today's main raised OverflowError for the first two)
    # When parsed, then it is unreadable: the queue's own backoff applies
    assert parse_retry_after_ms(header, now=NOW) is None


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.from_regex(
    r"(Mon|Tue), [0-9]{1,25} (Jan|Feb) [0-9]{1,25} [0-9]{1,25}:[0-9]{1,5}:[0-9]{1,5} (GMT|[+-][0-9]{1,10})",
    fullmatch=True)))
def test_parse_retry_after_never_raises(header: str) -> None:
    result = parse_retry_after_ms(header, now=NOW)
    assert result is None or result >= 0
