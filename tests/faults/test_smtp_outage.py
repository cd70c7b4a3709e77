"""Fault: the SMTP relay goes down: shorter than the schedule, every email goes out once; longer, the jobs are
dead-lettered and `whiskypay retry` sends each email once."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from tests.faults.common import (
    BUYER,
    MAIL_DOMAIN,
    MERCHANT,
    SMTP_PASSWORD,
    SMTP_USER,
    Report,
    StartWorkers,
    assert_no_leaks,
    exactly,
    run_cli,
    sentry_env,
)
from tests.helpers import FakeSentry, dead_letters, wait_until
from whiskypay.devstack import Mail, SmtpSink

pytestmark = pytest.mark.e2e


@pytest.fixture
def relay() -> Iterator[list[SmtpSink]]:
    """An authenticating SMTP sink; a restart appends its successor (same port) to the list."""
    sinks = [SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD).start()]
    try:
        yield sinks
    finally:
        for sink in sinks:
            sink.stop()


def restart_relay(sinks: list[SmtpSink]) -> SmtpSink:
    """Start a new sink on the port of the last one (which must be stopped); append and return it."""
    sink = SmtpSink(port=sinks[-1].port, username=SMTP_USER, password=SMTP_PASSWORD).start()
    sinks.append(sink)
    return sink


def relay_mails(sinks: list[SmtpSink]) -> list[Mail]:
    """Return the mails accepted by every sink of the relay."""
    return [mail for sink in sinks for mail in sink.mails()]


def email_env(env: dict[str, str], sinks: list[SmtpSink], **extra: str) -> dict[str, str]:
    """Return env pointed at the authenticating relay."""
    return {
        **env,
        "WHISKYPAY_SMTP_HOST": sinks[0].host,
        "WHISKYPAY_SMTP_PORT": str(sinks[0].port),
        "WHISKYPAY_SMTP_USERNAME": SMTP_USER,
        "WHISKYPAY_SMTP_PASSWORD": SMTP_PASSWORD,
        "WHISKYPAY_SMTP_TIMEOUT_S": "2",
        **extra,
    }


def send_emails(count: int) -> set[str]:
    """Enqueue count email jobs; return the Message-IDs of the 2 * count emails they must send."""
    from actors import send_email

    expected = set()
    for _ in range(count):
        message = send_email.send(buyer_email=BUYER, merchant_email=MERCHANT, plan="pro", saas_name="Acme")
        message_id = message.message_id
        expected |= {f"<{message_id}.buyer@{MAIL_DOMAIN}>", f"<{message_id}.merchant@{MAIL_DOMAIN}>"}
    return expected


def message_ids(mails: list[Mail]) -> Counter[str]:
    """Count the mails per Message-ID header."""
    return Counter(str(mail.message["Message-ID"]) for mail in mails)


def test_an_smtp_outage_shorter_than_the_schedule_sends_every_email_exactly_once(
    redis_client: redis.Redis,
    relay: list[SmtpSink],
    sentry: FakeSentry,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given an email worker with 5 attempts 300, 600, 1200, 2400 ms apart, and a relay that works
    worker = start_workers(
        "--queues",
        "emailQueue",
        env=email_env(env, relay, **sentry_env(sentry), WHISKYPAY_EMAIL_ATTEMPTS="5", WHISKYPAY_EMAIL_BACKOFF_MS="300"),
        threads=4,
    )
    expected = send_emails(15)
    relay[0].wait_for(30, timeout_s=20)
    # When the relay goes down for 2 s while 15 more jobs come in
    relay[0].stop()
    down_at = time.monotonic()
    expected |= send_emails(15)
    time.sleep(2.0)  # the outage itself, not a backoff
    restart_relay(relay)
    # Then all 60 emails go out, no Message-ID twice, and nothing is dead-lettered
    wait_until(lambda: set(message_ids(relay_mails(relay))) >= expected, timeout_s=30, what="60 emails")
    time.sleep(0.5)
    counts = message_ids(relay_mails(relay))
    assert set(counts) == expected
    assert {mid: n for mid, n in counts.items() if n > 1} == {}
    assert dead_letters(redis_client, "emailQueue") == []
    assert sentry.events() == []
    failed_attempts = worker.log().count("Retrying send_email(")
    assert failed_attempts > 0, "no attempt failed: the outage was not felt"
    assert_no_leaks([worker.log().encode(), *sentry.bodies()])
    report(
        f"SMTP outage 2 s < schedule 4.5 s: 60/60 emails, 0 duplicate Message-IDs, {failed_attempts} failed "
        f"attempts, {len(relay[1].mails())} sent after the relay came back, all done "
        f"{time.monotonic() - down_at:.1f} s after it went down"
    )


def test_an_smtp_outage_longer_than_the_schedule_dead_letters_and_retry_sends_each_email_once(
    redis_client: redis.Redis,
    relay: list[SmtpSink],
    sentry: FakeSentry,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given an email worker with 3 attempts 100 and 200 ms apart, 10 jobs sent while the relay works
    worker = start_workers("--queues", "emailQueue", env=email_env(env, relay, **sentry_env(sentry)), threads=4)
    expected = send_emails(10)
    relay[0].wait_for(20, timeout_s=20)
    # When the relay goes down and 20 more jobs run out of attempts
    relay[0].stop()
    expected |= send_emails(20)
    letters = wait_until(
        lambda: exactly(dead_letters(redis_client, "emailQueue"), 20), timeout_s=30, what="20 dead letters"
    )
    assert letters is not None
    assert all(
        letter["options"]["traceback"].startswith("SmtpTemporaryError: SMTP connection to 127.0.0.1 failed")
        for letter in letters
    ), {letter["options"]["traceback"] for letter in letters}
    wait_until(lambda: len(sentry.events()) >= 20, timeout_s=15, what="20 Sentry events")
    # And the relay comes back and the dead letters are re-driven
    restart_relay(relay)
    status, out = run_cli("retry", "--queue", "emailQueue", "--all")
    assert status == 0, out
    # Then all 60 emails went out, each Message-ID exactly once
    wait_until(lambda: set(message_ids(relay_mails(relay))) >= expected, timeout_s=30, what="60 emails")
    time.sleep(0.5)
    counts = message_ids(relay_mails(relay))
    assert set(counts) == expected
    assert {mid: n for mid, n in counts.items() if n > 1} == {}
    assert dead_letters(redis_client, "emailQueue") == []
    assert len(sentry.events()) == 20
    assert_no_leaks([worker.log().encode(), *sentry.bodies()])
    report(
        "SMTP outage > schedule: 20 jobs dead-lettered (20 Sentry events), re-driven; 60/60 emails, "
        "0 duplicate Message-IDs"
    )
