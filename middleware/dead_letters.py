"""DeadLetterReasons: a failed message goes to the dead-letter queue carrying its last error and failure time."""

from __future__ import annotations

import time
from functools import partial

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.logging import get_logger

from whiskypay import keys
from whiskypay.outcomes import record_failure
from whiskypay.redis_errors import call_through_transient


class DeadLetterReasons(Middleware):
    """Write a failed message's options (last error, attempts, failed_at) into Redis before it is dead-lettered.

    Dramatiq's Redis broker moves the message *as it was enqueued* to the dead-letter queue, so without this
    the reason of the final failure is lost. It runs in `before_nack`, the one hook every failure path passes
    (a spent retry policy, an invalid message, an actor this process does not know), so a message without a
    reason yet gets the exception Dramatiq stored on it.
    """

    def __init__(self) -> None:
        self.logger = get_logger(__name__, type(self))

    def before_nack(self, broker: Broker, message: MessageProxy) -> None:
        redis_id = message.options.get("redis_message_id")
        if not isinstance(broker, RedisBroker) or not redis_id:
            return
        if "traceback" not in message.options:
            record_failure(message, getattr(message, "_exception", None))
        message.options["failed_at"] = int(time.time() * 1000)
        key = keys.messages(broker.namespace, message.queue_name)
        client, encoded = broker.client, message.encode()
        what = f"the dead-letter reason of message {message.message_id}"
        # Waits out transient errors (OOM, READONLY) like the nack that follows, so the reason is not lost.
        if call_through_transient(partial(client.hexists, key, redis_id), what=what, logger=self.logger):
            call_through_transient(partial(client.hset, key, redis_id, encoded), what=what, logger=self.logger)
