"""OutcomeCounters: count completed and finally failed messages per queue, for `whiskypay status`."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name
from dramatiq.logging import get_logger

#: The counters' hash is `<namespace>:whiskypay.stats:<queue>`, with fields `completed`, `failed` (counts)
#: and `started_at` (unix seconds of the first count: the counts are "since" then).
STATS_KEY = "whiskypay.stats"


def stats_key(namespace: str, queue_name: str) -> str:
    """Return the Redis key of queue_name's counters hash (a delay queue counts as its queue)."""
    return f"{namespace}:{STATS_KEY}:{q_name(queue_name)}"


class OutcomeCounters(Middleware):
    """HINCRBY `completed` when a message succeeds and `failed` when it is failed (dead-lettered) for good.

    Dramatiq keeps no count of completed messages, so this does. An attempt that will be retried counts as
    neither. Listed before the middleware that decide `message.failed`, so its after-hooks run after theirs.
    A Redis error here never breaks processing: the count is lost and logged at debug level, once.

    Parameters:
      clock: Unix seconds, for `started_at`; injected for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.logger = get_logger(__name__, type(self))
        self.clock = clock
        self._error_logged = False

    def _count(self, broker: Broker, message: MessageProxy, field: str) -> None:
        if not isinstance(broker, RedisBroker):
            return
        key = stats_key(broker.namespace, message.queue_name)
        try:
            pipe = broker.client.pipeline(transaction=False)
            pipe.hincrby(key, field, 1)
            pipe.hsetnx(key, "started_at", int(self.clock()))
            pipe.execute()
        except redis.RedisError as exc:  # a lost count must never fail or retry the message
            if not self._error_logged:
                self._error_logged = True
                self.logger.debug("Could not count a %s message in %s: %s", field, key, type(exc).__name__)

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        if exception is None:
            self._count(broker, message, "completed")
        elif message.failed:
            self._count(broker, message, "failed")

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.failed:
            self._count(broker, message, "failed")
