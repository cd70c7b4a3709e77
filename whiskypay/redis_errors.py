"""One classification of Redis errors, for every caller: wait out a transient error, stop on a configuration error.

    transient      the same call succeeds once Redis recovers: wait and call again
      connection refused, reset or lost; a socket timeout; a reply cut short (InvalidResponse);
      LOADING (a restart reading its data set); READONLY (a failover: this node became a replica);
      BUSY (another client's long script); OOM (maxmemory reached under `noeviction`); NOREPLICAS (fewer
      replicas connected than `min-replicas-to-write`, as while a replica restarts); TRYAGAIN, MASTERDOWN,
      CLUSTERDOWN
    configuration  no retry can fix it: report it to Sentry and the log, and stop consuming
      NOPERM and an ACL denial inside a script ("ERR The user executing the script can't run this command"),
      NOAUTH / WRONGPASS, WRONGTYPE (another program wrote to one of our keys), an unknown command, and every
      other error reply

redis-py raises `ResponseError` subclasses (not `ConnectionError`) for READONLY, OOM, BUSY and NOPERM, so
catching only `ConnectionError` treats a failover or a full Redis as a bug. Unknown replies count as
configuration errors: waiting on something that may never clear would hold a worker thread forever.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Literal, TypeVar

import redis
from redis.exceptions import AuthorizationError, InvalidResponse, NoPermissionError

T = TypeVar("T")

RedisErrorKind = Literal["transient", "configuration"]

#: Error reply codes that clear by themselves (a failover, a restart, memory freed, a script finishing).
TRANSIENT_CODES = frozenset(
    {"READONLY", "LOADING", "BUSY", "OOM", "NOREPLICAS", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"}
)

#: The longest wait between two calls through a transient error, in seconds: a call goes through at most this
#: long after Redis accepts it again.
MAX_WAIT_S = 1.0

#: While waiting, log a warning on the first failure and then every this many failures.
LOG_EVERY = 30


def error_code(exc: BaseException) -> str:
    """Return the Redis error code of exc ("OOM", "READONLY", "NOPERM", "BUSY", "ERR"...), or "" for none."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code and code != "ERR":
        return code
    if "can't run this command" in str(exc):
        return "NOPERM"  # an ACL denial inside a script comes back as a plain ERR
    first = str(exc).split(" ", 1)[0]
    return first if first.isupper() and first.isalpha() else (code or "")


def classify_redis_error(exc: BaseException) -> RedisErrorKind:
    """Return "transient" (wait and retry) or "configuration" (report and stop) for an error from redis-py."""
    if isinstance(exc, redis.AuthenticationError | AuthorizationError | NoPermissionError):
        return "configuration"  # AuthenticationError is a ConnectionError subclass: decide it first
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | InvalidResponse | ConnectionError | TimeoutError):
        return "transient"  # BusyLoadingError (LOADING) is a ConnectionError too; InvalidResponse: a cut reply
    if isinstance(exc, redis.ResponseError) and error_code(exc) in TRANSIENT_CODES:
        return "transient"
    return "configuration"


def is_transient(exc: BaseException) -> bool:
    """Return True if exc is a Redis error worth waiting out."""
    return isinstance(exc, redis.RedisError | OSError) and classify_redis_error(exc) == "transient"


def describe(exc: BaseException) -> str:
    """Return a short, safe description: the error class and code, and the server's reply without script ids."""
    text = str(exc).split(" script: ", 1)[0].strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def call_through_transient(
    fn: Callable[[], T],
    *,
    what: str,
    logger: logging.Logger,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn until it returns, waiting out transient Redis errors; raise any other error at once.

    Parameters:
      fn: The Redis call. It must be safe to repeat (it failed, or its reply was lost).
      what: What the call does, for the log ("acknowledging message m-1 on 'emailQueue'").
      logger: Where the waiting is logged (a warning at the first failure, then every LOG_EVERY failures).
      sleep: Injected for tests.

    Waits 50 ms, doubling up to MAX_WAIT_S between calls, for as long as the error lasts.
    """
    failures = 0
    while True:
        try:
            result = fn()
        except (redis.RedisError, OSError) as exc:
            if classify_redis_error(exc) != "transient":
                raise
            failures += 1
            if failures == 1 or failures % LOG_EVERY == 0:
                logger.warning("Redis refused %s (%s); retrying until it accepts it.", what, describe(exc))
            sleep(min(0.05 * 2 ** min(failures, 10), MAX_WAIT_S))
            continue
        if failures:
            logger.info("Redis accepted %s after %d refusal(s).", what, failures)
        return result


def report_configuration_error(exc: BaseException, *, what: str, logger: logging.Logger, consequence: str) -> None:
    """Log a Redis configuration error with what to do about it, and send it to Sentry when Sentry is on.

    Parameters:
      exc: The error redis-py raised.
      what: What was refused ("enqueuing a retry of m-1 on 'emailQueue'").
      consequence: What the caller does now ("this worker stopped taking messages ...").
    """
    code = error_code(exc) or type(exc).__name__
    logger.error(
        "Redis refused %s with a configuration error (%s); retrying cannot fix it, so %s. Check the ACL of the "
        "Redis user in WHISKYPAY_REDIS_URL (it needs every command our Lua scripts run: `+@all ~<namespace>:* &*` "
        "or equivalent) and that no other program writes to the namespace's keys (WRONGTYPE); then restart it.",
        what, describe(exc), consequence,
    )
    if "sentry_sdk" not in sys.modules:
        return  # Sentry is off: SentryReporting imports sentry-sdk only when a DSN is set (issue 14)
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.set_tag("redis_error", code)
        scope.set_tag("redis_error_kind", "configuration")
        scope.fingerprint = ["redis-configuration-error", code]
        sentry_sdk.capture_exception(exc)
