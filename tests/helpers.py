"""Small helpers for the tests: reading Dramatiq's Redis keys, waiting for conditions, the fake Sentry."""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import sentry_sdk

if TYPE_CHECKING:
    from whiskypay.devstack import HttpReceiver

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


class FakeSentry:
    """A local endpoint the real sentry-sdk posts its envelopes to, and what arrived there.

    Worker processes report to it through `env()`; this process through `reporting_here()`. The one fake Sentry
    of the suite (the `sentry` fixture in tests/conftest.py).

    Parameters:
      endpoint: A started HttpReceiver.
    """

    def __init__(self, endpoint: HttpReceiver) -> None:
        self.endpoint = endpoint

    @property
    def dsn(self) -> str:
        """The DSN that points sentry-sdk at this endpoint."""
        return f"http://public@127.0.0.1:{self.endpoint.port}/1"

    def env(self, **extra: str) -> dict[str, str]:
        """Return the worker variables that turn Sentry on, pointed here (plus extra WHISKYPAY_* variables)."""
        return {"WHISKYPAY_SENTRY_DSN": self.dsn, **extra}

    @contextlib.contextmanager
    def reporting_here(self) -> Iterator[FakeSentry]:
        """Initialise sentry-sdk in this process the way a worker does (SentryReporting), sending here."""
        from middleware.sentry import SentryReporting

        SentryReporting(dsn=self.dsn, environment="test", release="t", secrets=()).start()
        try:
            yield self
        finally:
            sentry_sdk.flush(timeout=5)
            sentry_sdk.get_client().close()
            sentry_sdk.init(dsn=None)

    def bodies(self) -> list[bytes]:
        """Return every envelope received so far, decompressed (for leak searches)."""
        sentry_sdk.flush(timeout=5)  # a no-op unless this process reports here too
        found = []
        for request in self.endpoint.requests():
            encoding = request.headers.get("content-encoding", "")
            if encoding not in ("", "gzip"):
                raise AssertionError(f"unexpected content-encoding {encoding!r}")
            found.append(gzip.decompress(request.body) if encoding == "gzip" else request.body)
        return found

    def items(self, kind: str) -> list[dict[str, Any]]:
        """Return the payloads of the envelope items of type kind ("event", "check_in", ...), oldest first."""
        return [payload for body in self.bodies() for header, payload in _envelope_items(body) if
                header.get("type") == kind]

    def events(self) -> list[dict[str, Any]]:
        """Return the error and message events received (not sessions, check-ins or client reports)."""
        return self.items("event")


def _envelope_items(body: bytes) -> list[tuple[dict[str, Any], Any]]:
    """Return the (item header, payload) pairs of one decompressed Sentry envelope."""
    _, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] + 1 :]
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((header, json.loads(payload)))
    return items
