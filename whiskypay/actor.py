"""WhiskyPayActor: Dramatiq's Actor with idempotent sends and a clear error when Redis refuses a job."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import redis
from dramatiq import Actor, Message

from middleware.idempotency import IdempotentEnqueue
from whiskypay.errors import DuplicateEvent, EnqueueError, InvalidPayload
from whiskypay.redis_broker import WhiskyPayRedisBroker

__all__ = ["EnqueueError", "WhiskyPayActor"]


class WhiskyPayActor(Actor[Any, Any]):
    """An actor whose `send()` returns the first message for a duplicate event_id and names Redis failures."""

    def _release_event_id(self, message: Message[Any]) -> None:
        for middleware in self.broker.middleware:
            if isinstance(middleware, IdempotentEnqueue):
                try:
                    middleware.release(self.broker, message)
                except redis.RedisError:
                    pass

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> Message[Any]:
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        message = self.message_with_options(args=args, kwargs=kwargs, **options)
        try:
            return self.broker.enqueue(message, delay=delay)
        except DuplicateEvent as exc:
            self.logger.info("Not enqueued: %s.", exc)
            if isinstance(self.broker, WhiskyPayRedisBroker):
                # The first send may have raised NotReplicated: this one succeeds only once replicas have it too.
                self.broker.confirm_replicated(message.queue_name)
            return message
        except InvalidPayload:
            self._release_event_id(message)
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._release_event_id(message)
            raise EnqueueError(
                f"{self.actor_name}: the job was not accepted, Redis is unreachable ({type(exc).__name__}). "
                "Check WHISKYPAY_REDIS_URL and that Redis is up, then send again."
            ) from None
