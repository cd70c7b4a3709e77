"""WhiskyPay Workers configuration: one pydantic-settings object, read once from WHISKYPAY_* variables.

Only the broker factory (`whiskypay.broker.build_broker`), the command line and the tests call
`get_settings()`; every component takes plain constructor arguments. Secrets are `SecretStr` so that
they never print, and a bad value stops the process at start with `ConfigurationError`, whose text names
the variable and the fix without echoing the value.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import ssl
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Every variable starts with this prefix.
ENV_PREFIX = "WHISKYPAY_"

#: The longest delay Dramatiq accepts for a message, in milliseconds (7 days).
#: Backoffs, schedules and Retry-After waits above it are rejected at start or clamped.
MAX_DELAY_MS = 7 * 24 * 60 * 60 * 1000

_DURATION = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,6})?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class ConfigurationError(Exception):
    """A setting is missing or malformed; the text names the WHISKYPAY_ variable and the fix."""


def parse_duration_ms(text: str) -> int:
    """Parse "500ms", "5s", "5m", "2h", "1d" or a bare number of milliseconds into milliseconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; write it like 500ms, 5s, 5m, 2h or 1d")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2) or "ms"])


def parse_schedule_ms(text: str) -> tuple[int, ...]:
    """Parse a comma-separated retry schedule ("5s,5m,30m") into waits in milliseconds."""
    waits = tuple(parse_duration_ms(part) for part in text.split(",") if part.strip())
    for wait in waits:
        if wait > MAX_DELAY_MS:
            raise ValueError(f"a wait of {wait} ms exceeds {MAX_DELAY_MS} ms (7 days), the longest Dramatiq allows")
    return waits


def parse_webhook_secrets(text: str) -> tuple[bytes, ...]:
    """Decode space-separated `whsec_<base64>` secrets into HMAC keys; the first one is the newest.

    Errors name the position of the bad secret, never its text.
    """
    keys = []
    for position, token in enumerate(text.split(), start=1):
        if not token.startswith("whsec_"):
            raise ValueError(f"secret #{position} does not start with 'whsec_'; use the Standard Webhooks format")
        try:
            key = base64.b64decode(token[len("whsec_") :], validate=True)
        except ValueError:
            raise ValueError(f"secret #{position} is not valid base64 after 'whsec_'") from None
        if not 24 <= len(key) <= 64:
            raise ValueError(f"secret #{position} decodes to {len(key)} bytes; use 24 to 64 random bytes")
        keys.append(key)
    if not keys:
        raise ValueError("no secret given")
    return tuple(keys)


