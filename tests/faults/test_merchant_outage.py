"""Fault: a merchant answering 503 for a while, with its breaker out of the way (see test_merchant_breaker.py for
the breaker): shorter than the retry schedule, each webhook is accepted once; longer, they are dead-lettered (one
Sentry event each) and `whiskypay retry` re-drives them under the same ids."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

from tests.faults.common import Report, StartWorkers, assert_no_leaks, exactly, run_cli, send_callbacks, sentry_env
from tests.helpers import FakeSentry, dead_letters, wait_until
from whiskypay.devstack import HttpReceiver, Received, Response

pytestmark = pytest.mark.e2e

#: These tests are about the retry schedule alone (test_merchant_breaker.py is about breakers): 50 callbacks
#: failing in a row would trip the merchant's breaker at 10 and park the rest, so the threshold is above their
#: 250 attempts.
NO_BREAKER = {"WHISKYPAY_BREAKER_FAILURES": "1000"}


class Outage:
    """A receiver handler that answers 503 until the outage ends, then 200, recording each answer.

    Parameters:
      length_s: How long the outage lasts after the first request, in seconds (None: until `end()`).
    """

    def __init__(self, length_s: float | None) -> None:
        self.length_s = length_s
        self.lock = threading.Lock()
        self.first_at: float | None = None
        self.ended = threading.Event()
        self.answers: list[tuple[str, int]] = []

    def end(self) -> None:
        """End the outage now."""
        self.ended.set()

    def __call__(self, request: Received) -> Response:
        with self.lock:
            if self.first_at is None:
                self.first_at = request.at
            down = not self.ended.is_set() and (self.length_s is None or request.at < self.first_at + self.length_s)
            status = 503 if down else 200
            self.answers.append((request.headers.get("webhook-id", "?"), status))
        return Response(status=status)

    def accepted(self) -> Counter[str]:
        """Count the 200 answers per webhook-id."""
        with self.lock:
            return Counter(webhook_id for webhook_id, status in self.answers if status == 200)


def test_a_merchant_outage_shorter_than_the_schedule_delivers_everything_exactly_once(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    sentry: FakeSentry,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given a merchant down for 2 s, and 5 attempts 300, 600, 1200, 2400 ms apart (4.5 s in all)
    outage = Outage(length_s=2.0)
    receiver.set_handler("/hook", outage)
    worker = start_workers(
        env={**env, **sentry_env(sentry), "WHISKYPAY_CALLBACK_ATTEMPTS": "5", "WHISKYPAY_CALLBACK_BACKOFF_MS": "300",
             **NO_BREAKER},
        threads=4,
    )
    # When 50 payments are sent
    expected = set(send_callbacks(receiver.url("/hook"), 50))
    # Then each webhook-id is accepted exactly once after the merchant is back, and nothing is dead-lettered
    wait_until(lambda: set(outage.accepted()) >= expected, timeout_s=30, what="50 accepted webhooks")
    time.sleep(0.5)  # a late duplicate would show up now
    accepted = outage.accepted()
    assert set(accepted) == expected and set(accepted.values()) == {1}
    assert dead_letters(redis_client, "callbackQueue") == []
    assert sentry.events() == []
    hits = receiver.requests("/hook")
    assert_no_leaks(
        [worker.log().encode(), *sentry.bodies()], signatures=[hit.headers["webhook-signature"] for hit in hits]
    )
    assert outage.first_at is not None
    back_s = max(hit.at for hit in hits) - (outage.first_at + 2.0)
    report(
        f"merchant outage 2 s < schedule 4.5 s: 50/50 accepted exactly once after {len(hits)} requests "
        f"({len(hits) - 50} failed attempts), last delivery {back_s:.1f} s after the merchant came back"
    )


def test_a_merchant_outage_longer_than_the_schedule_dead_letters_and_retry_redelivers_with_the_same_ids(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    sentry: FakeSentry,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given a merchant that stays down past 3 attempts 100 and 200 ms apart
    outage = Outage(length_s=None)
    receiver.set_handler("/hook", outage)
    worker = start_workers(
        env={**env, **sentry_env(sentry), "WHISKYPAY_CALLBACK_ATTEMPTS": "3", "WHISKYPAY_CALLBACK_BACKOFF_MS": "100",
             **NO_BREAKER},
        threads=4,
    )
    # When 50 payments are sent, they are all dead-lettered with their reason and one Sentry event each
    expected = set(send_callbacks(receiver.url("/hook"), 50))
    letters = wait_until(
        lambda: exactly(dead_letters(redis_client, "callbackQueue"), 50), timeout_s=30, what="50 dead letters"
    )
    assert letters is not None
    assert {letter["options"]["webhook_id"] for letter in letters} == expected
    assert {letter["options"]["traceback"] for letter in letters} == {"HttpStatusError: HTTP 503 from 127.0.0.1"}
    assert all(letter["options"]["attempts"] == 3 and letter["options"]["retries"] == 3 for letter in letters)
    wait_until(lambda: len(sentry.events()) >= 50, timeout_s=15, what="50 Sentry events")
    # And once the merchant is back, `whiskypay retry --all` delivers each exactly once, under the same webhook-id
    outage.end()
    status, out = run_cli("retry", "--queue", "callbackQueue", "--all")
    assert status == 0, out
    assert "Re-drove 50 dead letter(s) onto callbackQueue." in out
    wait_until(lambda: set(outage.accepted()) >= expected, timeout_s=20, what="50 re-driven webhooks")
    time.sleep(0.5)
    accepted = outage.accepted()
    assert set(accepted) == expected and set(accepted.values()) == {1}
    assert dead_letters(redis_client, "callbackQueue") == []
    events = sentry.events()
    assert len(events) == 50
    assert sorted(event["tags"]["webhook_id"] for event in events) == sorted(expected)
    hits = receiver.requests("/hook")
    assert_no_leaks(
        [worker.log().encode(), *sentry.bodies()], signatures=[hit.headers["webhook-signature"] for hit in hits]
    )
    report(
        f"merchant outage > schedule: 50/50 dead-lettered (50 Sentry events), re-driven, 50/50 accepted once "
        f"with the same webhook-ids; {len(hits)} requests in all"
    )
