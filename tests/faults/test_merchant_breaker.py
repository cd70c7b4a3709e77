"""Fault: a merchant down (503) trips its breaker; its callbacks are parked, probed, replayed oldest first, or given up.

Real `dramatiq actors` processes, a real receiver and Redis. Two merchants share the loopback receiver: the one down
is host 127.0.0.1, the healthy one host localhost (a merchant without merchant_id is its callback host).
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from typing import Any

import pytest
import redis

from tests.faults.common import BUYER, Report, StartWorkers, exactly, run_cli, sentry_env, start_all
from tests.faults.test_merchant_outage import Outage
from tests.helpers import FakeSentry, dead_letters, wait_until
from whiskypay.devstack import HttpReceiver, Response

pytestmark = pytest.mark.e2e

DOWN = "host=127.0.0.1"  # no merchant_id: its breaker is the callback host's (whiskypay merchants names it host=...)
HOST = "127.0.0.1"


def send(url: str, count: int) -> list[tuple[str, int, float]]:
    """Enqueue count callbacks to url; return (webhook-id, message_timestamp, monotonic send time) in send order."""
    from actors import send_callback

    sent = []
    for _ in range(count):
        at = time.monotonic()
        message = send_callback.send(callback_url=url, email=BUYER, plan="pro", price=19.99)
        sent.append((f"msg_{message.message_id}", message.message_timestamp, at))
    return sent


def merchants() -> dict[str, dict[str, Any]]:
    """Return `whiskypay merchants --json`, by merchant."""
    status, out = run_cli("merchants", "--json")
    assert status == 0, out
    return {row["merchant"]: row for row in json.loads(out)["merchants"]}


def parked(merchant: str = DOWN) -> int:
    return int(merchants().get(merchant, {}).get("parked", 0))


def webhook_state(webhook_id: str) -> str | None:
    """Return the delivery ledger's state of a webhook (`whiskypay event ID --json`)."""
    status, out = run_cli("event", webhook_id, "--json")
    assert status == 0, out
    webhook: dict[str, Any] = json.loads(out)["webhook"]
    return webhook["state"]


def latencies(receiver: HttpReceiver, sent: list[tuple[str, int, float]]) -> list[float]:
    """Return each healthy callback's time from send() to its arrival, in seconds."""
    arrived = {hit.headers["webhook-id"]: hit.at for hit in receiver.requests("/ok")}
    return [arrived[webhook_id] - at for webhook_id, _, at in sent]