class Settings(BaseSettings):
    """Every setting of the service; see the README's settings table for meanings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_ignore_empty=True, extra="ignore", hide_input_in_errors=True,
        frozen=True,
    )

    # Broker.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    namespace: str = "whiskypay"
    #: How long dead letters are kept, in milliseconds (Dramatiq's default: 7 days).
    dead_letter_ttl_ms: int = Field(default=MAX_DELAY_MS, gt=0)
    #: Redis connect/read timeout for the gateway and workers, in seconds: send() fails within it.
    redis_timeout_s: float = Field(default=5.0, gt=0)
    #: A worker silent this long is dead and its unacked messages go back to their queue, in milliseconds.
    heartbeat_timeout_ms: int = Field(default=60_000, ge=5_000)
    #: Look for dead workers on each queue at least this often, in milliseconds. A SIGKILLed worker's
    #: messages are redelivered within heartbeat_timeout_ms + maintenance_interval_ms + about 1 s.
    maintenance_interval_ms: int = Field(default=10_000, ge=100)

    # Webhooks.
    webhook_secret: SecretStr | None = None
    allow_private_callbacks: bool = False
    callback_https_only: bool = True
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0)
    webhook_read_timeout_s: float = Field(default=15.0, gt=0)
    #: The most of a merchant's response body we read, in bytes; the rest is discarded unread.
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=0)
    #: At most this many slow deliveries to one host at a time per worker process; more wait their turn.
    webhook_host_concurrency: int = Field(default=2, ge=1)
    #: A delivery still running after this many seconds counts as slow (see webhook_host_concurrency).
    webhook_slow_after_s: float = Field(default=1.0, gt=0)
    #: A second send() with the same event_id within this window enqueues nothing, in seconds.
    idempotency_window_s: int = Field(default=24 * 3600, gt=0)

    # Email.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, gt=0, lt=65536)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_tls: Literal["off", "starttls", "ssl"] = "off"
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    #: A PEM file of CA certificates to verify the relay with, instead of the system's (for a private CA).
    smtp_ca_file: str | None = None
    mail_from: str | None = None

    # Error reporting.
    sentry_dsn: SecretStr | None = None
    environment: str = "production"
    release: str | None = None

    # Retry policy per queue (BullMQ meaning: attempts counts every try, the first included).
    callback_attempts: int = Field(default=5, ge=1, le=100)
    callback_backoff_ms: int = Field(default=5000, gt=0, le=MAX_DELAY_MS)
    callback_max_backoff_ms: int = Field(default=MAX_DELAY_MS, gt=0, le=MAX_DELAY_MS)
    callback_jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    callback_schedule: str = ""
    email_attempts: int = Field(default=3, ge=1, le=100)
    email_backoff_ms: int = Field(default=10000, gt=0, le=MAX_DELAY_MS)
    email_max_backoff_ms: int = Field(default=MAX_DELAY_MS, gt=0, le=MAX_DELAY_MS)
    email_jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    email_schedule: str = ""
    #: The longest wait a merchant's Retry-After header can ask for, in milliseconds (default 1 hour).
    retry_after_max_ms: int = Field(default=3_600_000, ge=0, le=MAX_DELAY_MS)

    # Dashboard.
    dashboard_username: str | None = None
    dashboard_password: SecretStr | None = None

    # Scheduler.
    #: check_queue_health opens a "stale" incident when a queue's next message has waited longer, in seconds.
    health_max_wait_s: int = Field(default=300, gt=0)
    #: How long one minute's health-check lock is held, in seconds (makes a second scheduler's run a no-op).
    health_lock_s: int = Field(default=50, gt=0)

    # Metrics.
    #: Serve Prometheus metrics from every `dramatiq actors` master (Dramatiq's plus whiskypay_deliveries_*).
    metrics_enabled: bool = False
    #: The port of that /metrics endpoint.
    metrics_port: int = Field(default=9191, gt=0, lt=65536)

    # Validation.
    #: The largest encoded message accepted at send(), in bytes.
    max_message_bytes: int = Field(default=16 * 1024, gt=0)

    @field_validator("callback_schedule", "email_schedule")
    @classmethod
    def _schedule_parses(cls, value: str) -> str:
        parse_schedule_ms(value)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_webhook_secrets(value.get_secret_value())
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_file_loads(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not os.path.isfile(value) or not os.access(value, os.R_OK):
            raise ValueError(
                f"{value!r} is not a readable file; give the path of a PEM file of CA certificates, "
                "or unset it to verify the relay with the system's CAs"
            )
        try:
            ssl.create_default_context(cafile=value)
        except ssl.SSLError:
            raise ValueError(
                f"{value!r} holds no PEM CA certificate; give a PEM bundle (-----BEGIN CERTIFICATE----- blocks)"
            ) from None
        return value

    @field_validator("mail_from")
    @classmethod
    def _mail_from_is_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", value):
            raise ValueError("must be a plain address like payments@example.com")
        return value

    def webhook_keys(self) -> tuple[bytes, ...]:
        """Return the decoded HMAC keys, newest first; empty when no secret is configured."""
        if self.webhook_secret is None:
            return ()
        return parse_webhook_secrets(self.webhook_secret.get_secret_value())


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's error into a `ConfigurationError` that names each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = str(error["loc"][0]) if error["loc"] else "?"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{ENV_PREFIX}{field.upper()}: {message}")
        raise ConfigurationError(
            "Invalid configuration:\n  " + "\n  ".join(problems) + "\nFix these environment variables (or .env)."
        ) from None


@functools.cache
def get_settings() -> Settings:
    """Return the process's settings, read once."""
    return load_settings()
