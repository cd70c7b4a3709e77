"""Tier 2: PeriodicTicks (the `periodic` option and the stale-tick skip) and Cron on a StubBroker with a Worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

from middleware.periodic import Cron, PeriodicTicks


@pytest.fixture
def ran() -> list[str]:
    return []


@pytest.fixture
def broker(ran: list[str]) -> StubBroker:
    broker = StubBroker(middleware=[PeriodicTicks(skip_delay_s=30)])
    broker.emit_after("process_boot")

    @dramatiq.actor(broker=broker, actor_name="tick", queue_name="q", periodic=Cron("* * * * *"))
    def tick(label: str) -> None:
        ran.append(label)

    @dramatiq.actor(broker=broker, actor_name="plain", queue_name="q")
    def plain(label: str) -> None:
        ran.append(label)

    return broker


def _drain(broker: StubBroker) -> None:
    worker = Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        broker.join("q", fail_fast=True, timeout=10_000)
    finally:
        worker.stop()


def test_a_tick_older_than_the_skip_delay_is_acked_without_running_and_a_fresh_or_manual_one_runs(
    broker: StubBroker, ran: list[str]
) -> None:
    now = datetime.now(UTC)
    tick, plain = broker.get_actor("tick"), broker.get_actor("plain")
    # Given ticks as `periodiq actors` sends them (str(pendulum.DateTime): a space, an offset), a manual send, an
    # unreadable time, and a non-periodic actor's message that happens to carry the option
    tick.send_with_options(args=("stale",), scheduled_at=str(now - timedelta(seconds=31)))
    paris = ZoneInfo("Europe/Paris")
    tick.send_with_options(args=("fresh",), scheduled_at=str((now - timedelta(seconds=5)).astimezone(paris)))
    tick.send_with_options(args=("naive-fresh",), scheduled_at=now.replace(tzinfo=None).isoformat(sep=" "))
    tick.send("manual")
    tick.send_with_options(args=("unreadable",), scheduled_at="yesterday")
    plain.send_with_options(args=("plain",), scheduled_at=str(now - timedelta(hours=1)))
    # When a worker takes them
    _drain(broker)
    # Then only the stale tick was dropped, and nothing was dead-lettered
    assert sorted(ran) == ["fresh", "manual", "naive-fresh", "plain", "unreadable"]
    assert broker.dead_letters == []


def test_cron_is_parsed_by_periodiq_only_when_the_scheduler_asks_and_answers_as_periodiq_does() -> None:
    import pendulum
    from periodiq import cron

    spec = Cron("*/5 * * * *")
    assert spec._parsed is None  # declaring the actor parsed nothing
    at = pendulum.datetime(2026, 12, 1, 22, 10, tz="UTC")  # the scheduler passes pendulum times
    assert spec.validate(at) is cron("*/5 * * * *").validate(at) is True
    assert spec.next_valid_date(at) == cron("*/5 * * * *").next_valid_date(at)
    assert str(spec) == str(cron("*/5 * * * *"))
