"""The broker factory: the one place that lists every middleware, in order."""

from __future__ import annotations

from typing import TypeVar

import redis
from dramatiq import Broker, Middleware
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, CurrentMessage, Pipelines, ShutdownNotifications, TimeLimit

from middleware.dead_letters import DeadLetterReasons
from middleware.http_client import HttpClients
from middleware.idempotency import IdempotentEnqueue
from middleware.retry_policy import QueueRetryPolicy
from middleware.sentry import SentryReporting
from middleware.signing import WebhookSigning
from middleware.smtp_client import SmtpClients
from middleware.validation import PayloadValidation
from settings import Settings
from whiskypay.queues import Queue
from whiskypay.redaction import install_log_redaction
from whiskypay.retrying import policies_from_settings
from whiskypay.schemas import CallbackArgs, EmailArgs

M = TypeVar("M", bound=Middleware)


def redis_client(settings: Settings) -> redis.Redis:
    """Return a Redis client for the broker URL with bounded connect and read timeouts."""
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
        socket_keepalive=True,
    )


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Return every secret value of settings, for scrubbing."""
    values = [settings.redis_url.get_secret_value() if "@" in settings.redis_url.get_secret_value() else ""]
    client = redis_client(settings)
    password = client.connection_pool.connection_kwargs.get("password")
    values.append(password or "")
    for secret in (settings.webhook_secret, settings.smtp_password, settings.sentry_dsn):
        if secret is not None:
            values.append(secret.get_secret_value())
            values.extend(secret.get_secret_value().split())
    return tuple(value for value in values if value)


def build_broker(settings: Settings) -> RedisBroker:
    """Build the RedisBroker every process uses (gateway, workers, scheduler, dashboard, tests)."""
    middleware: list[Middleware] = [
        # Dramatiq's defaults, minus Retries (QueueRetryPolicy below takes its place).
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        CurrentMessage(),
        # Per-process clients: opened lazily per thread, closed after the worker threads joined.
        HttpClients(
            allow_private=settings.allow_private_callbacks,
            connect_timeout_s=settings.webhook_connect_timeout_s,
            read_timeout_s=settings.webhook_read_timeout_s,
            max_response_bytes=settings.webhook_max_response_bytes,
        ),
        SmtpClients(
            host=settings.smtp_host,
            port=settings.smtp_port,
            tls=settings.smtp_tls,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            timeout_s=settings.smtp_timeout_s,
            mail_from=settings.mail_from,
        ),
        # before_enqueue runs in list order: validate first, so an invalid send never reserves its event_id
        # and a duplicate never gets a webhook_id; before_process_message dead-letters invalid messages
        # before anything else looks at them.
        PayloadValidation(
            schemas={"send_callback": CallbackArgs, "send_email": EmailArgs},
            https_only=settings.callback_https_only,
            max_message_bytes=settings.max_message_bytes,
        ),
        IdempotentEnqueue(window_s=settings.idempotency_window_s),
        WebhookSigning(keys=settings.webhook_keys()),
        # after_* hooks run in reverse list order: QueueRetryPolicy (last) decides retry or fail first, then
        # DeadLetterReasons stores the reason of a failure, then SentryReporting reports it, once.
        SentryReporting(
            dsn=settings.sentry_dsn.get_secret_value() if settings.sentry_dsn else None,
            environment=settings.environment,
            release=settings.release,
            secrets=secrets_of(settings),
        ),
        DeadLetterReasons(),
        QueueRetryPolicy(policies=policies_from_settings(settings), retry_after_max_ms=settings.retry_after_max_ms),
    ]
    install_log_redaction(list(Queue))
    return RedisBroker(
        client=redis_client(settings),
        namespace=settings.namespace,
        dead_message_ttl=settings.dead_letter_ttl_ms,
        middleware=middleware,
    )


def middleware_of(broker: Broker, kind: type[M]) -> M:
    """Return broker's middleware instance of kind; raise with a fix-it message if it is missing."""
    for middleware in broker.middleware:
        if isinstance(middleware, kind):
            return middleware
    raise RuntimeError(f"{kind.__name__} is not on the broker; build it with whiskypay.broker.build_broker().")
