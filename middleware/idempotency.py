"""IdempotentEnqueue: a second send() with the same event_id within the window enqueues nothing."""

from __future__ import annotations

from typing import Any

from dramatiq import Broker, Message, Middleware
from dramatiq.logging import get_logger

from whiskypay import keys
from whiskypay.errors import DuplicateEvent
from whiskypay.redis_broker import Reservation, WhiskyPayRedisBroker

__all__ = ["DuplicateEvent", "IdempotentEnqueue"]


class IdempotentEnqueue(Middleware):
    """Reserve `event_id` (SET NX with a TTL) in the enqueue's own Lua call; refuse a second message with it.

    The reservation is scoped by actor and `merchant_id`: two merchants' equal event ids are two events.

    This hook only names the key: WhiskyPayRedisBroker reserves it and enqueues in one call, so a reservation
    that fails enqueues nothing (`send()` raises EnqueueError) and an enqueue that fails leaves no reservation.
    The reservation holds the first message's id, so that message's own retries and delayed moves pass; a
    second message gets DuplicateEvent, which `WhiskyPayActor.send` turns into the first message.

    Parameters:
      window_s: How long an event_id stays reserved, in seconds.
    """

    def __init__(self, *, window_s: int) -> None:
        self.logger = get_logger(__name__, type(self))
        self.window_s = window_s

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        event_id = message.kwargs.get("event_id")
        if not event_id or not isinstance(broker, WhiskyPayRedisBroker):
            return
        merchant_id = message.kwargs.get("merchant_id")
        key = keys.event_reservation(broker.namespace, message.actor_name, merchant_id, str(event_id))
        what = f"{message.actor_name}: event_id {event_id!r}" + (f" of merchant {merchant_id!r}" if merchant_id else "")
        broker.reserve_on_enqueue(message, Reservation(key=key, ttl_s=self.window_s, what=what))