def test_a_merchant_down_is_tripped_parked_probed_and_replayed_oldest_first_while_others_keep_their_latency(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    threshold, interval_s = 10, 1.0
    # Given a merchant that answers 503 until told otherwise, a healthy one, and a worker with 4 threads
    outage = Outage(length_s=None)
    receiver.set_handler("/down", outage)
    receiver.respond("/ok", Response(200))
    start_workers(
        env={**env, "WHISKYPAY_BREAKER_FAILURES": str(threshold), "WHISKYPAY_BREAKER_PROBE_INTERVAL_MS": "1000",
             "WHISKYPAY_BREAKER_RELEASE_RATE": "50", "WHISKYPAY_REPLAY_RATE": "50"},  # the lane's pace: as fast
        threads=4,
    )
    ok_url = f"http://localhost:{receiver.port}/ok"
    before: list[tuple[str, int, float]] = []
    for _ in range(20):  # the healthy merchant's usual latency, one callback at a time
        before += send(ok_url, 1)
        time.sleep(0.02)
    receiver.wait_for(20, path="/ok")
    # When 200 callbacks go to the merchant that is down
    down = send(receiver.url("/down"), 200)
    # Then it trips after the threshold and the rest are parked, not attempted and not dead-lettered
    wait_until(lambda: parked() >= 199, timeout_s=20, what="199 or 200 callbacks parked")
    state = merchants()[DOWN]
    assert state["state"] == "open" and state["failures"] >= threshold and state["since"] and state["next_probe_at"]
    assert state["last_error"] == "HttpStatusError: HTTP 503 from 127.0.0.1"
    _, out = run_cli("status", "--json")
    assert json.loads(out)["queues"]["callbackQueue"]["parked"] >= 199
    assert webhook_state(down[-1][0]) == "parked"  # the delivery ledger says so too
    tripped_at = time.monotonic()
    # And a healthy merchant's callbacks sent now, with 200 parked next to them, keep their latency
    during: list[tuple[str, int, float]] = []
    for _ in range(20):
        during += send(ok_url, 1)
        time.sleep(0.05)
    receiver.wait_for(40, path="/ok")
    usual, now = latencies(receiver, before), latencies(receiver, during)
    assert statistics.median(now) <= statistics.median(usual) + 0.05, (usual, now)
    # And while it stays down it receives only the threshold's attempts and one probe per interval
    time.sleep(max(0.0, tripped_at + 2.6 * interval_s - time.monotonic()))
    down_hits = [hit.at for hit in receiver.requests("/down")]
    first = down_hits[threshold - 1]
    probes = [at for at in down_hits if at > first + 0.3]
    elapsed = time.monotonic() - first
    assert len(down_hits) <= threshold + int(elapsed / interval_s) + 1, (len(down_hits), elapsed)
    assert len(down_hits[:threshold + 1]) == threshold or down_hits[threshold] > first + 0.3  # no 11th in the burst
    # (a probe is taken exactly one interval after the last; its arrival varies by a worker's pickup)
    assert probes and all(b - a >= interval_s - 0.25 for a, b in itertools.pairwise(probes)), probes
    assert dead_letters(redis_client, "callbackQueue") == []
    # When the merchant is back
    outage.end()
    back_at = time.monotonic()
    # Then it receives all 200, oldest first, each once under its webhook-id, and nothing is dead-lettered
    expected = {webhook_id for webhook_id, _, _ in down}
    wait_until(lambda: set(outage.accepted()) >= expected, timeout_s=30, what="the 200 parked callbacks delivered")
    time.sleep(0.3)
    accepted = outage.accepted()
    assert set(accepted) == expected and set(accepted.values()) == {1}
    timestamps = {webhook_id: ts for webhook_id, ts, _ in down}
    with outage.lock:
        order = [webhook_id for webhook_id, code in outage.answers if code == 200]
    delivered_ts = [timestamps[webhook_id] for webhook_id in order]
    # Released strictly oldest first, one per 20 ms; 4 threads may still deliver two neighbours either way round on
    # a busy machine (as from any queue), so the check is each one's distance from its place in send order.
    out_of_order = sum(1 for a, b in itertools.pairwise(delivered_ts) if b < a)
    displacement = max(  # how many older callbacks arrived after one, at most
        sum(1 for later in delivered_ts[i + 1:] if later < ts) for i, ts in enumerate(delivered_ts)
    )
    assert displacement <= 2 and out_of_order <= 4, (out_of_order, displacement)
    assert dead_letters(redis_client, "callbackQueue") == []
    done_s = max(hit.at for hit in receiver.requests("/down")) - back_at
    wait_until(lambda: DOWN not in merchants(), timeout_s=5, what="the merchant's breaker record cleared")
    # When an operator holds the merchant, its callbacks are parked and not probed; closing it delivers them
    assert run_cli("breaker", "open", DOWN)[0] == 0
    time.sleep(0.2)
    held = send(receiver.url("/down"), 5)
    wait_until(lambda: parked() == 5, timeout_s=10, what="5 callbacks parked by the hold")
    hits_before = len(receiver.requests("/down"))
    time.sleep(1.5 * interval_s)
    assert len(receiver.requests("/down")) == hits_before  # held: no probe
    assert merchants()[DOWN]["held"] is True and merchants()[DOWN]["next_probe_at"] is None
    assert run_cli("breaker", "close", DOWN)[0] == 0
    wait_until(lambda: set(outage.accepted()) >= {webhook_id for webhook_id, _, _ in held}, timeout_s=10,
               what="the 5 held callbacks delivered")
    report(
        f"merchant breaker: 200 callbacks to a merchant down, {len(down_hits)} requests while down over "
        f"{elapsed:.1f} s (threshold {threshold}, {len(probes)} probe(s) at {interval_s:.0f} s intervals); "
        f"all 200 delivered oldest first once back ({out_of_order} neighbour pair(s) swapped by concurrent threads, "
        f"none more than {displacement} place(s) off), in {done_s:.1f} s (release and replay lane 50/s), 0 dead "
        f"letters; healthy merchant p50 latency {statistics.median(usual) * 1000:.0f} ms before, "
        f"{statistics.median(now) * 1000:.0f} ms with 200 parked (max {max(now) * 1000:.0f} ms)"
    )


def test_two_workers_send_one_probe_per_interval_and_give_up_after_the_park_limit_telling_sentry_once(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    sentry: FakeSentry,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    interval_s, park_max_s = 0.5, 4.0
    # Given a merchant that never comes back, and two worker processes (2 threads each)
    receiver.respond("/down", Response(503))
    start_all(
        start_workers, 2,
        env={**env, **sentry_env(sentry), "WHISKYPAY_BREAKER_FAILURES": "5",
             "WHISKYPAY_BREAKER_PROBE_INTERVAL_MS": str(int(interval_s * 1000)),
             "WHISKYPAY_PARK_MAX_MS": str(int(park_max_s * 1000))},
    )
    # When 30 callbacks go to it
    sent = send(receiver.url("/down"), 30)
    wait_until(lambda: parked() >= 29, timeout_s=15, what="the callbacks parked")
    # Then the two workers probe it once per interval between them
    time.sleep(3 * interval_s)
    hits = [hit.at for hit in receiver.requests("/down")]
    burst = [at for at in hits if at < hits[0] + 0.3]
    probes = [at for at in hits if at >= hits[0] + 0.3]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert len(probes) >= 2 and min(gaps) >= interval_s - 0.15, (burst, probes)
    # And after WHISKYPAY_PARK_MAX_MS every parked callback is dead-lettered with its reason
    letters = wait_until(lambda: exactly(dead_letters(redis_client, "callbackQueue"), 30),
                         timeout_s=park_max_s + 10, what="30 dead letters")
    assert letters is not None
    assert {letter["options"]["webhook_id"] for letter in letters} == {webhook_id for webhook_id, _, _ in sent}
    reasons = {letter["options"]["traceback"] for letter in letters}
    assert all(reason.startswith(f"ParkLimitExceeded: merchant {DOWN} unreachable since 20") for reason in reasons)
    assert all("past WHISKYPAY_PARK_MAX_MS (4000 ms)" in reason for reason in reasons), reasons
    assert {letter["options"]["failure_class"] for letter in letters} == {"ParkLimitExceeded"}
    assert webhook_state(sent[-1][0]) == "failed"  # and so does the delivery ledger
    # And Sentry heard once that the breaker opened and once of the dead letters, both tagged with the merchant
    time.sleep(1.0)
    events = sentry.events()
    fingerprints = sorted(tuple(event.get("fingerprint", ())) for event in events)
    assert fingerprints == [("merchant-breaker-open", DOWN), ("merchant-park-limit", DOWN)], fingerprints
    assert all(event["tags"]["merchant"] == DOWN and event["tags"]["host"] == HOST for event in events)
    report(
        f"two workers, merchant never back: {len(burst)} requests before the trip (threshold 5, 2x2 threads), then "
        f"{len(probes)} probes {min(gaps):.2f}-{max(gaps):.2f} s apart (interval {interval_s} s); 30/30 dead-lettered "
        f"after the {park_max_s:.0f} s park limit with the reason; 2 Sentry events"
    )
