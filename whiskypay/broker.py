"""The broker factory: the one place that lists every middleware, in order."""

from __future__ import annotations

import os
import time
from importlib.metadata import version
from typing import Any, TypeVar

import redis
from dramatiq import Broker, Middleware
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, CurrentMessage, Pipelines, ShutdownNotifications, TimeLimit
from redis.connection import parse_url
from redis.sentinel import Sentinel

from middleware.dead_letters import DeadLetterReasons
from middleware.durable_redis import DurableRedis
from middleware.http_client import HttpClients
from middleware.idempotency import IdempotentEnqueue
from middleware.ledger import DeliveryLedger
from middleware.log_batching import LogBatching
from middleware.merchant_breakers import MerchantBreakers
from middleware.outcome_counters import OutcomeCounters
from middleware.periodic import PeriodicTicks
from middleware.retry_policy import QueueRetryPolicy
from middleware.sentry import SentryReporting
from middleware.signing import WebhookSigning
from middleware.smtp_client import SmtpClients
from middleware.validation import PayloadValidation
from middleware.worker_liveness import WorkerLiveness
from settings import Settings, get_settings
from whiskypay.queues import Queue
from whiskypay.redaction import install_log_redaction, url_password
from whiskypay.redis_broker import WhiskyPayRedisBroker
from whiskypay.schemas import CallbackArgs, EmailArgs
from whiskypay.smtp import SmtpRelay
from whiskypay.worker_health import assess_workers, read_beats, state_dir

M = TypeVar("M", bound=Middleware)


def redis_client(settings: Settings) -> redis.Redis:
    """Return a Redis client on the primary, with bounded connect and read timeouts.

    With WHISKYPAY_REDIS_SENTINELS it is a Sentinel-managed client: every new connection asks the Sentinels where
    the primary is, and a connection that finds a demoted primary (READONLY) or a dead one is dropped, so the
    process follows a failover without a restart. WHISKYPAY_REDIS_URL then gives only the primary's username,
    password, database and TLS (rediss://).
    """
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
    }
    url = settings.redis_url.get_secret_value()
    if not settings.redis_sentinels:
        return redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True, **timeouts)
    assert settings.redis_sentinel_master is not None  # the settings insist on both
    parts = parse_url(url)
    sentinel_password = settings.redis_sentinel_password
    sentinel = Sentinel(
        list(settings.redis_sentinels),
        sentinel_kwargs={
            **timeouts,
            "username": settings.redis_sentinel_username,
            "password": sentinel_password.get_secret_value() if sentinel_password else None,
        },
        **timeouts,
    )
    client: redis.Redis = sentinel.master_for(
        settings.redis_sentinel_master,
        username=parts.get("username"),
        password=parts.get("password"),
        db=parts.get("db", 0),
        ssl=url.startswith("rediss://"),
        health_check_interval=30,
        socket_keepalive=True,
    )
    return client


def smtp_relay(settings: Settings) -> SmtpRelay:
    """Return the SMTP relay the settings describe (the workers' and `whiskypay check`'s)."""
    return SmtpRelay(
        host=settings.smtp_host,
        port=settings.smtp_port,
        tls=settings.smtp_tls,
        username=settings.smtp_username,
        password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
        timeout_s=settings.smtp_timeout_s,
        ca_file=settings.smtp_ca_file,
    )


