"""QueueRetryPolicy: BullMQ-style retries per queue (attempts, exact exponential waits or a schedule).

It takes the place of Dramatiq's Retries middleware, which cannot turn off its jitter (waits of 1x to 2x)
and stores the raw traceback, with URLs and addresses in it, in the message options kept in Redis. The
contract is Dramatiq's: `throws` fails at once, `Retry(delay=...)` sets the next wait, the `retries`
option counts retries, and a message whose retries run out is failed (dead-lettered). Options are read
message first, then actor, then the queue's policy: `max_retries`, `min_backoff` (the first wait, ms),
`max_backoff` (ms) and `retry_schedule` (waits in ms).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from dramatiq import Broker, Message, Middleware, Retry
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.logging import get_logger

from whiskypay.errors import Deferred, DeferredTooLong, HttpStatusError
from whiskypay.outcomes import classify, record_failure
from whiskypay.queues import Queue
from whiskypay.redaction import describe_message
from whiskypay.retrying import DEFAULT_POLICIES, RetryPolicy

#: The policy of a queue that has none of its own (the email queue's defaults).
DEFAULT_POLICY = DEFAULT_POLICIES[Queue.EMAIL]


class QueueRetryPolicy(Middleware):
    """Retry failed messages by their queue's policy, and fail them (dead-letter) when it is spent.

    Parameters:
      policies: Queue name to RetryPolicy; queues without one use `default`.
      default: The policy for other queues.
      retry_after_max_ms: The longest wait a Retry-After header may impose, in milliseconds.
      max_deferral_ms: The longest a message is deferred in a row (`Deferred`: not attempted, no attempt
        counted), in milliseconds; past it the message is dead-lettered with `DeferredTooLong`.
      rand: Randomness for jitter.
      clock: Unix seconds, for the deferral bound.
    """

    def __init__(
        self,
        *,
        policies: Mapping[str, RetryPolicy],
        default: RetryPolicy = DEFAULT_POLICY,
        retry_after_max_ms: int = 3_600_000,
        max_deferral_ms: int = 3_600_000,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.policies = dict(policies)
        self.default = default
        self.retry_after_max_ms = retry_after_max_ms
        self.max_deferral_ms = max_deferral_ms
        self.rand = rand
        self.clock = clock

    @property
    def actor_options(self) -> set[str]:
        return {"max_retries", "min_backoff", "max_backoff", "retry_schedule", "throws"}

    def policy_for(self, broker: Broker, message: MessageProxy) -> RetryPolicy:
        """Return the queue's policy with the actor's and then the message's overrides applied."""
        policy = self.policies.get(q_name(message.queue_name), self.default)
        actor_options = broker.get_actor(message.actor_name).options
        for options in (actor_options, message.options):
            changes: dict[str, Any] = {}
            if "retry_schedule" in options:
                changes["schedule"] = tuple(options["retry_schedule"])
            if "max_retries" in options:
                changes.update(attempts=options["max_retries"] + 1, schedule=())
            if "min_backoff" in options:
                changes["backoff_ms"] = options["min_backoff"]
            if "max_backoff" in options:
                changes["max_backoff_ms"] = options["max_backoff"]
            if changes:
                policy = dataclasses.replace(policy, **changes)
        return policy

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        if exception is None:
            return
        if isinstance(exception, Deferred):
            self._defer(broker, message, exception)
            return
        if classify(message, exception).disposition == "parked":
            return  # MerchantBreakers put it in its merchant's parked list: no retry, no attempt counted
        # An attempt was made: a later deferral starts a new bounded wait.
        message.options.pop("deferred_since", None)
        message.options.pop("deferrals", None)
        actor = broker.get_actor(message.actor_name)
        record_failure(message, exception)
        throws = message.options.get("throws") or actor.options.get("throws")
        if throws and isinstance(exception, throws):
            self.logger.warning("Not retrying %s: %s", describe_message(message), message.options["traceback"])
            message.fail()
            return

        policy = self.policy_for(broker, message)
        retries = message.options.setdefault("retries", 0)
        if retries >= policy.max_retries:
            self.logger.warning(
                "Giving up on %s after %d attempts: %s",
                describe_message(message), retries + 1, message.options["traceback"],
            )
            message.fail()
            return

        if isinstance(exception, Retry) and exception.delay is not None:
            delay = exception.delay
        elif isinstance(exception, HttpStatusError) and exception.retry_after_ms is not None:
            delay = min(exception.retry_after_ms, self.retry_after_max_ms)
        else:
            delay = policy.delay_ms(retries, rand=self.rand)
        message.options["retries"] = retries + 1
        message.options["requeue_timestamp"] = int(self.clock() * 1000)
        self.logger.info("Retrying %s in %d ms (attempt %d failed).", describe_message(message), delay, retries + 1)
        broker.enqueue(cast("Message[Any]", message), delay=delay)

    def _defer(self, broker: Broker, message: MessageProxy, exception: Deferred) -> None:
        """Re-enqueue a deferred message after exception.delay, or dead-letter it once deferred too long."""
        now_ms = int(self.clock() * 1000)
        since = message.options.setdefault("deferred_since", now_ms)
        deferrals = message.options["deferrals"] = message.options.get("deferrals", 0) + 1
        waited_ms = now_ms - since
        if waited_ms >= self.max_deferral_ms:
            record_failure(message, DeferredTooLong(
                f"not attempted: deferred {deferrals} times over {waited_ms / 1000:.0f} s, past the "
                f"{self.max_deferral_ms / 1000:.0f} s limit (WHISKYPAY_MAX_DEFERRAL_S), because {exception}; "
                "re-drive it with `whiskypay retry` once the merchant's server answers faster",
                **exception.tags,
            ))  # fmt: skip
            self.logger.warning("Giving up on %s: %s", describe_message(message), message.options["traceback"])
            message.fail()
            return
        self.logger.debug("Deferring %s by %d ms: %s", describe_message(message), exception.delay, exception)
        broker.enqueue(cast("Message[Any]", message), delay=exception.delay)
