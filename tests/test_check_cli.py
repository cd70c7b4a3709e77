"""`whiskypay check`: one table of ok / warning / failed checks with a fix-it line each, no secret printed."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from settings import load_settings
from tests.helpers import TEST_SECRET
from whiskypay.cli.check import check
from whiskypay.devstack import RedisServer, SentinelServer, SmtpSink, free_port

REDIS_PASSWORD = "redis-PW-0b7e"
SMTP_PASSWORD = "smtp-PW-4d21"
SENTRY_KEY = "f3e1c0ffee5ecret"


@pytest.fixture(scope="module")
def durable_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, password=REDIS_PASSWORD) as server:
        yield server


def run_check(capsys: pytest.CaptureFixture[str], **overrides: object) -> tuple[int, str]:
    status = check(argparse.Namespace(), load=lambda: load_settings(**overrides))
    return status, capsys.readouterr().out


def rows(out: str) -> dict[str, str]:
    """Return {check name: result} from the table."""
    found = {}
    for line in out.splitlines()[1:]:
        parts = line.split("  ")
        cells = [cell.strip() for cell in parts if cell.strip()]
        if len(cells) >= 2 and cells[1] in {"ok", "warning", "failed"}:
            found[cells[0]] = cells[1]
    return found


def test_a_ready_setup_passes_with_only_the_missing_sentry_as_a_warning(
    capsys: pytest.CaptureFixture[str], durable_redis: RedisServer, smtp_sink: SmtpSink
) -> None:
    status, out = run_check(capsys, redis_url=durable_redis.url, smtp_host=smtp_sink.host, smtp_port=smtp_sink.port,
                            mail_from="payments@whiskypay.test", webhook_secret=TEST_SECRET, sentry_dsn=None)
    assert status == 0, out
    assert rows(out) == {
        "settings": "ok", "redis": "ok", "redis eviction policy": "ok", "redis persistence": "ok",
        "redis replicas": "ok", "smtp relay": "ok", "webhook signing keys": "ok", "sentry dsn": "warning",
    }
    assert "Redis 7" in out or "Redis 6" in out
    assert "EHLO ok; no mail sent" in out and smtp_sink.mails() == []
    assert "warning: sentry dsn: set WHISKYPAY_SENTRY_DSN" in out


def test_an_unreachable_smtp_relay_fails_the_check_with_a_clear_line_and_no_secret(
    capsys: pytest.CaptureFixture[str], durable_redis: RedisServer
) -> None:
    port = free_port()
    status, out = run_check(
        capsys, redis_url=durable_redis.url, smtp_host="127.0.0.1", smtp_port=port, smtp_username="relay",
        smtp_password=SMTP_PASSWORD, mail_from="payments@whiskypay.test", webhook_secret=TEST_SECRET,
        sentry_dsn=f"https://{SENTRY_KEY}@o1.ingest.sentry.io/42",
    )
    assert status == 1
    assert rows(out)["smtp relay"] == "failed"
    assert f"127.0.0.1:{port} (tls off): SMTP connection to 127.0.0.1 failed (ConnectionRefusedError)" in out
    assert "failed: smtp relay: check WHISKYPAY_SMTP_HOST/_PORT/_TLS" in out
    assert rows(out)["sentry dsn"] == "ok" and "https://o1.ingest.sentry.io, project 42" in out
    assert "1 failed." in out
    for secret in (REDIS_PASSWORD, SMTP_PASSWORD, SENTRY_KEY, TEST_SECRET, TEST_SECRET.removeprefix("whsec_")):
        assert secret not in out


def test_a_volatile_redis_and_no_secret_fail(capsys: pytest.CaptureFixture[str], smtp_sink) -> None:
    with RedisServer() as volatile:
        status, out = run_check(capsys, redis_url=volatile.url, smtp_host=smtp_sink.host, smtp_port=smtp_sink.port,
                                mail_from="payments@whiskypay.test", webhook_secret=None)
    assert status == 1
    found = rows(out)
    assert found["redis persistence"] == "failed" and found["webhook signing keys"] == "failed"
    assert "failed: redis persistence: turn on AOF: appendonly yes" in out


def test_a_malformed_dsn_fails_the_settings_row_as_the_workers_refuse_to_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a DSN with no project id (the one parser the settings and the check share refuses it)
    status, out = run_check(capsys, sentry_dsn=f"https://{SENTRY_KEY}@o1.ingest.sentry.io/")
    # Then the check fails at the settings, as a worker would at its start, naming the variable but not the DSN
    assert status == 1
    assert rows(out) == {"settings": "failed"}
    assert "WHISKYPAY_SENTRY_DSN: is not a Sentry DSN (it does not end with a numeric project id)" in out
    assert SENTRY_KEY not in out and "o1.ingest" not in out


def test_the_sentinel_topology_is_shown_when_configured(
    capsys: pytest.CaptureFixture[str], smtp_sink: SmtpSink
) -> None:
    with RedisServer(appendonly=True) as primary, \
            SentinelServer(primary_port=primary.port, quorum=1, down_after_ms=60_000) as sentinel:
        # WHISKYPAY_REDIS_URL's host and port are not used with Sentinel: only its credentials and database
        status, out = run_check(
            capsys, redis_url=f"redis://:{REDIS_PASSWORD}@ignored:1/0", redis_sentinels=sentinel.address,
            redis_sentinel_master="whiskypay", smtp_host=smtp_sink.host, smtp_port=smtp_sink.port,
            mail_from="payments@whiskypay.test", webhook_secret=TEST_SECRET,
        )
    found = rows(out)
    assert found["redis"] == "ok", out
    assert found[f"sentinel {sentinel.address}"] == "warning" and "0 replica(s)" in out, out
    assert "no replica: a failover has nothing to promote" in out
    assert REDIS_PASSWORD not in out
    assert status == 0


@pytest.mark.parametrize("dsn", [f"https://{SENTRY_KEY}@sentry.example:abc/1", f"https://{SENTRY_KEY}@[::1/1"],
                         ids=["bad-port", "bad-ipv6"])
def test_a_dsn_that_urllib_cannot_split_is_a_failed_row_not_a_traceback(dsn: str) -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from pydantic import SecretStr

    from whiskypay.cli.check import sentry_check

    row = sentry_check(cast(Any, SimpleNamespace(sentry_dsn=SecretStr(dsn))))
    assert row.result == "failed" and row.detail == "malformed: is not a Sentry DSN (its host or port does not parse)"
    assert SENTRY_KEY not in row.detail + row.fix