def replica_ack_timeout_ms(settings: Settings) -> int:
    """Return how long send() waits for replica acknowledgements: 80% of the Redis timeout, so the WAIT's answer
    arrives before the socket gives up on it."""
    return max(1, int(settings.redis_timeout_s * 1000 * 0.8))


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Return every secret value of settings, for scrubbing."""
    url = settings.redis_url.get_secret_value()
    values = [url if "@" in url else "", url_password(url) or ""]
    for secret in (settings.webhook_secret, settings.webhook_signing_key, settings.smtp_password, settings.sentry_dsn,
                   settings.redis_sentinel_password):
        if secret is not None:
            values.append(secret.get_secret_value())
            values.extend(secret.get_secret_value().split())
    return tuple(value for value in values if value)


def sentry_release(settings: Settings) -> str | None:
    """Return the release Sentry events carry: WHISKYPAY_RELEASE, else the installed package's version.

    The version is read (the package metadata parsed) only when a DSN is set: without one nothing is stamped.
    """
    if settings.release or not settings.sentry_dsn:
        return settings.release
    return f"whiskypay-workers@{version('whiskypay-workers')}"


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
        # In EVERY process, not just the scheduler: `periodic=` is an actor option only this middleware declares
        # (without it, declaring check_queue_health fails with "actor options are undefined"), and in workers it
        # skips and acks scheduled messages older than 30 s (a backlog after downtime does not run N times).
        # periodiq's PeriodiqMiddleware does the same, but periodiq (with pendulum) is 2 MiB a worker process.
        PeriodicTicks(skip_delay_s=30),
        # Worker boot only (never at `import actors`, which the gateway does): refuse a Redis that can lose jobs,
        # and check again whenever the server changes (a Sentinel failover, a restart).
        DurableRedis(allow_volatile=settings.redis_allow_volatile),
        # The liveness file `whiskypay health --worker` and /healthz, /readyz read.
        WorkerLiveness(state_dir=state_dir(settings.worker_state_dir)),
        OutcomeCounters(),  # early in the list, so its after-hooks run once every later one decided `failed`
        # Per-process clients, closed after the worker threads joined: the webhook pool (every thread shares it) is
        # opened in before_worker_boot, SMTP connections lazily per thread.
        HttpClients(
            allow_private=settings.allow_private_callbacks,
            connect_timeout_s=settings.webhook_connect_timeout_s,
            read_timeout_s=settings.webhook_read_timeout_s,
            max_response_bytes=settings.webhook_max_response_bytes,
            host_concurrency=settings.webhook_host_concurrency,
            slow_after_s=settings.webhook_slow_after_s,
            pool_hosts=settings.webhook_pool_hosts,
            idle_connections=settings.webhook_idle_connections,
        ),
        SmtpClients(relay=smtp_relay(settings), mail_from=settings.mail_from),
        # before_enqueue runs in list order: validate first, so an invalid send never names a reservation;
        # IdempotentEnqueue only names the event_id key, which the broker reserves in the enqueue's own Lua
        # call; before_process_message dead-letters invalid messages before anything else looks at them.
        PayloadValidation(
            schemas={"send_callback": CallbackArgs, "send_email": EmailArgs},
            https_only=settings.callback_https_only,
            required_at_send={"send_callback": ("merchant_id",)} if settings.require_merchant_id else {},
        ),
        IdempotentEnqueue(window_s=settings.idempotency_window_s),
        WebhookSigning(
            keys=settings.webhook_keys,
            signing_key=settings.webhook_signing_key.get_secret_value() if settings.webhook_signing_key else None,
            signatures=settings.signature_kinds(),
        ),
        # The delivery ledger: after WebhookSigning, so the pending record it stages at enqueue carries the
        # webhook_id; before QueueRetryPolicy, so its after_process_message sees the retry-or-fail decision.
        # It writes each attempt in after_ack/after_nack, once the message is acked.
        *(
            [DeliveryLedger(retention_s=settings.ledger_retention_s, max_payments=settings.ledger_max_payments)]
            if settings.ledger_enabled
            else []
        ),
        # QueueRetryPolicy is last, so its after_process_message runs first (after_* hooks run in reverse):
        # it decides retry or fail before anything looks at `message.failed`. SentryReporting and
        # DeadLetterReasons act in before_nack, which every dead-lettered message passes once, in this order:
        # report first, then store the reason with the message in the dead-letter queue.
        SentryReporting(
            dsn=settings.sentry_dsn.get_secret_value() if settings.sentry_dsn else None,
            environment=settings.environment,
            release=sentry_release(settings),
            secrets=secrets_of(settings),
        ),
        DeadLetterReasons(),
        QueueRetryPolicy(policies=settings.retry_policies, retry_after_max_ms=settings.retry_after_max_ms,
                         max_deferral_ms=settings.max_deferral_s * 1000),
    ]
    if settings.log_batch_ms:
        # First, so its after_worker_shutdown runs last (after_* hooks run in reverse): the lines the others log while
        # the worker stops are sent with the rest. Worker processes only (after_process_boot).
        middleware.insert(0, LogBatching(interval_s=settings.log_batch_ms / 1000))
    if settings.metrics_enabled:
        # Appended last: their after-hooks run first, so DeliveryMetrics counts outcomes in after_ack/after_nack,
        # once QueueRetryPolicy has decided. MetricsExporter (Dramatiq's Prometheus) serves both on metrics_port.
        # Imported only when enabled: a worker without metrics does not load http.server and Dramatiq's Prometheus.
        from middleware.delivery_metrics import DeliveryMetrics
        from middleware.metrics_exporter import MetricsExporter

        middleware += [MetricsExporter(fork=serve_metrics), DeliveryMetrics(queues=(Queue.CALLBACKS, Queue.EMAIL))]
    # Last of all, so its after_process_message runs first: it counts a merchant's failure and parks the callback
    # (marked `parked`) before QueueRetryPolicy decides, which then leaves a parked callback alone. Its
    # before_process_message runs after every other one (an invalid message is dead-lettered before it is parked).
    middleware.append(
        MerchantBreakers(
            failures=settings.breaker_failures,
            probe_interval_ms=settings.breaker_probe_interval_ms,
            release_rate=settings.breaker_release_rate,
            park_max_ms=settings.park_max_ms,
            callback_queue=Queue.CALLBACKS,
        )
    )
    install_log_redaction(list(Queue))
    return WhiskyPayRedisBroker(
        client=redis_client(settings),
        namespace=settings.namespace,
        dead_message_ttl=settings.dead_letter_ttl_ms,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        maintenance_interval_ms=settings.maintenance_interval_ms,
        max_message_bytes=settings.max_message_bytes,
        min_replica_acks=settings.redis_min_replica_acks,
        replica_ack_timeout_ms=replica_ack_timeout_ms(settings),
        replay_rate=settings.replay_rate,
        middleware=middleware,
    )


def serve_metrics() -> int:
    """Serve /metrics, /healthz and /readyz on WHISKYPAY_METRICS_PORT: the fork MetricsExporter starts from every
    `dramatiq` master.

    The master imports a fork by name and calls it without arguments, so it reads the settings itself. The probes
    look at this master's worker processes only (the fork is their sibling: same parent).
    """
    from middleware.metrics_exporter import QueueGauge, QueueGauges, serve_metrics_on
    from whiskypay.breakers import BreakerStore
    from whiskypay.queue_stats import queue_counts

    settings = get_settings()
    client = redis_client(settings)
    directory = state_dir(settings.worker_state_dir)
    timeout_s = settings.heartbeat_timeout_ms / 1000

    def read_gauges() -> list[QueueGauge]:
        gauges = []
        for queue in (Queue.CALLBACKS, Queue.EMAIL):
            counts = queue_counts(client, settings.namespace, queue)
            wait_s = counts.oldest_wait_ms / 1000 if counts.oldest_wait_ms is not None else None
            gauges.append(QueueGauge(queue=str(queue), oldest_wait_s=wait_s, dead_letters=counts.dead_letters))
        return gauges

    def read_breakers() -> tuple[int, int]:
        breakers = BreakerStore(client, settings.namespace).snapshot().values()
        return sum(1 for b in breakers if b.state == "open"), sum(b.parked for b in breakers)

    def liveness() -> tuple[bool, str]:
        return assess_workers(read_beats(directory), now=time.time(), heartbeat_timeout_s=timeout_s,
                              master_pid=os.getppid())

    def readiness() -> tuple[bool, str]:
        try:
            client.ping()
        except redis.RedisError as exc:
            return False, f"Redis does not answer ({type(exc).__name__})"
        return assess_workers(read_beats(directory), now=time.time(), heartbeat_timeout_s=timeout_s,
                              master_pid=os.getppid(), need_consumers=True)

    return serve_metrics_on(settings.metrics_port, gauges=QueueGauges(read_gauges, read_breakers), liveness=liveness,
                            readiness=readiness)


def middleware_of(broker: Broker, kind: type[M]) -> M:
    """Return broker's middleware instance of kind; raise with a fix-it message if it is missing."""
    for middleware in broker.middleware:
        if isinstance(middleware, kind):
            return middleware
    raise RuntimeError(f"{kind.__name__} is not on the broker; build it with whiskypay.broker.build_broker().")
