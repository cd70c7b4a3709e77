"""WhiskyPay Workers configuration: one pydantic settings object, read once from WHISKYPAY_* variables (and .env).

Only the broker factory (`whiskypay.broker.build_broker`), the command line and the tests call
`get_settings()`; every component takes plain constructor arguments. Secrets are `SecretStr` so that
they never print, and a bad value stops the process at start with `ConfigurationError`, whose text names
the variable and the fix without echoing the value.

Each value is parsed once, into a typed field, by the parser of its domain (never the reverse: those modules
do not import settings): the webhook secret by `whiskypay.signing` (`webhook_keys`), durations and schedules
by `whiskypay.retrying`. Each queue's retry variables (WHISKYPAY_CALLBACK_*, WHISKYPAY_EMAIL_*) make one
nested `QueueRetry`, and `retry_policies` holds the `RetryPolicy` of every queue.

The variables are read by `read_environment` into a pydantic model, as pydantic-settings would (prefix, any case,
empty ones unset, `.env` under the environment): pydantic-settings itself cost every worker process 3.3 MiB and
its imports (asyncio, argparse and its other sources) before the first webhook (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from whiskypay.errors import ConfigurationError
from whiskypay.queues import Queue
from whiskypay.retrying import DEFAULT_POLICIES, MAX_DELAY_MS, RetryPolicy, parse_schedule_ms
from whiskypay.signing import parse_webhook_secrets

if TYPE_CHECKING:
    from sentry_sdk.utils import Dsn

__all__ = [
    "ENV_PREFIX", "MAX_DELAY_MS", "ConfigurationError", "QueueRetry", "Settings", "WebhookSecret", "get_settings",
    "load_settings", "read_environment", "variable_names",
]

#: Every variable starts with this prefix.
ENV_PREFIX = "WHISKYPAY_"

#: The file read under the environment (in the working directory), when it exists.
ENV_FILE = ".env"


def read_environment(environ: Mapping[str, str], *, env_file: str | None = ENV_FILE) -> dict[str, str]:
    """Return the WHISKYPAY_* variables of env_file (when it exists) and environ, by lowercase field name.

    The prefix matches in any case (`whiskypay_namespace` too), a variable set to "" counts as unset, and environ
    wins over the file, whose lines python-dotenv parses (`export`, quotes, comments).
    """
    sources: list[Mapping[str, str | None]] = []
    if env_file and os.path.isfile(env_file):
        from dotenv import dotenv_values

        sources.append(dotenv_values(env_file))
    sources.append(environ)
    prefix = ENV_PREFIX.lower()
    values: dict[str, str] = {}
    for source in sources:
        for name, value in source.items():
            if value and name.lower().startswith(prefix):
                values[name.lower()[len(prefix):]] = value
    return values


class WebhookSecret(SecretStr):
    """WHISKYPAY_WEBHOOK_SECRET: never printed, and decoded into its HMAC keys once, when it is read."""

    def __init__(self, secret_value: str) -> None:
        super().__init__(secret_value)
        #: The HMAC keys, newest first.
        self.keys = parse_webhook_secrets(secret_value)

    @classmethod
    def of(cls, value: SecretStr) -> WebhookSecret:
        """Decode value's whsec_ secrets (ValueError naming the position of a bad one)."""
        return cls(value.get_secret_value())


def parse_sentinels(value: object) -> object:
    """Return ((host, port), ...) for "host:port,host:port" (port 26379 when omitted; IPv6 as [::1]:26379)."""
    if not isinstance(value, str):
        return value
    found = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"\[(?P<v6>[^\]]+)\](?::(?P<port6>\d+))?|(?P<host>[^:\s\[\]]+)(?::(?P<port>\d+))?", item)
        if match is None:
            raise ValueError(
                f"{item!r} is not host:port; give a comma-separated list like sentinel-1:26379,sentinel-2:26379"
            )
        host = match.group("v6") or match.group("host")
        port = int(match.group("port6") or match.group("port") or 26379)
        if not 0 < port < 65536:
            raise ValueError(f"{item!r}: the port must be between 1 and 65535")
        found.append((host, port))
    return tuple(found)


