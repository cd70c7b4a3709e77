"""Fault: Redis restarted (append-only file on) under load: no callback is lost and the workers carry on."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import redis

from tests.faults.common import Report, StartWorkers, assert_no_leaks, produce, webhook_ids
from tests.helpers import wait_until
from whiskypay.devstack import HttpReceiver, RedisServer, Response

pytestmark = pytest.mark.e2e


def test_a_redis_restart_mid_run_loses_no_callback_and_the_workers_carry_on(
    private_redis: RedisServer,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    tmp_path: Path,
    report: Report,
) -> None:
    # Given a worker and a producer on a Redis of the test's own, with the append-only file on
    renv = {**env, "WHISKYPAY_REDIS_URL": private_redis.url, "WHISKYPAY_REDIS_TIMEOUT_S": "2"}
    receiver.respond("/hook", Response(status=200, delay_s=0.01))
    worker = start_workers(env=renv, processes=1, threads=4)
    expected = set(produce(tmp_path, renv, receiver.url("/hook"), 300))
    # When Redis restarts after about 100 deliveries
    receiver.wait_for(100, timeout_s=60)
    restart_started = time.monotonic()
    private_redis.restart()
    restart_s = time.monotonic() - restart_started
    # Then all 300 arrive at least once
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= expected, timeout_s=60, what="all 300 webhook-ids")
    hits = receiver.requests()
    counts = webhook_ids(hits)
    assert set(counts) == expected
    times = [hit.at for hit in hits]
    gap_s = max((later - earlier for earlier, later in itertools.pairwise(times)), default=0.0)
    # And the worker is alive and not hung: 10 more, sent after the restart, arrive within 15 s
    assert worker.running()
    sent_more = time.monotonic()
    more = set(produce(tmp_path, renv, receiver.url("/hook"), 10))
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= more, timeout_s=15, what="10 more after the restart")
    client = redis.Redis.from_url(private_redis.url)
    with client:
        assert client.zcard("whiskypay:callbackQueue.XQ") == 0
    assert_no_leaks([worker.log().encode()], signatures=[hit.headers["webhook-signature"] for hit in hits[:50]])
    report(
        f"Redis restart: 300 callbacks, restart took {restart_s:.1f} s, longest gap between deliveries "
        f"{gap_s:.1f} s, duplicates {sum(n - 1 for n in counts.values())}, 10 more delivered "
        f"{time.monotonic() - sent_more:.1f} s after starting their producer (its start-up included)"
    )
