"""Scheduled work: queue counts, health incidents and the per-minute lock, Sentry events and check-ins, periodiq."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import FakeSentry, wait_until
from whiskypay import keys
from whiskypay.queue_health import HealthState, assess, tick_of
from whiskypay.queue_stats import QueueCounts, queue_counts, ready_since_ms

NS = "whiskypay"
REPO_ROOT = Path(__file__).resolve().parent.parent


def counts(dead: int = 0, wait_ms: int | None = None, queue: str = "callbackQueue") -> QueueCounts:
    return QueueCounts(queue=queue, waiting=0, delayed=0, in_flight=0, dead_letters=dead, oldest_wait_ms=wait_ms)


# -- tier 1: the pure decision ---------------------------------------------------------------------------------------


def test_the_first_run_only_takes_a_baseline_of_dead_letters():
    state, opened = assess(counts(dead=7), HealthState(), max_wait_ms=1000)
    assert opened == [] and state == HealthState(dead_letters_seen=7, open=frozenset())


def test_growing_dead_letters_open_one_incident_that_stays_open_while_they_grow_and_closes_when_they_stop():
    state, opened = assess(counts(dead=1), HealthState(dead_letters_seen=0), max_wait_ms=1000)
    assert [(i.kind, i.summary) for i in opened] == [
        ("dead_letters", "callbackQueue: 1 new dead letter(s), 1 kept in total")
    ]
    state, opened = assess(counts(dead=3), state, max_wait_ms=1000)
    assert opened == [] and state.open == {"dead_letters"}
    state, opened = assess(counts(dead=3), state, max_wait_ms=1000)
    assert opened == [] and state.open == frozenset()
    state, opened = assess(counts(dead=4), state, max_wait_ms=1000)
    assert [i.kind for i in opened] == ["dead_letters"]


def test_a_purge_lowers_the_baseline_without_an_incident():
    state, opened = assess(counts(dead=0), HealthState(dead_letters_seen=5), max_wait_ms=1000)
    assert opened == [] and state.dead_letters_seen == 0


@pytest.mark.parametrize(("wait_ms", "is_stale"), [(None, False), (0, False), (1000, False), (1001, True)])
def test_a_queue_is_stale_only_when_its_next_message_waited_longer_than_the_limit(wait_ms, is_stale):
    state, opened = assess(counts(wait_ms=wait_ms), HealthState(dead_letters_seen=0), max_wait_ms=1000)
    assert [i.kind for i in opened] == (["stale"] if is_stale else [])
    assert ("stale" in state.open) is is_stale


def test_the_stale_text_names_the_setting_and_asks_about_workers():
    _, opened = assess(counts(wait_ms=400_000), HealthState(dead_letters_seen=0), max_wait_ms=300_000)
    assert "waited 400 s, over the 300 s limit (WHISKYPAY_HEALTH_MAX_WAIT_S)" in opened[0].summary
    assert "workers" in opened[0].summary


@pytest.mark.parametrize(
    ("scheduled_at", "tick"),
    [
        ("2026-11-27 21:00:00+00:00", "2026-11-27T21:00Z"),  # periodiq's str(pendulum.DateTime)
        ("2026-11-27T22:01:17+01:00", "2026-11-27T21:01Z"),  # a scheduler in another timezone, started mid-minute
        (None, "2026-01-02T03:04Z"),
        ("garbage", "2026-01-02T03:04Z"),
    ],
)
def test_the_tick_is_the_scheduled_minute_in_utc(scheduled_at, tick):
    assert tick_of(scheduled_at, now=datetime(2026, 1, 2, 3, 4, 59, tzinfo=UTC)) == tick


def test_a_retried_message_is_ready_since_its_eta_not_its_creation():
    assert ready_since_ms(json.dumps({"message_timestamp": 1000, "options": {"eta": 5000}})) == 5000
    assert ready_since_ms(json.dumps({"message_timestamp": 1000, "options": {}})) == 1000
    assert ready_since_ms(b"not json") is None


# -- tier 3: the real broker and the test Redis ----------------------------------------------------------------------


@pytest.fixture
def broker(redis_client: redis.Redis) -> Any:
    import actors

    return actors.broker


def send_payment(broker: Any, *, age_s: float = 0) -> str:
    """Enqueue one callback through the real broker, made age_s seconds old; return its message id."""
    from actors import send_callback

    message = send_callback.message(
        callback_url="http://127.0.0.1:9/hook", email="buyer@example.com", plan="pro", price=1.0,
    )
    if age_s:
        message = message.copy(message_timestamp=int((time.time() - age_s) * 1000))
    return str(broker.enqueue(message).message_id)


def dead_letter_one(broker: Any) -> None:
    """Enqueue one callback and dead-letter it the way a worker does (fetch, then nack)."""
    send_payment(broker)
    consumer = broker.consume("callbackQueue", prefetch=1, timeout=100)
    try:
        message = wait_until(lambda: next(consumer), what="the message to be fetched")
        consumer.nack(message)
    finally:
        consumer.close()


def next_minute(client: redis.Redis) -> None:
    """Act as if the next scheduled minute came: drop the per-minute locks."""
    for key in client.scan_iter(f"{NS}:whiskypay.health.tick:*"):
        client.delete(key)


def open_incidents(client: redis.Redis, queue: str = "callbackQueue") -> str:
    """Return the open incident kinds of queue, comma-separated, as the health check stored them."""
    return (client.hget(f"{NS}:whiskypay.health:{queue}", "open") or b"").decode()


def test_queue_counts_sees_waiting_in_flight_delayed_and_dead_messages(broker, redis_client):
    # Given one old waiting message, one fetched by a worker, one delayed and one dead-lettered
    dead_letter_one(broker)
    send_payment(broker)
    consumer = broker.consume("callbackQueue", prefetch=1, timeout=100)
    wait_until(lambda: next(consumer), what="a fetch")
    send_payment(broker, age_s=42)
    from actors import send_callback

    send_callback.send_with_options(
        kwargs={"callback_url": "http://127.0.0.1:9/hook", "email": "b@example.com", "plan": "pro", "price": 1.0},
        delay=60_000,
    )
    # When the queue is counted
    got = queue_counts(redis_client, NS, "callbackQueue")
    consumer.close()
    # Then each state has its message, and the waiting one's age is its own
    assert (got.waiting, got.in_flight, got.delayed, got.dead_letters) == (1, 1, 1, 1)
    assert got.oldest_wait_ms is not None and 41_000 <= got.oldest_wait_ms < 60_000
    assert queue_counts(redis_client, NS, "emailQueue") == QueueCounts("emailQueue", 0, 0, 0, 0, None)


@pytest.fixture
def sentry(sentry: FakeSentry) -> Iterator[FakeSentry]:
    """The fake Sentry, with sentry-sdk initialised in this process the way the worker does it."""
    with sentry.reporting_here():
        yield sentry


def test_an_incident_is_reported_once_across_runs_and_again_after_it_cleared(broker, redis_client, sentry):
    from actors import check_queue_health

    # Given a first run that takes the baseline
    check_queue_health()
    # When a callback is dead-lettered, and three more minutes' runs follow (the count still growing in the next)
    dead_letter_one(broker)
    next_minute(redis_client)
    check_queue_health()
    assert open_incidents(redis_client) == "dead_letters"
    dead_letter_one(broker)
    for _ in range(2):
        next_minute(redis_client)
        check_queue_health()
    # Then exactly one Sentry event was sent for it, tagged and fingerprinted per queue and kind
    events = sentry.items("event")
    assert len(events) == 1
    assert events[0]["tags"]["queue"] == "callbackQueue" and events[0]["tags"]["kind"] == "dead_letters"
    assert events[0]["fingerprint"] == ["check_queue_health", "callbackQueue", "dead_letters"]
    assert events[0]["message"] == "callbackQueue: 1 new dead letter(s), 1 kept in total"
    # And the incident closed on the quiet run; a new dead letter opens (and reports) a new one
    assert open_incidents(redis_client) == ""
    dead_letter_one(broker)
    next_minute(redis_client)
    check_queue_health()
    assert len(sentry.items("event")) == 2
    # And every real run sent an in_progress and an ok check-in for the monitor, with its crontab
    checkins = sentry.items("check_in")
    assert [c["status"] for c in checkins] == ["in_progress", "ok"] * 5
    assert {c["monitor_slug"] for c in checkins} == {"whiskypay-check-queue-health"}
    assert checkins[0]["monitor_config"]["schedule"] == {"type": "crontab", "value": "* * * * *"}
    assert checkins[0]["check_in_id"] == checkins[1]["check_in_id"]


def test_a_stale_queue_is_reported_once_and_closes_when_the_message_is_taken(broker, redis_client, sentry):
    from actors import check_queue_health

    # Given a callback that has waited 10 minutes (no worker took it), over the default 300 s
    send_payment(broker, age_s=600)
    # When the health check runs in two successive minutes
    check_queue_health()
    next_minute(redis_client)
    check_queue_health()
    # Then one "stale" event was sent
    assert open_incidents(redis_client) == "stale"
    events = sentry.items("event")
    assert [(e["tags"]["queue"], e["tags"]["kind"]) for e in events] == [("callbackQueue", "stale")]
    # And once a worker takes the message, the next run closes the incident
    consumer = broker.consume("callbackQueue", prefetch=1, timeout=100)
    consumer.ack(wait_until(lambda: next(consumer), what="a fetch"))
    consumer.close()
    next_minute(redis_client)
    check_queue_health()
    assert open_incidents(redis_client) == ""


def test_a_second_run_in_the_same_minute_is_a_no_op(broker, redis_client, sentry):
    from actors import check_queue_health

    # Given a run for this minute (not in its last seconds, so both runs share it)
    if datetime.now(UTC).second >= 57:
        time.sleep(60 - datetime.now(UTC).second + 0.1)
    check_queue_health()
    checked_at = redis_client.hget(f"{NS}:whiskypay.health:callbackQueue", "checked_at")
    # When a callback is dead-lettered and a second run (a second scheduler's message) comes in the same minute
    dead_letter_one(broker)
    check_queue_health()
    # Then it did nothing: no state change, no event, no check-in
    assert redis_client.hget(f"{NS}:whiskypay.health:callbackQueue", "checked_at") == checked_at
    assert sentry.items("event") == []
    assert len(sentry.items("check_in")) == 2
    ttl = redis_client.ttl(f"{NS}:whiskypay.health.tick:{tick_of(None, now=datetime.now(UTC))}")
    assert 0 < ttl <= 50


def test_a_failing_check_sends_an_error_check_in_and_raises(broker, redis_client, sentry, monkeypatch):
    import actors.health
    from actors import check_queue_health

    def broken(*args: object, **kwargs: object) -> QueueCounts:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(actors.health, "queue_counts", broken)  # the Redis outage, not the thing under test
    with pytest.raises(redis.ConnectionError):
        check_queue_health()
    assert [c["status"] for c in sentry.items("check_in")] == ["in_progress", "error"]


# -- end to end: `periodiq actors` and a worker ----------------------------------------------------------------------


@pytest.fixture
def start_scheduler(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Factory starting a real `periodiq actors` process; every one is stopped at teardown."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def _start() -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"periodiq-{len(started)}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from periodiq import entrypoint; entrypoint()", "actors"],
                cwd=str(REPO_ROOT), env=worker_env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append((proc, log))
        return proc, log

    yield _start
    for proc, _ in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.e2e
def test_periodiq_sends_the_health_check_at_start_and_a_second_scheduler_does_not_double_it(
    redis_client, start_workers, start_scheduler
):
    # Given a worker for the maintenance queue, and a start early enough in the minute that periodiq fires at once
    worker = start_workers("--queues", "maintenanceQueue")
    if datetime.now().second >= 50:
        time.sleep(60 - datetime.now().second + 0.5)
    # When two schedulers are started by mistake
    _, log_a = start_scheduler()
    _, log_b = start_scheduler()
    # Then both sent the minute's message, the worker ran one and found the other's minute taken
    wait_until(lambda: "already checked by another run" in worker.log(), timeout_s=30, what="the second run")
    runs = re.findall(r"queue health tick=(\S+) queue=callbackQueue", worker.log())
    assert len(runs) == len(set(runs)) >= 1, runs
    assert redis_client.hget(f"{NS}:whiskypay.health:callbackQueue", "checked_at") is not None
    for log in (log_a, log_b):
        assert "check_queue_health@maintenanceQueue" in log.read_text()
    assert os.environ.get("WHISKYPAY_SENTRY_DSN") is None  # no events leave the machine from this test


def test_a_breaker_open_longer_than_the_limit_is_reported_once_per_outage(broker, redis_client, sentry, caplog):
    from actors import check_queue_health

    caplog.set_level(logging.INFO, logger="actors.health")
    from whiskypay.breakers import BreakerStore

    # Given a merchant held open two hours ago (over the default 3600 s) and one opened just now
    store = BreakerStore(redis_client, NS)
    store.operate("m_long", "open", queue="callbackQueue")
    store.operate("m_new", "open", queue="callbackQueue")
    two_hours_ago = int(time.time() * 1000) - 7_200_000
    redis_client.hset(keys.breaker(NS, "m_long"), "since", two_hours_ago)
    # When the health check runs in two successive minutes
    check_queue_health()
    next_minute(redis_client)
    check_queue_health()
    # Then the long one was reported once, tagged with the merchant; the new one not at all
    events = [e for e in sentry.items("event") if e["tags"].get("kind") == "breaker_open"]
    assert [(e["tags"]["merchant"], e["fingerprint"]) for e in events] == [
        ("m_long", ["check_queue_health", "breaker_open", "m_long"])
    ]
    assert "breaker open for 120 min, over the 3600 s limit (WHISKYPAY_HEALTH_BREAKER_OPEN_S)" in events[0]["message"]
    assert "open=2 parked=0 open_over_limit=m_long" in caplog.text
    # And a new outage of the same merchant (opened again later) is a new report
    store.operate("m_long", "close", queue="callbackQueue")
    store.operate("m_long", "open", queue="callbackQueue")
    redis_client.hset(keys.breaker(NS, "m_long"), "since", two_hours_ago + 1)
    next_minute(redis_client)
    check_queue_health()
    assert len([e for e in sentry.items("event") if e["tags"].get("kind") == "breaker_open"]) == 2
