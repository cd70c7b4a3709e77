"""WhiskyPayActor: Dramatiq's Actor with idempotent sends and a clear error when Redis refuses a job."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import redis
from dramatiq import Actor, Message

from whiskypay.errors import DuplicateEvent, EnqueueError
from whiskypay.redis_broker import WhiskyPayRedisBroker
from whiskypay.redis_errors import classify_redis_error, error_code

__all__ = ["EnqueueError", "WhiskyPayActor"]


class WhiskyPayActor(Actor[Any, Any]):
    """An actor whose `send()` returns the first message for a duplicate event_id and names Redis failures.

    Every send is one call to Redis (WhiskyPayRedisBroker.do_enqueue): the event_id reservation, the message
    and the wake-up together, so `send()` answers within WHISKYPAY_REDIS_TIMEOUT_S; any Redis error raises
    EnqueueError with nothing enqueued and no reservation left behind. (NotReplicated, an EnqueueError raised
    when WHISKYPAY_REDIS_MIN_REPLICA_ACKS replicas did not confirm in time, is the exception: the primary has
    the job and its reservation.)
    """

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
            try:
                if isinstance(self.broker, WhiskyPayRedisBroker):
                    # The first send may have raised NotReplicated: this one succeeds only once replicas have it.
                    self.broker.confirm_replicated(message.queue_name)
            except redis.RedisError as redis_exc:
                raise self._not_accepted(redis_exc) from None
            return message.copy(message_id=exc.holder)
        except redis.RedisError as exc:
            raise self._not_accepted(exc) from None

    def _not_accepted(self, exc: redis.RedisError) -> EnqueueError:
        if classify_redis_error(exc) == "transient":
            problem = "Redis is unreachable or not accepting writes for now"
            fix = "Check WHISKYPAY_REDIS_URL and that Redis is up (not full, not a replica), then send again."
        else:
            problem = "Redis refused it"
            fix = ("Check that the Redis user of WHISKYPAY_REDIS_URL may run every command and that nothing else "
                   "writes to the namespace's keys, then send again.")
        # The class and the reply's code only: the library's text can carry the host and port.
        code = error_code(exc)
        name = type(exc).__name__
        what = f"{name} {code}" if code and code.lower() not in name.lower() else name
        return EnqueueError(f"{self.actor_name}: the job was not accepted, {problem} ({what}). {fix}")
