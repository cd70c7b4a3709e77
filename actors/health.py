"""check_queue_health: each minute, log every queue's counts and report new incidents to Sentry (maintenanceQueue).

`periodiq actors` (exactly one instance) sends it at the start of every minute, and once at its own start;
a worker consuming maintenanceQueue runs it. A second scheduler's message for the same minute finds the
minute's lock taken and does nothing. With Sentry on, each real run sends a cron check-in (in_progress,
then ok or error), so a scheduler or worker that stopped is alerted by Sentry's missed check-in.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from middleware.periodic import Cron
from settings import get_settings
from whiskypay.breakers import BreakerStore
from whiskypay.merchants import open_longer_than
from whiskypay.queue_health import Incident, assess, load_state, save_state, take_tick, tick_of
from whiskypay.queue_stats import queue_counts
from whiskypay.queues import Queue

logger = dramatiq.get_logger(__name__)

#: The schedule; also sent to Sentry as the cron monitor's schedule.
SCHEDULE = "* * * * *"

#: The Sentry cron monitor's slug.
MONITOR_SLUG = "whiskypay-check-queue-health"

#: Sentry creates or updates the monitor from this on each check-in. Margin and runtime are in minutes;
#: an every-minute crontab means the same in any timezone.
MONITOR_CONFIG: Any = {
    "schedule": {"type": "crontab", "value": SCHEDULE},
    "timezone": "UTC",
    "checkin_margin": 2,
    "max_runtime": 2,
}


def report(incident: Incident) -> None:
    """Send one Sentry event for a newly opened incident, grouped per queue and kind (no-op without Sentry)."""
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.set_tag("queue", incident.queue)
        scope.set_tag("kind", incident.kind)
        scope.fingerprint = ["check_queue_health", incident.queue, incident.kind]
        sentry_sdk.capture_message(incident.summary, level="error")


def check_breakers(client: Any, namespace: str, tick: str, *, limit_ms: int) -> None:
    """Log the merchant breakers and report each one open longer than limit_ms to Sentry, once per outage."""
    store = BreakerStore(client, namespace)
    breakers = store.snapshot()
    now_ms = int(time.time() * 1000)
    long_open = open_longer_than(list(breakers.values()), now_ms=now_ms, limit_ms=limit_ms)
    logger.info(
        "merchant breakers tick=%s open=%d parked=%d open_over_limit=%s", tick,
        sum(1 for breaker in breakers.values() if breaker.state == "open"),
        sum(breaker.parked for breaker in breakers.values()),
        ",".join(breaker.merchant for breaker in long_open) or "-",
    )
    for breaker in long_open:
        assert breaker.since_ms is not None
        summary = (
            f"merchant {breaker.merchant}: breaker open for {(now_ms - breaker.since_ms) // 60_000} min, over the "
            f"{limit_ms // 1000} s limit (WHISKYPAY_HEALTH_BREAKER_OPEN_S); {breaker.parked} callback(s) parked"
            + (" (held by an operator)" if breaker.held else f"; last error: {breaker.last_error or '-'}")
        )
        logger.warning("Incident: %s", summary)
        if store.first_health_report(breaker.merchant, breaker.since_ms):
            import sentry_sdk  # loaded at first use, like report()

            with sentry_sdk.new_scope() as scope:
                scope.set_tag("merchant", breaker.merchant)
                scope.set_tag("host", breaker.host or "-")
                scope.set_tag("kind", "breaker_open")
                scope.fingerprint = ["check_queue_health", "breaker_open", breaker.merchant]
                sentry_sdk.capture_message(summary, level="error")


@dramatiq.actor(
    actor_name="check_queue_health",
    queue_name=Queue.MAINTENANCE,
    periodic=Cron(SCHEDULE),  # parsed by periodiq in the scheduler only
    max_retries=0,  # the next minute's run is the retry
    time_limit=30_000,
)
def check_queue_health() -> None:
    """Log every queue's counts and report the incidents that opened; a no-op if this minute already ran."""
    # Imported at the first run, not with the actors: a worker that never runs this job never loads sentry-sdk.
    from sentry_sdk.crons import capture_checkin
    from sentry_sdk.crons.consts import MonitorStatus

    broker = dramatiq.get_broker()
    assert isinstance(broker, RedisBroker), "check_queue_health reads the Redis broker's keys"
    settings = get_settings()
    client, namespace = broker.client, broker.namespace
    message = CurrentMessage.get_current_message()
    tick = tick_of(message.options.get("scheduled_at") if message else None, now=datetime.now(UTC))
    if not take_tick(client, namespace, tick, lock_s=settings.health_lock_s):
        logger.info("queue health tick=%s already checked by another run; nothing to do", tick)
        return

    checkin_id = capture_checkin(
        monitor_slug=MONITOR_SLUG, status=MonitorStatus.IN_PROGRESS, monitor_config=MONITOR_CONFIG
    )
    started = time.monotonic()
    try:
        for queue in Queue:
            now_ms = int(time.time() * 1000)
            counts = queue_counts(client, namespace, queue, now_ms=now_ms)
            before = load_state(client, namespace, queue)
            state, opened = assess(counts, before, max_wait_ms=settings.health_max_wait_s * 1000)
            save_state(client, namespace, queue, state, now_ms=now_ms)
            logger.info(
                "queue health tick=%s queue=%s waiting=%d delayed=%d in_flight=%d dead_letters=%d oldest_wait_s=%s "
                "open=%s",
                tick, queue, counts.waiting, counts.delayed, counts.in_flight, counts.dead_letters,
                "-" if counts.oldest_wait_ms is None else counts.oldest_wait_ms // 1000,
                ",".join(sorted(state.open)) or "-",
            )
            for kind in sorted(before.open - state.open):
                logger.info("Incident closed: %s %s", queue, kind)
            for incident in opened:
                logger.warning("Incident opened: %s", incident.summary)
                report(incident)
        check_breakers(client, namespace, tick, limit_ms=settings.health_breaker_open_s * 1000)
    except Exception:
        capture_checkin(
            monitor_slug=MONITOR_SLUG, check_in_id=checkin_id, status=MonitorStatus.ERROR,
            duration=time.monotonic() - started,
        )
        raise
    capture_checkin(
        monitor_slug=MONITOR_SLUG, check_in_id=checkin_id, status=MonitorStatus.OK, duration=time.monotonic() - started
    )
