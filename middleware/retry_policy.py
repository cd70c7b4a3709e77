"""QueueRetryPolicy: Dramatiq's Retries contract, with a retry policy per queue and exact waits.

It takes the place of Dramatiq's Retries middleware, which cannot turn off its jitter (waits of 1x to 2x)
and stores the raw traceback, with URLs and addresses in it, in the message options kept in Redis. Every
option of Dramatiq 2.2's Retries works with its meaning:

- `max_retries` (message, then actor, then the queue's policy, then the constructor): retries after the first
  attempt; None retries for ever. `min_backoff` is the first wait in ms (Dramatiq's waits are 1x to 2x of
  min_backoff * 2**retries; ours are exact: min_backoff * 2**retries, or the queue's schedule), `max_backoff`
  caps each wait (ms, at most 7 days).
- `retry_when(retries, exception) -> bool` (actor, then constructor) decides instead of max_retries when set;
  `retries` is the count before this failure.
- `on_retry_exhausted` (message, then actor): the name of an actor sent `(message.asdict(), {"retries": n,
  "max_retries": m})` when retries run out or retry_when says no; n is the count before this failure.
- `throws` (message, then actor): these exceptions fail the message at once, logged at INFO, not counted.
- The `retries` option: +1 on every failure that is not a `throws` one, as in Dramatiq; so after a message's
  retries ran out it holds max_retries + 1. `Retry(delay=...)` sets the next wait.

On top: per-queue policies (`retry_schedule` as an actor or message option too), Retry-After from the merchant
(HttpStatusError.retry_after_ms, capped), `Deferred` (run later without counting an attempt, for at most
max_deferral_ms), the `attempts` option (attempts made so far, written on every failure: what `whiskypay
failed` and Sentry show), and a stored failure text that is scrubbed ("ErrorClass: text") instead of the raw
traceback.
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

#: Retries' `retry_when` predicate: (retries so far, the exception) -> retry again?
RetryWhen = Callable[[int, BaseException], bool]


class QueueRetryPolicy(Middleware):
    """Retry failed messages by their queue's policy, and fail them (dead-letter) when it is spent.

    Parameters:
      policies: Queue name to RetryPolicy; queues without one use `default`.
      default: The policy for other queues.
      max_retries: Retries' option: the retries of queues without a policy (None: keep `default`'s).
      min_backoff: Retries' option: the first wait of queues without a policy, in ms (None: `default`'s).
      max_backoff: Retries' option: the longest wait of queues without a policy, in ms (None: `default`'s).
      retry_when: Retries' option: when set (and no actor sets its own), it alone decides whether to retry.
      retry_after_max_ms: The longest wait a Retry-After header may impose, in milliseconds.
      max_deferral_ms: The longest a message is deferred in a row (`Deferred`: not attempted, no attempt
        counted), in milliseconds; past it the message is dead-lettered with `DeferredTooLong`.
      rand: Randomness for jitter.
      clock: Unix seconds, for the deferral bound.
    """

    def __init__(
        self,
        *,
        policies: Mapping[str, RetryPolicy] | None = None,
        default: RetryPolicy = DEFAULT_POLICY,
        max_retries: int | None = None,
        min_backoff: int | None = None,
        max_backoff: int | None = None,
        retry_when: RetryWhen | None = None,
        retry_after_max_ms: int = 3_600_000,
        max_deferral_ms: int = 3_600_000,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.policies = dict(policies or {})
        self.default = _with_options(
            default,
            {
                name: value
                for name, value in (("max_retries", max_retries), ("min_backoff", min_backoff),
                                    ("max_backoff", max_backoff))
                if value is not None
            },
        )
        self.retry_when = retry_when
        self.retry_after_max_ms = retry_after_max_ms
        self.max_deferral_ms = max_deferral_ms
        self.rand = rand
        self.clock = clock

    @property
    def actor_options(self) -> set[str]:
        return {"max_retries", "min_backoff", "max_backoff", "retry_when", "throws", "on_retry_exhausted",
                "retry_schedule"}

    def policy_for(self, broker: Broker, message: MessageProxy) -> RetryPolicy:
        """Return the queue's policy with the actor's and then the message's overrides applied."""
        policy = self.policies.get(q_name(message.queue_name), self.default)
        for options in (broker.get_actor(message.actor_name).options, message.options):
            policy = _with_options(policy, options)
        return policy

    def max_retries_for(self, broker: Broker, message: MessageProxy) -> int | None:
        """Return the message's max_retries (message, actor, queue policy); None means retry for ever."""
        for options in (message.options, broker.get_actor(message.actor_name).options):
            if "max_retries" in options:
                return cast("int | None", options["max_retries"])
        return self.policy_for(broker, message).max_retries

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
        retries: int = message.options.setdefault("retries", 0)
        message.options["attempts"] = retries + 1
        record_failure(message, exception)
        throws = message.options.get("throws") or actor.options.get("throws")
        if throws and isinstance(exception, throws):
            self.logger.info("Not retrying %s: %s", describe_message(message), message.options["traceback"])
            message.fail()
            return

        message.options["retries"] = retries + 1
        message.options["requeue_timestamp"] = int(self.clock() * 1000)
        max_retries = self.max_retries_for(broker, message)
        retry_when: RetryWhen | None = actor.options.get("retry_when", self.retry_when)
        if retry_when is not None:
            exhausted = not retry_when(retries, exception)
        else:
            exhausted = max_retries is not None and retries >= max_retries
        if exhausted:
            self.logger.warning(
                "Giving up on %s after %d attempts: %s",
                describe_message(message), retries + 1, message.options["traceback"],
            )
            message.fail()
            target = message.options.get("on_retry_exhausted") or actor.options.get("on_retry_exhausted")
            if target:
                broker.get_actor(target).send(message.asdict(), {"retries": retries, "max_retries": max_retries})
            return

        policy = self.policy_for(broker, message)
        if isinstance(exception, Retry) and exception.delay is not None:
            delay = exception.delay
        elif isinstance(exception, HttpStatusError) and exception.retry_after_ms is not None:
            delay = min(exception.retry_after_ms, self.retry_after_max_ms)
        else:
            delay = policy.delay_ms(retries, rand=self.rand)
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


def _with_options(policy: RetryPolicy, options: Mapping[str, Any]) -> RetryPolicy:
    """Return policy with Retries' options (and retry_schedule) from one layer of options applied."""
    changes: dict[str, Any] = {}
    if "retry_schedule" in options:
        changes["schedule"] = tuple(options["retry_schedule"])
    if "max_retries" in options:
        changes["schedule"] = ()  # a retry count replaces the schedule's: waits follow the formula
        if options["max_retries"] is not None:  # None (for ever) is max_retries_for's; attempts stay
            changes["attempts"] = options["max_retries"] + 1
    if "min_backoff" in options:
        changes["backoff_ms"] = options["min_backoff"]
    if "max_backoff" in options:
        changes["max_backoff_ms"] = options["max_backoff"]
    return dataclasses.replace(policy, **changes) if changes else policy
