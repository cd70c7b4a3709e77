"""Fault: a merchant hanging past the read timeout next to a fast one: the slow host gets at most two threads and
the fast one keeps flowing."""

from __future__ import annotations

import statistics
import time

import pytest
import redis

from tests.faults.common import Report, StartWorkers, send_callbacks
from whiskypay.devstack import HttpReceiver, Response

pytestmark = pytest.mark.e2e


def max_concurrency(starts: list[float], length_s: float, *, since: float = float("-inf")) -> int:
    """Return the most intervals [start, start + length_s) open at once, at or after `since`."""
    points = sorted(
        [(max(start, since), 1) for start in starts if start + length_s > since]
        + [(start + length_s, -1) for start in starts if start + length_s > since]
    )
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


def test_a_slow_merchant_gets_at_most_two_threads_and_the_fast_one_keeps_flowing(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
    request: pytest.FixtureRequest,
) -> None:
    read_timeout_s = 3.0
    threads = 8
    # Given a merchant server (127.0.0.2) that hangs past the read timeout and another (127.0.0.1) that answers
    slow = HttpReceiver(host="127.0.0.2").start()
    request.addfinalizer(slow.stop)
    slow.respond("/slow", Response(status=200, delay_s=10))
    receiver.respond("/fast", Response(status=200))
    # The slow server's timeouts would trip its merchant's breaker after 10 (parking the rest): this test measures
    # the slow-host cap alone, so its breaker threshold is above the 40 slow callbacks' attempts.
    start_workers(env={**env, "WHISKYPAY_WEBHOOK_READ_TIMEOUT_S": str(read_timeout_s),
                       "WHISKYPAY_BREAKER_FAILURES": "1000"}, threads=threads)
    slow_url = slow.url("/slow")
    # When 40 callbacks to the slow merchant are queued first and hold every thread
    send_callbacks(slow_url, 40)
    slow.wait_for(threads, path="/slow", timeout_s=15)
    saturated_at = time.monotonic()
    # And 10 fast callbacks come in while they hang, and 10 more once the slow host is capped
    first_wave = send_callbacks(receiver.url("/fast"), 10)
    receiver.wait_for(10, path="/fast", timeout_s=read_timeout_s + 10)
    time.sleep(max(0.0, saturated_at + read_timeout_s + 1.5 - time.monotonic()))
    second_wave = send_callbacks(receiver.url("/fast"), 10)
    receiver.wait_for(20, path="/fast", timeout_s=read_timeout_s + 10)
    time.sleep(0.3)
    # Then every fast callback arrived within one read timeout + 2 s of being sent, each once
    arrived = {hit.headers["webhook-id"]: hit.at for hit in receiver.requests("/fast")}
    assert len(receiver.requests("/fast")) == 20 and set(arrived) == set(first_wave) | set(second_wave)
    first = [arrived[webhook_id] - sent for webhook_id, sent in first_wave.items()]
    second = [arrived[webhook_id] - sent for webhook_id, sent in second_wave.items()]
    assert max(first + second) <= read_timeout_s + 2, (first, second)
    assert max(second) <= 2.0, second  # with the slow host capped, 6 threads are free for the fast one
    # And the slow host never had more requests in flight than there are threads, and at most 2 once capped
    slow_starts = [hit.at for hit in slow.requests("/slow")]
    in_flight = read_timeout_s - 0.05  # the client gives up at read_timeout_s after sending
    first_window = max_concurrency([s for s in slow_starts if s < slow_starts[0] + read_timeout_s], in_flight)
    settled = max_concurrency(slow_starts, in_flight, since=slow_starts[0] + read_timeout_s + 0.5)
    assert first_window <= threads
    assert settled <= 2, f"{settled} slow requests in flight at once after the cap took effect"
    report(
        f"slow merchant: fast latency wave 1 (slow host saturating {threads} threads) p50 "
        f"{statistics.median(first):.2f} s max {max(first):.2f} s; wave 2 (slow host capped) p50 "
        f"{statistics.median(second):.2f} s max {max(second):.2f} s; slow host in flight: first window "
        f"{first_window}, after the cap {settled} (cap 2); slow requests {len(slow_starts)}"
    )
