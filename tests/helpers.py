"""Small helpers for the end-to-end tests: reading Dramatiq's Redis keys and waiting for conditions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")

#: The broker namespace our settings default to.
NAMESPACE = "whiskypay"

#: The webhook secret the test environment runs with (tests/conftest.py sets it).
TEST_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def wait_until(predicate: Callable[[], T], *, timeout_s: float = 15.0, what: str = "condition") -> T:
    """Poll predicate every 50 ms until it returns something truthy; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last value {value!r})")
        time.sleep(0.05)


def dead_letters(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """Return the decoded dead-lettered messages of queue."""
    raw = client.hgetall(f"{NAMESPACE}:{queue}.XQ.msgs")
    return [json.loads(value) for value in raw.values()]


def queued(client: redis.Redis, queue: str) -> int:
    """Return how many messages wait in queue (not delayed, not in flight)."""
    return int(client.llen(f"{NAMESPACE}:{queue}"))


def all_queue_keys(client: redis.Redis) -> list[str]:
    """Return every key of the broker namespace (to prove that nothing was enqueued)."""
    return sorted(key.decode() for key in client.keys(f"{NAMESPACE}:*") if b"__heartbeats__" not in key)
