"""Periodic actors without periodiq in the workers: the `periodic` option and the stale-tick skip (issue 14).

periodiq's own PeriodiqMiddleware declares the `periodic` actor option (without it, declaring an actor with
`periodic=` fails with "actor options are undefined") and, in workers, skips and acks a scheduled message older
than `skip_delay`. But periodiq imports pendulum, dateutil's parser, pdb and Dramatiq's CLI: about 2 MiB and
15 to 40 ms in every worker process, which never schedules anything. `PeriodicTicks` does the same two things
with the standard library, and `Cron` is a cron spec that loads periodiq only when something asks for the
schedule: the `periodiq actors` scheduler, which has imported periodiq anyway.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import dramatiq
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.middleware import SkipMessage


class Cron:
    """A cron spec ("* * * * *") as periodiq's `cron()` returns it, parsed by periodiq at its first use.

    The scheduler calls `validate(date)` and `next_valid_date(date)` and prints `str(spec)`; every other attribute
    is periodiq's CronSpec's too.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._parsed: Any = None

    def parsed(self) -> Any:
        """Return periodiq's CronSpec for this spec (imports periodiq the first time)."""
        if self._parsed is None:
            from periodiq import cron

            self._parsed = cron(self.spec)
        return self._parsed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.parsed(), name)

    def __str__(self) -> str:
        return str(self.parsed())

    def __repr__(self) -> str:
        return f"Cron({self.spec!r})"


class PeriodicTicks(Middleware):
    """Declare the `periodic` actor option; in workers, skip (and ack) a scheduled tick older than skip_delay_s.

    Same rule as periodiq's PeriodiqMiddleware: a message of a periodic actor that carries the scheduler's
    `scheduled_at` option (an ISO 8601 time with an offset) is dropped when it was scheduled more than skip_delay_s
    ago, so a backlog after downtime does not run the job N times; a manual send (no `scheduled_at`) always runs.
    An unreadable `scheduled_at` runs too (periodiq's parser would raise, which Dramatiq logs and ignores).

    Parameters:
      skip_delay_s: The oldest tick still run, in seconds.
    """

    actor_options: ClassVar[set[str]] = {"periodic"}

    def __init__(self, *, skip_delay_s: float = 30) -> None:
        self.logger = dramatiq.get_logger(__name__, type(self))
        self.skip_delay_s = skip_delay_s

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        actor = broker.actors.get(message.actor_name)
        if actor is None or "periodic" not in actor.options:
            return
        scheduled_at = message.options.get("scheduled_at")
        if not isinstance(scheduled_at, str):
            self.logger.debug("%s:%s looks manually triggered.", message.message_id, message)
            return
        try:
            scheduled = datetime.fromisoformat(scheduled_at)
        except ValueError:
            self.logger.warning("%s has an unreadable scheduled_at %r; running it.", message.message_id,
                                scheduled_at[:64])
            return
        if scheduled.tzinfo is None:
            scheduled = scheduled.replace(tzinfo=UTC)
        age_s = (datetime.now(UTC) - scheduled).total_seconds()
        if age_s > self.skip_delay_s:
            self.logger.info("Skipping %s:%s older than %ss", message.message_id, message, self.skip_delay_s)
            raise SkipMessage()
        self.logger.info("Processing %s:%s scheduled at %s.", message.message_id, message, scheduled_at)
