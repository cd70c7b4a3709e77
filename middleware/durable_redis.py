"""DurableRedis: a worker refuses to start on a Redis that can lose jobs, and checks again after a failover."""

from __future__ import annotations

import threading

import redis
from dramatiq import Broker, Middleware, Worker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.logging import get_logger

from whiskypay.errors import WorkerStartRefused
from whiskypay.redis_durability import durability, problems_text, refusal_text, server_run_id
from whiskypay.redis_errors import describe, is_transient

#: How often a worker asks which Redis server it talks to (INFO server's run_id), in seconds: a new run_id (a
#: Sentinel failover, a restart) runs the check again.
RECHECK_INTERVAL_S = 5.0


class DurableRedis(Middleware):
    """Check the eviction policy and persistence (`whiskypay.redis_durability`) when a worker boots.

    A failed check refuses the start (WorkerStartRefused names the Redis setting to change) unless allow_volatile;
    a warning (CONFIG renamed or denied, RDB only) is logged. While the worker runs, a thread watches the server's
    run_id and checks again whenever it changes (a Sentinel failover to a new primary, a restart): a running
    worker is not stopped then (that would stop the deliveries without saving anything), the failure is logged
    as an error. A Redis unreachable at boot is checked once it answers. Only worker processes run it, never
    `import actors` (the gateway imports that).

    Parameters:
      allow_volatile: Start anyway on a Redis that can lose jobs (WHISKYPAY_REDIS_ALLOW_VOLATILE), with a warning.
      recheck_interval_s: How often the run_id is read, in seconds.
    """

    def __init__(self, *, allow_volatile: bool, recheck_interval_s: float = RECHECK_INTERVAL_S) -> None:
        self.logger = get_logger(__name__, type(self))
        self.allow_volatile = allow_volatile
        self.recheck_interval_s = recheck_interval_s
        self.checked_run_id: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, client: redis.Redis, *, booting: bool) -> None:
        """Check the Redis client talks to now; at boot, raise WorkerStartRefused on a failure."""
        run_id = server_run_id(client)
        findings = durability(client)
        self.checked_run_id = run_id
        for finding in findings:
            if finding.level == "warning":
                self.logger.warning("Redis %s: %s. %s.", finding.what, finding.detail, finding.fix.capitalize())
        if not any(finding.level == "failed" for finding in findings):
            self.logger.info("Redis durability checked (server %s): ok.", (run_id or "?")[:8])
            return
        if self.allow_volatile:
            self.logger.warning("%s Running anyway: WHISKYPAY_REDIS_ALLOW_VOLATILE=true.", problems_text(findings))
        elif booting:
            raise WorkerStartRefused(refusal_text(findings))
        else:
            self.logger.error("The Redis server changed (now %s). %s This worker keeps running (stopping it would "
                              "not save the jobs): fix the Redis now.", (run_id or "?")[:8], problems_text(findings))

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        if not isinstance(broker, RedisBroker):
            return
        try:
            self.check(broker.client, booting=True)
        except redis.RedisError as exc:
            if not is_transient(exc):  # whiskypay.redis_errors: BUSY, LOADING, a lost connection... pass
                raise
            self.logger.warning("Cannot check Redis durability now (%s); checking once Redis answers.",
                                describe(exc))
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(broker.client,), name="whiskypay-durability",
                                        daemon=True)
        self._thread.start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _watch(self, client: redis.Redis) -> None:
        while not self._stop.wait(self.recheck_interval_s):
            try:
                run_id = server_run_id(client)
                if run_id is not None and run_id != self.checked_run_id:
                    if self.checked_run_id is not None:
                        self.logger.warning("The Redis server changed (%s -> %s): checking its durability again.",
                                            self.checked_run_id[:8], run_id[:8])
                    self.check(client, booting=False)
            except redis.RedisError as exc:
                self.logger.debug("Durability watch: Redis error %s; trying again.", type(exc).__name__)
