"""Fault: Redis down for a few seconds while retries are pending or attempts fail: no retry is lost."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.common import Report, StartWorkers, produce
from tests.helpers import wait_until
from whiskypay.devstack import HttpReceiver, Received, RedisServer, Response

pytestmark = pytest.mark.e2e


class FirstAttemptFails:
    """A receiver handler that answers 503 to the first attempt of each webhook-id and 200 to the others."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.delay_s = delay_s

    def __call__(self, request: Received) -> Response:
        with self.lock:
            webhook_id = request.headers.get("webhook-id", "?")
            self.attempts[webhook_id] += 1
            first = self.attempts[webhook_id] == 1
        return Response(status=503, delay_s=self.delay_s) if first else Response(status=200)

    def delivered(self) -> set[str]:
        """Return the webhook-ids answered 200."""
        with self.lock:
            return {webhook_id for webhook_id, n in self.attempts.items() if n > 1}


def test_a_redis_outage_of_a_few_seconds_loses_no_scheduled_retry(
    private_redis: RedisServer,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    tmp_path: Path,
    report: Report,
) -> None:
    # Given 20 callbacks whose first attempt failed, their retries (due in 2 s) held in the worker's memory
    # 20 first attempts failing in a row would trip the merchant's breaker (10) and park the rest: this test is
    # about retries held through a Redis outage, so its threshold is above 20.
    renv = {**env, "WHISKYPAY_REDIS_URL": private_redis.url, "WHISKYPAY_CALLBACK_BACKOFF_MS": "2000",
            "WHISKYPAY_BREAKER_FAILURES": "100"}
    merchant = FirstAttemptFails()
    receiver.set_handler("/hook", merchant)
    start_workers(env=renv, threads=4)
    expected = set(produce(tmp_path, renv, receiver.url("/hook"), 20))
    receiver.wait_for(20, timeout_s=20)
    # When Redis crashes and is back 1.5 s later (append-only file: nothing is lost on the Redis side)
    private_redis.kill()
    time.sleep(1.5)  # the outage itself
    private_redis.start()
    back_at = time.monotonic()
    # Then every retry is still delivered, within backoff + consumer restart (3 s) + slack
    wait_until(lambda: merchant.delivered() >= expected, timeout_s=15, what="the 20 retries after the outage")
    report(
        f"Redis outage 1.5 s with 20 retries pending: all delivered {time.monotonic() - back_at:.1f} s after "
        "Redis was back"
    )


def test_an_attempt_that_fails_while_redis_is_down_is_still_retried(
    private_redis: RedisServer,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    tmp_path: Path,
    report: Report,
) -> None:
    # Given 10 first attempts that hang for 2 s and then fail
    # 10 failures in a row would trip the merchant's breaker if Redis counted them: this test is about retries.
    renv = {**env, "WHISKYPAY_REDIS_URL": private_redis.url, "WHISKYPAY_WEBHOOK_READ_TIMEOUT_S": "5",
            "WHISKYPAY_BREAKER_FAILURES": "100"}
    merchant = FirstAttemptFails(delay_s=2.0)
    receiver.set_handler("/hook", merchant)
    start_workers(env=renv, threads=10)
    expected = set(produce(tmp_path, renv, receiver.url("/hook"), 10))
    receiver.wait_for(1, timeout_s=20)
    # When Redis is down at the moment they fail (so their retries cannot be scheduled right away)
    private_redis.kill()
    time.sleep(3.0)
    private_redis.start()
    back_at = time.monotonic()
    # Then each retry waits for Redis instead of being dropped, and every callback is delivered
    wait_until(lambda: merchant.delivered() >= expected, timeout_s=20, what="the 10 retries after the outage")
    report(f"10 attempts failed during a 3 s Redis outage: all retried, delivered {time.monotonic() - back_at:.1f} s "
           "after Redis was back")
