"""`whiskypay health [--worker]`: exit 0 when this process's view is healthy, 1 otherwise, with one line why.

For container healthchecks and probes (docker/compose.yaml). Without --worker: the settings load and Redis answers
PING (through the Sentinels when they are configured). With --worker also: a worker process on this host rewrote
its liveness file within the heartbeat timeout, and its threads are not all stuck past their time limit
(`whiskypay.worker_health`). It never imports `actors`, so it needs no worker configuration.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from whiskypay.redaction import redact_url
from whiskypay.worker_health import assess_workers, read_beats, state_dir

if TYPE_CHECKING:
    from settings import Settings


def redis_view(settings: Settings) -> tuple[bool, str]:
    """Return (Redis answers, one line): PING through the broker's own client (Sentinel-managed if configured)."""
    import redis

    from whiskypay.broker import redis_client

    where = (f"the primary {settings.redis_sentinel_master!r} of Sentinels "
             + ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
             if settings.redis_sentinels else f"Redis at {redact_url(settings.redis_url.get_secret_value())}")
    client = redis_client(settings)
    started = time.monotonic()
    try:
        client.ping()
    except redis.RedisError as exc:
        return False, f"{where} does not answer ({type(exc).__name__}); check that it runs and WHISKYPAY_REDIS_*"
    finally:
        client.close()
    return True, f"{where} answers ({(time.monotonic() - started) * 1000:.1f} ms)"


def workers_view(settings: Settings, *, now: float | None = None) -> tuple[bool, str]:
    """Return (healthy, one line) for the worker processes of this host (their liveness files)."""
    beats = read_beats(state_dir(settings.worker_state_dir))
    return assess_workers(beats, now=time.time() if now is None else now,
                          heartbeat_timeout_s=settings.heartbeat_timeout_ms / 1000)


def health_view(settings: Settings, *, worker: bool) -> tuple[bool, str]:
    """Return (healthy, one line saying why) for `whiskypay health`."""
    ok, line = redis_view(settings)
    if not ok or not worker:
        return ok, line
    ok, workers = workers_view(settings)
    return ok, f"{line}; {workers}" if ok else workers


def health(args: argparse.Namespace) -> int:
    """Print "healthy: ..." and return 0, or "unhealthy: ..." and return 1."""
    from settings import ConfigurationError, get_settings

    try:
        settings = get_settings()
    except ConfigurationError as exc:
        print(f"unhealthy: {' '.join(str(exc).split())}")
        return 1
    ok, line = health_view(settings, worker=args.worker)
    print(f"{'healthy' if ok else 'unhealthy'}: {line}")
    return 0 if ok else 1


def register(commands: Any) -> None:
    """Add `health` to the `whiskypay` command."""
    p = commands.add_parser("health", help="exit 0 if Redis answers (and, with --worker, a worker here is alive)")
    p.add_argument("--worker", action="store_true",
                   help="also require a live, unstuck worker process on this host (for worker healthchecks)")
    p.set_defaults(handler=health)
