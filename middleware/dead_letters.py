"""DeadLetterReasons: a failed message goes to the dead-letter queue carrying its last error and failure time."""

from __future__ import annotations

import time

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.logging import get_logger


class DeadLetterReasons(Middleware):
    """Write a failed message's options (last error, attempts, failed_at) into Redis before it is dead-lettered.

    Dramatiq's Redis broker moves the message *as it was enqueued* to the dead-letter queue, so without this
    the reason of the final failure is lost. Listed before the middleware that fail messages, so its
    after-hooks run after theirs.
    """

    def __init__(self) -> None:
        self.logger = get_logger(__name__, type(self))

    def _persist(self, broker: Broker, message: MessageProxy) -> None:
        redis_id = message.options.get("redis_message_id")
        if not message.failed or not isinstance(broker, RedisBroker) or not redis_id:
            return
        message.options["failed_at"] = int(time.time() * 1000)
        key = f"{broker.namespace}:{message.queue_name}.msgs"
        if broker.client.hexists(key, redis_id):
            broker.client.hset(key, redis_id, message.encode())

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        self._persist(broker, message)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._persist(broker, message)
