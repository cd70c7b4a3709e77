"""WebhookSigning: Standard Webhooks signatures on every callback attempt, and a stable webhook-id per event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.common import q_name
from dramatiq.logging import get_logger

from whiskypay.errors import WorkerStartRefused
from whiskypay.queues import Queue, consumes
from whiskypay.signing import signature_headers, webhook_id

__all__ = ["WebhookSigning", "WorkerStartRefused"]


class WebhookSigning(Middleware):
    """Give each callback message a `webhook_id` at enqueue and sign each attempt with a fresh timestamp.

    The id is `whiskypay.signing.webhook_id`'s (the event_id, else `msg_<message id>`); it is stored in the
    message's options, so every retry (and a re-drive from the dead-letter queue) carries the same id. A worker that
    consumes callbackQueue refuses to start without a key.

    Parameters:
      keys: HMAC keys, newest first (one signature each, for rotation).
      clock: Unix seconds; injected for tests.
    """

    def __init__(self, *, keys: tuple[bytes, ...], clock: Callable[[], float] = time.time) -> None:
        self.logger = get_logger(__name__, type(self))
        self.keys = keys
        self.clock = clock

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        if consumes(worker, Queue.CALLBACKS) and not self.keys:
            raise WorkerStartRefused(
                "WHISKYPAY_WEBHOOK_SECRET is not set: the callback worker signs every webhook and will not start "
                "without a key. Set it to one or more space-separated whsec_<base64> secrets "
                "(`whiskypay secret` prints a new one)."
            )

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        if q_name(message.queue_name) == Queue.CALLBACKS and "webhook_id" not in message.options:
            message.options["webhook_id"] = webhook_id(message.message_id, message.kwargs.get("event_id"))

    def headers(self, msg_id: str, body: bytes) -> dict[str, str]:
        """Return this attempt's webhook-id (msg_id), webhook-timestamp and webhook-signature headers for body."""
        return signature_headers(self.keys, msg_id, int(self.clock()), body)
