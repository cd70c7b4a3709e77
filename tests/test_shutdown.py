"""Graceful shutdown under load: SIGTERM lets in-flight deliveries finish, hands prefetched ones back, loses nothing."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
import redis

from tests.helpers import wait_until
from whiskypay.devstack import HttpReceiver, Response

pytestmark = pytest.mark.e2e

NS = "whiskypay"


def send_callbacks(receiver: HttpReceiver, count: int) -> list[str]:
    """Send count callbacks with event ids evt_0..; return the ids (each is its webhook-id header)."""
    from actors import send_callback

    ids = [f"evt_shutdown_{i}" for i in range(count)]
    for event_id in ids:
        send_callback.send(
            callback_url=receiver.url("/hook"), email="buyer@example.com", plan="pro", price=1.0, event_id=event_id
        )
    return ids


def unacked(client: redis.Redis) -> int:
    """Return how many fetched messages no worker has acked (they would wait for maintenance to come back)."""
    return sum(int(client.scard(key)) for key in client.scan_iter(f"{NS}:__acks__.*"))


def test_sigterm_finishes_in_flight_deliveries_and_a_new_worker_delivers_the_rest_once(
    redis_client, receiver: HttpReceiver, start_workers, worker_env
):
    # Given a merchant answering after 0.5 s, 40 callbacks, and one worker process with 4 threads
    receiver.respond("/hook", Response(200, delay_s=0.5))
    ids = send_callbacks(receiver, 40)
    env = {**worker_env, "dramatiq_worker_timeout": "100"}
    bound_s = 10.0
    worker = start_workers("--worker-shutdown-timeout", str(int(bound_s * 1000)), env=env, processes=1, threads=4)
    # When the master gets SIGTERM while deliveries are in flight (the first few have arrived)
    receiver.wait_for(3)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    at_signal = len(receiver.requests())
    # Then it exits cleanly within the bound
    wait_until(lambda: worker.returncode is not None, timeout_s=bound_s + 5, what="the worker to exit")
    took_s = time.monotonic() - stopped_at
    assert worker.returncode == 0, worker.log()
    assert took_s < bound_s
    # And every delivery that reached the merchant was finished and acked, the rest are back in the queue
    first = [r.headers["webhook-id"] for r in receiver.requests()]
    assert len(first) >= at_signal >= 3
    assert unacked(redis_client) == 0
    assert redis_client.llen(f"{NS}:callbackQueue") == 40 - len(set(first))
    assert redis_client.hlen(f"{NS}:callbackQueue.msgs") == 40 - len(set(first))
    # When a new worker starts, every callback is delivered, none twice
    start_workers(env=env, processes=1, threads=4)
    wait_until(lambda: {r.headers["webhook-id"] for r in receiver.requests()} >= set(ids), timeout_s=30,
               what="all 40 callbacks")
    time.sleep(0.7)  # one more response time, for a stray duplicate to show
    seen = Counter(r.headers["webhook-id"] for r in receiver.requests())
    duplicates = sum(n - 1 for n in seen.values())
    print(f"first worker delivered {len(first)} (in flight at SIGTERM: {at_signal}), exited in {took_s:.2f} s; "
          f"duplicates: {duplicates}")
    assert set(seen) == set(ids)
    assert duplicates == 0, seen.most_common(3)
    assert redis_client.hlen(f"{NS}:callbackQueue.msgs") == 0


def test_a_delivery_outlasting_the_shutdown_timeout_is_cut_off_but_kept_in_redis(
    redis_client, receiver: HttpReceiver, start_workers, worker_env
):
    # Given a merchant that hangs for 8 s, within the read timeout, and a 1 s shutdown timeout
    receiver.respond("/hook", Response(200, delay_s=8))
    env = {**worker_env, "dramatiq_worker_timeout": "100", "WHISKYPAY_WEBHOOK_READ_TIMEOUT_S": "20"}
    worker = start_workers("--worker-shutdown-timeout", "1000", env=env, processes=1, threads=1)
    send_callbacks(receiver, 1)
    receiver.wait_for(1)
    # When the master gets SIGTERM mid-delivery
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    # Then it exits after about the timeout, not the merchant's 8 s
    wait_until(lambda: worker.returncode is not None, timeout_s=10, what="the worker to exit")
    assert time.monotonic() - stopped_at < 4
    # And the message is not lost: it is still stored, unacked, for maintenance to requeue
    assert redis_client.hlen(f"{NS}:callbackQueue.msgs") == 1
    assert unacked(redis_client) == 1
