"""Fault: a worker killed with SIGKILL halfway through 1,000 callbacks loses nothing; its messages come back
within the heartbeat + maintenance bound."""

from __future__ import annotations

import json
import time
from typing import cast

import pytest
import redis

from tests.faults.common import (
    DEFAULT_HEARTBEAT_MS,
    DEFAULT_MAINTENANCE_MS,
    HEARTBEAT_MS,
    MAINTENANCE_MS,
    Report,
    StartWorkers,
    assert_no_leaks,
    send_callbacks,
    start_all,
    text,
    webhook_ids,
)
from tests.helpers import dead_letters, wait_until
from whiskypay.devstack import HttpReceiver, Response

pytestmark = pytest.mark.e2e


def heartbeats(client: redis.Redis) -> dict[str, float]:
    """Return each broker id's last heartbeat (Redis time, ms)."""
    pairs = cast(list[tuple[bytes, float]], client.zrange("whiskypay:__heartbeats__", 0, -1, withscores=True))
    return {text(member): score for member, score in pairs}


def silent_broker_holdings(client: redis.Redis, beats_before: dict[str, float]) -> list[tuple[str, set[str]]]:
    """Return (broker id, webhook-ids it holds unacknowledged) of each callback worker silent since beats_before."""
    beats_now = heartbeats(client)
    silent = []
    for key in client.scan_iter(match="whiskypay:__acks__.*.callbackQueue"):
        broker_id = text(key).removeprefix("whiskypay:__acks__.").removesuffix(".callbackQueue")
        if broker_id not in beats_before or beats_now.get(broker_id) != beats_before[broker_id]:
            continue  # alive: it has talked to Redis since
        held = set()
        for redis_id in cast(set[bytes], client.smembers(key)):
            raw = cast(bytes | None, client.hget("whiskypay:callbackQueue.msgs", redis_id))
            if raw is not None:
                held.add(str(json.loads(raw)["options"]["webhook_id"]))
        silent.append((broker_id, held))
    return silent


def test_a_sigkilled_worker_loses_nothing_and_its_messages_come_back_within_the_heartbeat_bound(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given 1,000 callbacks, a merchant answering 200 after 5 ms, and two separate worker masters
    total = 1_000
    receiver.respond("/hook", Response(status=200, delay_s=0.005))
    expected = set(send_callbacks(receiver.url("/hook"), total))
    victim, survivor = start_all(start_workers, 2, env=env, processes=1, threads=4)
    # When one master's whole process group is SIGKILLed halfway through
    receiver.wait_for(total // 2, timeout_s=60)
    victim.kill()
    killed_at = time.monotonic()
    delivered_at_kill = len(receiver.requests())
    # (the dead worker is the one whose heartbeat stops: live ones poll Redis every 100 ms)
    beats_at_kill = heartbeats(redis_client)
    time.sleep(1.5)  # less than the heartbeat timeout: its messages are still held
    dead = silent_broker_holdings(redis_client, beats_at_kill)
    assert len(dead) == 1, f"expected one silent worker holding messages, found {dead}"
    held = dead[0][1]
    replacement = start_workers(env=env, processes=1, threads=4)
    # Then every callback arrives at least once, within the heartbeat + maintenance bound after the kill
    bound_s = (HEARTBEAT_MS + MAINTENANCE_MS) / 1000 + 5
    def everything_arrived_and_the_held_ones_again() -> bool:
        hits = receiver.requests()
        redelivered = {hit.headers["webhook-id"] for hit in hits if hit.at >= killed_at}
        return set(webhook_ids(hits)) >= expected and redelivered >= held

    wait_until(
        everything_arrived_and_the_held_ones_again,
        timeout_s=bound_s + 30,
        what="all 1,000 webhook-ids, and every message the killed worker held once more",
    )
    all_done_s = time.monotonic() - killed_at
    hits = receiver.requests()
    counts = webhook_ids(hits)
    assert set(counts) == expected
    duplicates = {webhook_id: n for webhook_id, n in counts.items() if n > 1}
    # A duplicate can only be a message the killed worker held (sent, not acknowledged): same id, same body
    assert set(duplicates) <= held, set(duplicates) - held
    for webhook_id in duplicates:
        assert len({hit.body for hit in hits if hit.headers["webhook-id"] == webhook_id}) == 1
    # Every message the dead worker held is delivered again after the kill; the last of them sets the figure
    assert held, "the killed worker held no message: the kill proved nothing"
    after_kill = [hit for hit in hits if hit.at >= killed_at and hit.headers["webhook-id"] in held]
    assert {hit.headers["webhook-id"] for hit in after_kill} == held
    redelivery_s = max(hit.at for hit in after_kill) - killed_at
    assert redelivery_s <= bound_s, f"redelivered {redelivery_s:.1f} s after the kill, bound {bound_s:.1f} s"
    assert survivor.running() and replacement.running()
    assert dead_letters(redis_client, "callbackQueue") == []
    assert_no_leaks(
        [worker.log().encode() for worker in (victim, survivor, replacement)],
        signatures=[hit.headers["webhook-signature"] for hit in hits[:50]],
    )
    default_bound_s = (DEFAULT_HEARTBEAT_MS + DEFAULT_MAINTENANCE_MS) / 1000 + 1
    report(
        f"SIGKILL: {total} callbacks, killed at {delivered_at_kill} delivered; dead worker held {len(held)}; "
        f"duplicates {len(duplicates)} (total requests {len(hits)}); redelivery {redelivery_s:.1f} s after the kill "
        f"(bound {bound_s:.0f} s = heartbeat {HEARTBEAT_MS / 1000:.0f} s + interval {MAINTENANCE_MS / 1000:.0f} s "
        f"+ 5 s); all delivered {all_done_s:.1f} s after the kill; with defaults the bound is "
        f"{DEFAULT_HEARTBEAT_MS // 1000} + {DEFAULT_MAINTENANCE_MS // 1000} + ~1 = {default_bound_s:.0f} s (<= 90 s)"
    )
