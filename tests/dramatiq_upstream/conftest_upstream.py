"""The conftest.py for Dramatiq's own tests/test_redis.py, run against WhiskyPayRedisBroker on a private Redis.

tests/test_dramatiq_upstream.py copies this file, as conftest.py, next to the test_redis.py it extracts from the
installed Dramatiq's source distribution (which ships neither a conftest.py nor tests/common.py). It provides the
fixtures test_redis.py asks for, as Dramatiq's own conftest does, with two differences:

- The broker is ours: `WhiskyPayRedisBroker` (namespace "dramatiq", the keys the tests read), with Dramatiq's
  default middleware except that `QueueRetryPolicy` takes the place of `Retries`, configured with Retries'
  defaults (20 retries, 15 s first wait, 7 days cap), as in production.
- Redis is a private redis-server started for this run. Dramatiq's fixture flushes the Redis on 127.0.0.1:6379;
  this one never connects there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.middleware import Retries, default_middleware

from middleware.retry_policy import QueueRetryPolicy
from whiskypay.devstack import RedisServer
from whiskypay.redis_broker import WhiskyPayRedisBroker

#: Upstream tests not run, with the reason (also listed in the README).
SKIPPED = {
    "test_redis_broker_can_connect_via_url": (
        "builds a stock RedisBroker on redis://127.0.0.1 (port 6379, the shared Redis this suite never touches); "
        "it tests Dramatiq's constructor, not our broker"
    ),
    "test_redis_broker_can_connect_via_client": (
        "builds a stock RedisBroker on redis.Redis() (port 6379, the shared Redis this suite never touches); "
        "it tests Dramatiq's constructor, not our broker"
    ),
    **{
        f"test_redis_consumer_{operation}_can_retry_on_connection_error": (
            f"a race in the test: it patches do_{operation} only after send(), and our wake-up sometimes has the "
            "message processed before the patch (about 1 run in 8 here; stock Dramatiq polls, so it is slower). "
            "tests/test_redis_broker.py runs the same check with the patch in place first"
        )
        for operation in ("ack", "nack")
    },
}


#: Upstream tests whose log is switched off: 16,000 expected failures, whose tracebacks cost 10 s to format
#: and say nothing the assertions do not.
QUIET = {"test_redis_dead_lettered_messages_are_cleaned_up"}


@pytest.fixture(autouse=True)
def _quiet_expected_failures(request: pytest.FixtureRequest) -> Iterator[None]:
    quiet = getattr(request.node, "originalname", request.node.name) in QUIET
    if quiet:
        logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        if quiet:
            logging.disable(logging.NOTSET)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = SKIPPED.get(getattr(item, "originalname", item.name))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole run."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def redis_broker(redis_server: RedisServer) -> Iterator[WhiskyPayRedisBroker]:
    """Our broker on the private Redis, flushed around each test (it is ours alone), set as the global broker."""
    middleware = [cls() for cls in default_middleware if cls is not Retries]
    middleware.append(QueueRetryPolicy(policies={}, max_retries=20, min_backoff=15_000, max_backoff=7 * 86_400_000))
    broker = WhiskyPayRedisBroker(url=redis_server.url, middleware=middleware)
    broker.client.flushall()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.client.flushall()
    broker.close()


@pytest.fixture()
def redis_worker(redis_broker: WhiskyPayRedisBroker) -> Iterator[Worker]:
    """A started Worker on the broker, as in Dramatiq's conftest."""
    worker = Worker(redis_broker, worker_timeout=100, worker_threads=32)
    worker.start()
    yield worker
    worker.stop()
