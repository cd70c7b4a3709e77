"""What the fault scenarios share: the secrets to search for, producers, the leak search, counting helpers.

Timeouts, heartbeats and backoffs are shrunk through WHISKYPAY_* variables (tests/faults/conftest.py), so no
test waits out a real default.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.helpers import TEST_SECRET, FakeSentry
from whiskypay.devstack import Received, WorkerProcess

SECRET = TEST_SECRET
SMTP_USER = "whiskypay-relay"
SMTP_PASSWORD = "smtp-PW-9f3c1e77"
BUYER = "buyer-private@example.com"
MERCHANT = "owner@merchant.example"
MAIL_DOMAIN = "whiskypay.test"

#: Test-sized liveness settings: a dead worker is noticed after 5 s, maintenance runs every second per queue.
HEARTBEAT_MS = 5_000
MAINTENANCE_MS = 1_000
#: The production defaults, for the redelivery bound the tests print next to what they measured.
DEFAULT_HEARTBEAT_MS = 60_000
DEFAULT_MAINTENANCE_MS = 10_000

#: The repository root: the workers' and producers' working directory.
REPO_ROOT = Path(__file__).resolve().parents[2]

Report = Callable[[str], None]
StartWorkers = Callable[..., WorkerProcess]


def sentry_env(sentry: FakeSentry) -> dict[str, str]:
    """Return the variables that turn Sentry on in a worker, pointed at the fake Sentry."""
    return sentry.env(WHISKYPAY_ENVIRONMENT="faults")


def assert_no_leaks(haystacks: list[bytes], *, signatures: Sequence[str] = ()) -> None:
    """Fail if a secret, a signature or the buyer's address appears in any of haystacks.

    Parameters:
      haystacks: Worker logs and Sentry envelopes, as bytes.
      signatures: webhook-signature header values the receiver saw (each must stay out of logs and events).
    """
    text = b"\n".join(haystacks)
    needles = [SECRET, SECRET.removeprefix("whsec_"), SMTP_PASSWORD, BUYER, "v1,"]
    needles += [value for header in signatures for value in header.split()]
    leaked = sorted({needle for needle in needles if needle.encode() in text})
    assert not leaked, f"found in worker logs or Sentry envelopes: {leaked}"


def callback_kwargs(url: str) -> dict[str, Any]:
    """Return valid send_callback arguments for url."""
    return dict(callback_url=url, email=BUYER, plan="pro", price=19.99, timestamp="2026-11-27T21:00:00Z")


def send_callbacks(url: str, count: int) -> dict[str, float]:
    """Enqueue count callbacks to url from this process; return {webhook-id: monotonic send time}."""
    from actors import send_callback

    sent: dict[str, float] = {}
    for _ in range(count):
        at = time.monotonic()
        sent[f"msg_{send_callback.send(**callback_kwargs(url)).message_id}"] = at
    return sent


def webhook_ids(requests: list[Received]) -> Counter[str]:
    """Count the received requests per webhook-id."""
    return Counter(request.headers.get("webhook-id", "?") for request in requests)


def start_all(start_workers: StartWorkers, count: int, *args: str, **kwargs: Any) -> list[WorkerProcess]:
    """Start count `dramatiq actors` masters side by side (boot in parallel) and wait until each is ready."""
    workers = [start_workers(*args, wait_ready=False, **kwargs) for _ in range(count)]
    for worker in workers:
        worker.wait_ready(30)
    return workers


def exactly(items: list[dict[str, Any]], count: int) -> list[dict[str, Any]] | None:
    """Return items if there are count of them, else None (a wait_until predicate)."""
    return items if len(items) == count else None


PRODUCER = '''\
"""Enqueue COUNT callbacks to URL for EMAIL on the WHISKYPAY_REDIS_URL broker; print their webhook-ids."""
import json
import sys

from actors import send_callback

url, count, email = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ids = [f"msg_{send_callback.send(callback_url=url, email=email, plan='pro', price=1).message_id}" for _ in range(count)]
print(json.dumps(ids))
'''


def produce(tmp_path: Path, env: dict[str, str], url: str, count: int) -> list[str]:
    """Enqueue count callbacks from a separate process (for a Redis other than the test process's); return ids."""
    script = tmp_path / "produce.py"
    script.write_text(PRODUCER)
    done = subprocess.run(
        [sys.executable, str(script), url, str(count), BUYER],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ids: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return ids


def run_cli(*argv: str) -> tuple[int, str]:
    """Run `whiskypay ARGV` in this process (settings from os.environ: the session test Redis); return status, out."""
    from whiskypay.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    return status, out.getvalue()


def text(value: bytes | str) -> str:
    """Return value as str (Redis replies are bytes)."""
    return value.decode() if isinstance(value, bytes) else value