def _schedule(value: object) -> object:
    return parse_schedule_ms(value) if isinstance(value, str) else value


class QueueRetry(BaseModel):
    """One queue's retry policy: WHISKYPAY_<QUEUE>_ATTEMPTS, _BACKOFF_MS, _MAX_BACKOFF_MS, _JITTER, _SCHEDULE.

    BullMQ's meaning: attempts counts every try, the first included; a schedule ("5s,5m,30m") replaces the
    exponential formula and sets the number of retries. See `whiskypay.retrying.RetryPolicy`.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    attempts: int = Field(ge=1, le=100)
    backoff_ms: int = Field(gt=0, le=MAX_DELAY_MS)
    max_backoff_ms: int = Field(default=MAX_DELAY_MS, gt=0, le=MAX_DELAY_MS)
    jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    schedule: Annotated[tuple[int, ...], BeforeValidator(_schedule)] = ()

    @classmethod
    def of(cls, policy: RetryPolicy) -> QueueRetry:
        """Return the settings that give policy."""
        return cls(**dataclasses.asdict(policy))

    def policy(self) -> RetryPolicy:
        """Return the RetryPolicy these settings describe."""
        return RetryPolicy(**self.model_dump())


#: The settings field of each queue's retry policy (the middle of its variables' names), with its defaults.
_RETRY_FIELDS = {"callback": Queue.CALLBACKS, "email": Queue.EMAIL}
_RETRY_DEFAULTS = {field: QueueRetry.of(DEFAULT_POLICIES[queue]) for field, queue in _RETRY_FIELDS.items()}


#: What to do when the Redis URL cannot be read; it never quotes the URL (its password would show).
REDIS_URL_FIX = (
    "is not a Redis URL redis-py can read. Special characters in the password must be percent-encoded "
    "(/ as %2F, # as %23, ? as %3F, @ as %40, : as %3A, % as %25), e.g. redis://:p%2Fss%23word@redis:6379/0; "
    "python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=\"\"))' 'PASSWORD' "
    "prints the encoded form"
)


def check_redis_url(url: str) -> None:
    """Raise ValueError (without quoting url) unless redis-py's own parser reads url as the URL it was meant to be.

    An unencoded `/`, `#` or `?` in the password ends the URL's authority early: redis-py then fails with an
    error that quotes part of the password, or silently connects elsewhere without it. The `@` that separates
    the password from the host then sits in the path, query or fragment; that is refused here too.
    """
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    try:
        parse_url(url)
        parts = urlsplit(url)
        parts.port  # noqa: B018  raises on a port that is not a number
    except Exception:  # whatever redis-py or urllib raise, their text may quote the password
        raise ValueError(REDIS_URL_FIX) from None
    if url.startswith(("redis://", "rediss://")) and "@" in parts.path + parts.query + parts.fragment:
        raise ValueError(REDIS_URL_FIX)


#: The fix-it line of a malformed WHISKYPAY_SENTRY_DSN.
SENTRY_DSN_FIX = "copy the DSN again from Sentry: https://<key>@<host>/<project id>"

#: sentry-sdk's BadDsn texts (which quote parts of the DSN) by their start, and what we say instead.
_DSN_PROBLEMS = (
    ("Unsupported scheme", "its scheme is not http or https"),
    ("Missing hostname", "it has no host"),
    ("Missing public key", "it has no key before the @"),
    ("Invalid project", "it does not end with a numeric project id"),
)


def parse_sentry_dsn(dsn: str) -> Dsn:
    """Return sentry-sdk's own parse of dsn, or raise ValueError saying what is wrong without quoting any of it.

    The one DSN parser: settings refuse a malformed WHISKYPAY_SENTRY_DSN with it at start, and `whiskypay check`
    shows its host and project with it. sentry-sdk is imported here, on first use, so that a process without a
    DSN never loads it.
    """
    from sentry_sdk.utils import BadDsn, Dsn

    try:
        return Dsn(dsn)
    except BadDsn as exc:  # its text quotes the scheme or the path
        reason = next((why for start, why in _DSN_PROBLEMS if str(exc).startswith(start)), "it does not parse")
    except ValueError:  # urllib's, for a port that is not a number or a broken IPv6 literal: it quotes them
        reason = "its host or port does not parse"
    raise ValueError(f"is not a Sentry DSN ({reason}); {SENTRY_DSN_FIX}") from None


class Settings(BaseModel):
    """Every setting of the service; see the README's settings table for meanings.

    `Settings(**values)` reads the environment (`read_environment`; `_env_file=None` skips .env) under values.
    WHISKYPAY_CALLBACK_ATTEMPTS is `callback.attempts`: `_fold_queue_arguments` nests each queue's variables.
    """

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True, frozen=True, validate_default=True)

    def __init__(self, _env_file: str | None = ENV_FILE, **values: Any) -> None:
        super().__init__(**{**read_environment(os.environ, env_file=_env_file), **values})

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
    #: Find the primary through these Redis Sentinels ("host:port,host:port"); WHISKYPAY_REDIS_URL then gives
    #: only the primary's username, password, database and TLS (its host and port are not used).
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], BeforeValidator(parse_sentinels)] = ()
    #: The name the Sentinels monitor the primary under (`sentinel monitor <name> ...`).
    redis_sentinel_master: str | None = None
    #: The Sentinels' own credentials (`requirepass` / ACL user of the sentinel processes), if they need any.
    redis_sentinel_username: str | None = None
    redis_sentinel_password: SecretStr | None = None
    #: send() waits (WAIT, within redis_timeout_s) until this many replicas have the message; EnqueueError otherwise.
    redis_min_replica_acks: int = Field(default=0, ge=0)
    #: Let a worker start on a Redis that can lose jobs (no AOF and no RDB schedule, or an eviction policy).
    redis_allow_volatile: bool = False

    # Webhooks.
    #: One or more space-separated whsec_ secrets, newest first; decoded once into `webhook_keys`.
    webhook_secret: Annotated[SecretStr, AfterValidator(WebhookSecret.of)] | None = None
    #: The ed25519 `whsk_` secret key: every webhook also carries a `v1a` signature merchants verify with `whpk_`.
    webhook_signing_key: SecretStr | None = None
    #: Which signatures webhooks carry: v1 (HMAC), v1a (ed25519) or both; default both with a signing key.
    webhook_signatures: Literal["v1", "v1a", "both"] | None = None
    #: send() refuses a callback without merchant_id (every merchant has its own key).
    require_merchant_id: bool = False
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
    #: Callback hosts (scheme, host, port) a worker process keeps a connection pool for; the least recently used
    #: one is closed first. Each pool keeps up to the worker's thread count of connections, for one busy merchant.
    webhook_pool_hosts: int = Field(default=256, ge=1)
    #: The most kept-alive webhook connections a worker process leaves open while idle, across all hosts (the
    #: oldest idle one is closed first): with one in use per thread, its bound on webhook file descriptors.
    webhook_idle_connections: int = Field(default=256, ge=0)
    #: A second send() with the same event_id within this window enqueues nothing, in seconds.
    idempotency_window_s: int = Field(default=24 * 3600, gt=0)

    # Merchant breakers (middleware/merchant_breakers.py).
    #: A merchant whose last this many attempts all failed (5xx, 408, 429, timeouts, connection errors) is tripped.
    breaker_failures: int = Field(default=10, ge=1)
    #: An open breaker sends one probe (its oldest parked callback) this often, in milliseconds.
    breaker_probe_interval_ms: int = Field(default=60_000, ge=100, le=MAX_DELAY_MS)
    #: Once a breaker closes, its parked callbacks go back to the queue at most this many per second.
    breaker_release_rate: float = Field(default=50.0, gt=0, le=10_000)
    #: A callback parked longer than this is dead-lettered, in milliseconds (default 3 days).
    park_max_ms: int = Field(default=3 * 24 * 3600 * 1000, gt=0)

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

    # Retry policy per queue: WHISKYPAY_CALLBACK_* for callbackQueue, WHISKYPAY_EMAIL_* for emailQueue.
    callback: QueueRetry = _RETRY_DEFAULTS["callback"]
    email: QueueRetry = _RETRY_DEFAULTS["email"]
    #: The longest wait a merchant's Retry-After header can ask for, in milliseconds (default 1 hour).
    retry_after_max_ms: int = Field(default=3_600_000, ge=0, le=MAX_DELAY_MS)
    #: The longest a message waits in deferrals in a row (not attempted: its merchant's server is saturated by
    #: slow deliveries), in seconds; then it is dead-lettered with the reason (default 1 hour).
    max_deferral_s: int = Field(default=3600, gt=0, le=MAX_DELAY_MS // 1000)

    # Dashboard.
    dashboard_username: str | None = None
    dashboard_password: SecretStr | None = None

    # Scheduler.
    #: check_queue_health opens a "stale" incident when a queue's next message has waited longer, in seconds.
    health_max_wait_s: int = Field(default=300, gt=0)
    #: How long one minute's health-check lock is held, in seconds (makes a second scheduler's run a no-op).
    health_lock_s: int = Field(default=50, gt=0)
    #: Where each worker process keeps its liveness file (read by `whiskypay health --worker`, /healthz, /readyz);
    #: `$TMPDIR/whiskypay-workers` when unset.
    worker_state_dir: str | None = None
    #: The health check reports a merchant breaker open longer than this, in seconds (once per outage).
    health_breaker_open_s: int = Field(default=3600, gt=0)

    # Metrics.
    #: Serve Prometheus metrics from every `dramatiq actors` master (Dramatiq's plus whiskypay_deliveries_*).
    metrics_enabled: bool = False
    #: The port of that /metrics endpoint.
    metrics_port: int = Field(default=9191, gt=0, lt=65536)

    # Logging.
    #: Send a worker process's log lines to the `dramatiq` master in chunks, at most this often, in milliseconds (0:
    #: each line at once, as Dramatiq does). It saves about 0.1 ms of master CPU per webhook, but lengthened the tail
    #: of webhook durations under load (BENCHMARKS.md), so it is off unless set.
    log_batch_ms: int = Field(default=0, ge=0, le=1000)

    # Delivery ledger (whiskypay/ledger.py).
    #: Record every webhook and email attempt, and each job as `pending` at send().
    ledger_enabled: bool = True
    #: How long ledger records are kept, in seconds, counted from a payment's first record (default 7 days).
    ledger_retention_s: int = Field(default=7 * 24 * 3600, gt=0)
    #: The most payments the ledger keeps; a new one beyond it drops the oldest (see README for bytes each).
    ledger_max_payments: int = Field(default=50_000, ge=1)
    #: Replays (`whiskypay resend`, `whiskypay retry`) enter their queue at most this many per second.
    replay_rate: float = Field(default=20.0, gt=0)

    # Validation.
    #: The largest encoded message accepted at send(), in bytes.
    max_message_bytes: int = Field(default=16 * 1024, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _fold_queue_arguments(cls, data: object) -> object:
        # Settings(callback_attempts=7) reads as its variable does (WHISKYPAY_CALLBACK_ATTEMPTS): callback.attempts.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for field in _RETRY_FIELDS:
            if isinstance(data.get(field), str):  # WHISKYPAY_CALLBACK='{"attempts": 7}': the whole policy as JSON
                try:
                    data[field] = json.loads(data[field])
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{field.upper()} is not a JSON object of its parts; set "
                                     f"{ENV_PREFIX}{field.upper()}_ATTEMPTS and the like instead") from None
            parts = {
                name.removeprefix(f"{field}_"): data.pop(name) for name in list(data)
                if name.startswith(f"{field}_") and name.removeprefix(f"{field}_") in QueueRetry.model_fields
            }
            if parts:
                given = data.get(field)
                data[field] = {**(given.model_dump() if isinstance(given, QueueRetry) else given or {}), **parts}
        return data

    @field_validator(*_RETRY_FIELDS, mode="before")
    @classmethod
    def _over_queue_defaults(cls, value: object, info: ValidationInfo) -> object:
        # A variable that sets one part of a policy keeps the queue's defaults for the others.
        if isinstance(value, dict) and info.field_name is not None:
            return {**_RETRY_DEFAULTS[info.field_name].model_dump(), **value}
        return value

    @field_validator("webhook_signing_key")
    @classmethod
    def _signing_key_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from whiskypay.ed25519 import parse_secret_key  # cryptography loads only when ed25519 is configured

            parse_secret_key(value.get_secret_value())
        return value

    @field_validator("webhook_signatures")
    @classmethod
    def _signatures_have_keys(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value in ("v1a", "both") and info.data.get("webhook_signing_key") is None:
            raise ValueError(
                f"{value} needs WHISKYPAY_WEBHOOK_SIGNING_KEY (`whiskypay secret --ed25519` prints a key pair)"
            )
        return value

    def signature_kinds(self) -> Literal["v1", "v1a", "both"]:
        """Return which signatures webhooks carry: WHISKYPAY_WEBHOOK_SIGNATURES, else both with a signing key."""
        if self.webhook_signatures is not None:
            return self.webhook_signatures
        return "both" if self.webhook_signing_key is not None else "v1"

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: SecretStr) -> SecretStr:
        check_redis_url(value.get_secret_value())
        return value

    @field_validator("sentry_dsn")
    @classmethod
    def _sentry_dsn_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_sentry_dsn(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _sentinels_name_their_master(self) -> Settings:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            missing = "REDIS_SENTINEL_MASTER" if self.redis_sentinels else "REDIS_SENTINELS"
            raise ValueError(
                f"{ENV_PREFIX}REDIS_SENTINELS and {ENV_PREFIX}REDIS_SENTINEL_MASTER go together: set "
                f"{ENV_PREFIX}{missing} too, or unset both to use {ENV_PREFIX}REDIS_URL alone"
            )
        if self.redis_sentinels and self.redis_url.get_secret_value().startswith("unix://"):
            raise ValueError(
                f"{ENV_PREFIX}REDIS_URL is a unix:// socket, which Sentinel cannot point at; give a redis:// or "
                "rediss:// URL (only its credentials, database and scheme are used with Sentinel)"
            )
        return self

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

    @property
    def webhook_keys(self) -> tuple[bytes, ...]:
        """The HMAC keys of webhook_secret, newest first (decoded when the settings were read); () without one."""
        return self.webhook_secret.keys if isinstance(self.webhook_secret, WebhookSecret) else ()

    @functools.cached_property
    def retry_policies(self) -> dict[str, RetryPolicy]:
        """Each queue's RetryPolicy (callbackQueue, emailQueue), built once."""
        return {queue: getattr(self, field).policy() for field, queue in _RETRY_FIELDS.items()}


def variable_names() -> frozenset[str]:
    """Return every environment variable the settings read (WHISKYPAY_CALLBACK_ATTEMPTS is callback.attempts)."""
    names = set()
    for field in Settings.model_fields:
        parts = QueueRetry.model_fields if field in _RETRY_FIELDS else ("",)
        names |= {f"{ENV_PREFIX}{field}_{part}".rstrip("_").upper() for part in parts}
    return frozenset(names)


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's error into a `ConfigurationError` that names each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = "_".join(str(part) for part in error["loc"]) or "?"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{ENV_PREFIX}{field.upper()}: {message}" if error["loc"] else message)
        raise ConfigurationError(
            "Invalid configuration:\n  " + "\n  ".join(problems) + "\nFix these environment variables (or .env)."
        ) from None


@functools.cache
def get_settings() -> Settings:
    """Return the process's settings, read once."""
    return load_settings()
