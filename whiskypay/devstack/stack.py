"""local_stack: the whole service on this machine (Redis, SMTP sink, webhook receiver, workers) for `whiskypay dev`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from whiskypay.devstack.receiver import HttpReceiver
from whiskypay.devstack.redis_server import RedisServer, ensure_redis
from whiskypay.devstack.smtp_sink import SmtpSink
from whiskypay.devstack.worker import WorkerProcess
from whiskypay.redaction import redact_url
from whiskypay.redis_durability import durability

#: The project root: where `dramatiq actors` must run so it finds the actors package.
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Stack:
    """A running local stack: Redis, SMTP sink, webhook receiver and worker processes."""

    redis_url: str
    env: dict[str, str]
    sink: SmtpSink
    receiver: HttpReceiver
    workers: WorkerProcess
    redis: RedisServer | None


def _durable(url: str) -> bool:
    """Return True if the Redis at url passes the workers' durability check (warnings allowed)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return not any(finding.level == "failed" for finding in durability(client))
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def local_stack(
    *, redis_url: str | None, private_redis: bool, state_dir: Path, webhook_secret: str, threads: int = 4
) -> Iterator[Stack]:
    """Start Redis (reused if redis_url answers), an SMTP sink, a webhook receiver and real workers.

    Parameters:
      redis_url: A Redis to reuse if it answers; None (or private_redis) starts a private one.
      state_dir: Where the mail (`mail/`) and the workers' log (`workers.log`) are kept.
      webhook_secret: The workers' WHISKYPAY_WEBHOOK_SECRET (`whsec_...`).
      threads: Worker threads of the one worker process.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    # A private Redis gets AOF, so the workers' durability check passes on it as it would in production.
    url, server = ensure_redis(None if private_redis else redis_url, appendonly=True)
    sink = SmtpSink(maildir=str(state_dir / "mail"))
    receiver = HttpReceiver()
    workers: WorkerProcess | None = None
    try:
        sink.start()
        receiver.start()
        env = {
            **os.environ,
            "WHISKYPAY_REDIS_URL": url,
            "WHISKYPAY_SMTP_HOST": sink.host,
            "WHISKYPAY_SMTP_PORT": str(sink.port),
            "WHISKYPAY_SMTP_TLS": "off",
            "WHISKYPAY_MAIL_FROM": os.environ.get("WHISKYPAY_MAIL_FROM", "payments@whiskypay.localhost"),
            "WHISKYPAY_WEBHOOK_SECRET": webhook_secret,
            "WHISKYPAY_ALLOW_PRIVATE_CALLBACKS": "true",
            "WHISKYPAY_CALLBACK_HTTPS_ONLY": "false",
            "WHISKYPAY_ENVIRONMENT": os.environ.get("WHISKYPAY_ENVIRONMENT", "development"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        if server is None and not _durable(url):
            # A reused development Redis that keeps nothing on disk (the usual local install): the dev workers may
            # use it; production workers refuse it (WHISKYPAY_REDIS_ALLOW_VOLATILE stays false there).
            print(f"note: the Redis at {redact_url(url)} can lose jobs (no AOF, no RDB schedule, or an eviction "
                  "policy); the dev workers run with WHISKYPAY_REDIS_ALLOW_VOLATILE=true.")
            env["WHISKYPAY_REDIS_ALLOW_VOLATILE"] = "true"
        workers = WorkerProcess(env=env, cwd=str(ROOT), threads=threads, log_path=str(state_dir / "workers.log"))
        workers.start()
        yield Stack(redis_url=url, env=env, sink=sink, receiver=receiver, workers=workers, redis=server)
    finally:
        if workers is not None:
            workers.stop()
        receiver.stop()
        sink.stop()
        if server is not None:
            server.stop()
