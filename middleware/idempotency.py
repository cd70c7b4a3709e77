"""IdempotentEnqueue: a second send() with the same event_id within the window enqueues nothing."""

from __future__ import annotations

from typing import Any

from dramatiq import Broker, Message, Middleware
from dramatiq.brokers.redis import RedisBroker
from dramatiq.logging import get_logger

from whiskypay import keys
from whiskypay.errors import DuplicateEvent


class IdempotentEnqueue(Middleware):
    """Reserve `event_id` in Redis (SET NX with a TTL) at enqueue; refuse a second message with the same one.

    The reservation is scoped by actor and `merchant_id`: two merchants' equal event ids are two events.

    The reservation holds the first message's id, so that message's own retries and delayed moves pass.
    `WhiskyPayActor` releases it again when the enqueue itself fails, so a gateway retry is not swallowed.

    Parameters:
      window_s: How long an event_id stays reserved, in seconds.
    """

    def __init__(self, *, window_s: int) -> None:
        self.logger = get_logger(__name__, type(self))
        self.window_s = window_s

    def _key(self, broker: RedisBroker, message: Message[Any]) -> str:
        merchant_id, event_id = message.kwargs.get("merchant_id"), message.kwargs["event_id"]
        return keys.event_reservation(broker.namespace, message.actor_name, merchant_id, event_id)

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        if not message.kwargs.get("event_id") or not isinstance(broker, RedisBroker):
            return
        key = self._key(broker, message)
        if broker.client.set(key, message.message_id, nx=True, ex=self.window_s):
            return
        holder = broker.client.get(key)
        if holder is not None and keys.text(holder) == message.message_id:
            return
        raise DuplicateEvent(f"{message.actor_name}: event_id {message.kwargs['event_id']!r} was already enqueued")

    def release(self, broker: Broker, message: Message[Any]) -> None:
        """Drop message's reservation if it still holds it (its enqueue failed)."""
        if message.kwargs.get("event_id") and isinstance(broker, RedisBroker):
            key = self._key(broker, message)
            holder = broker.client.get(key)
            if holder is not None and keys.text(holder) == message.message_id:
                broker.client.delete(key)
