"""Proof under load and faults: killed workers, a restarted Redis, outages, poison messages, slow merchants.

Every test runs real `dramatiq actors` processes against a real Redis, HTTP receiver and SMTP sink, injects one
fault, and checks that nothing is lost, nothing is delivered twice where it must not be, and nothing secret leaks.
Each prints its measured figures (run pytest with -s to see them as they come) and hands them to the `report`
fixture, which repeats them in the terminal summary under "reported figures".

Timeouts, heartbeats and backoffs are shrunk through WHISKYPAY_* variables, so no test waits out a real default.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import itertools
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from dramatiq import Message

from tests.helpers import TEST_SECRET, dead_letters, wait_until
from whiskypay.devstack import HttpReceiver, Mail, Received, RedisServer, Response, SmtpSink, WorkerProcess, free_port

pytestmark = pytest.mark.e2e

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
REPO_ROOT = Path(__file__).resolve().parent.parent

Report = Callable[[str], None]
StartWorkers = Callable[..., WorkerProcess]


# --------------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The shared worker environment with test-sized liveness settings."""
    return {
        **env,
        "WHISKYPAY_HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_MS),
        "WHISKYPAY_MAINTENANCE_INTERVAL_MS": str(MAINTENANCE_MS),
    }


@pytest.fixture
def sentry() -> Iterator[HttpReceiver]:
    """A local endpoint the real sentry-sdk posts its envelopes to."""
    with HttpReceiver() as endpoint:
        yield endpoint


def sentry_env(sentry: HttpReceiver) -> dict[str, str]:
    """Return the variables that turn Sentry on, pointed at the local endpoint."""
    return {"WHISKYPAY_SENTRY_DSN": f"http://public@127.0.0.1:{sentry.port}/1", "WHISKYPAY_ENVIRONMENT": "faults"}


def envelope_bodies(sentry: HttpReceiver) -> list[bytes]:
    """Return every envelope the Sentry endpoint received, gunzipped."""
    bodies = []
    for request in sentry.requests():
        raw = request.body
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        bodies.append(raw)
    return bodies


def sentry_events(sentry: HttpReceiver) -> list[dict[str, Any]]:
    """Return the error events (not sessions or client reports) inside the received envelopes."""
    found = []
    for raw in envelope_bodies(sentry):
        for line in raw.split(b"\n")[1:]:
            if line.strip().startswith(b"{"):
                item = json.loads(line)
                if "event_id" in item and ("exception" in item or "message" in item):
                    found.append(item)
    return found


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


# --------------------------------------------------------------------------------------------------------------------
# 1. a worker killed with SIGKILL
# --------------------------------------------------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def heartbeats(client: redis.Redis) -> dict[str, float]:
    """Return each broker id's last heartbeat (Redis time, ms)."""
    pairs = cast(list[tuple[bytes, float]], client.zrange("whiskypay:__heartbeats__", 0, -1, withscores=True))
    return {_text(member): score for member, score in pairs}


def silent_broker_holdings(client: redis.Redis, beats_before: dict[str, float]) -> list[tuple[str, set[str]]]:
    """Return (broker id, webhook-ids it holds unacknowledged) of each callback worker silent since beats_before."""
    beats_now = heartbeats(client)
    silent = []
    for key in client.scan_iter(match="whiskypay:__acks__.*.callbackQueue"):
        broker_id = _text(key).removeprefix("whiskypay:__acks__.").removesuffix(".callbackQueue")
        if broker_id not in beats_before or beats_now.get(broker_id) != beats_before[broker_id]:
            continue  # alive: it has talked to Redis since
        held = set()
        for redis_id in cast(set[bytes], client.smembers(key)):
            raw = cast(bytes | None, client.hget("whiskypay:callbackQueue.msgs", redis_id))
            if raw is not None:
                held.add(str(json.loads(raw)["options"]["webhook_id"]))
        silent.append((broker_id, held))
    return silent


def test_a_sigkilled_worker_loses_nothing_and_its_messages_come_back_within_the_heartbeat_bound(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given 1,000 callbacks, a merchant answering 200 after 5 ms, and two separate worker masters
    total = 1_000
    receiver.respond("/hook", Response(status=200, delay_s=0.005))
    expected = set(send_callbacks(receiver.url("/hook"), total))
    victim, survivor = start_all(start_workers, 2, env=env, processes=1, threads=4)
    # When one master's whole process group is SIGKILLed halfway through
    receiver.wait_for(total // 2, timeout_s=60)
    victim.kill()
    killed_at = time.monotonic()
    delivered_at_kill = len(receiver.requests())
    # (the dead worker is the one whose heartbeat stops: live ones poll Redis every 100 ms)
    beats_at_kill = heartbeats(redis_client)
    time.sleep(1.5)  # less than the heartbeat timeout: its messages are still held
    dead = silent_broker_holdings(redis_client, beats_at_kill)
    assert len(dead) == 1, f"expected one silent worker holding messages, found {dead}"
    held = dead[0][1]
    replacement = start_workers(env=env, processes=1, threads=4)
    # Then every callback arrives at least once, within the heartbeat + maintenance bound after the kill
    bound_s = (HEARTBEAT_MS + MAINTENANCE_MS) / 1000 + 5
    def everything_arrived_and_the_held_ones_again() -> bool:
        hits = receiver.requests()
        redelivered = {hit.headers["webhook-id"] for hit in hits if hit.at >= killed_at}
        return set(webhook_ids(hits)) >= expected and redelivered >= held

    wait_until(
        everything_arrived_and_the_held_ones_again,
        timeout_s=bound_s + 30,
        what="all 1,000 webhook-ids, and every message the killed worker held once more",
    )
    all_done_s = time.monotonic() - killed_at
    hits = receiver.requests()
    counts = webhook_ids(hits)
    assert set(counts) == expected
    duplicates = {webhook_id: n for webhook_id, n in counts.items() if n > 1}
    # A duplicate can only be a message the killed worker held (sent, not acknowledged): same id, same body
    assert set(duplicates) <= held, set(duplicates) - held
    for webhook_id in duplicates:
        assert len({hit.body for hit in hits if hit.headers["webhook-id"] == webhook_id}) == 1
    # Every message the dead worker held is delivered again after the kill; the last of them sets the figure
    assert held, "the killed worker held no message: the kill proved nothing"
    after_kill = [hit for hit in hits if hit.at >= killed_at and hit.headers["webhook-id"] in held]
    assert {hit.headers["webhook-id"] for hit in after_kill} == held
    redelivery_s = max(hit.at for hit in after_kill) - killed_at
    assert redelivery_s <= bound_s, f"redelivered {redelivery_s:.1f} s after the kill, bound {bound_s:.1f} s"
    assert survivor.running() and replacement.running()
    assert dead_letters(redis_client, "callbackQueue") == []
    assert_no_leaks(
        [worker.log().encode() for worker in (victim, survivor, replacement)],
        signatures=[hit.headers["webhook-signature"] for hit in hits[:50]],
    )
    default_bound_s = (DEFAULT_HEARTBEAT_MS + DEFAULT_MAINTENANCE_MS) / 1000 + 1
    report(
        f"SIGKILL: {total} callbacks, killed at {delivered_at_kill} delivered; dead worker held {len(held)}; "
        f"duplicates {len(duplicates)} (total requests {len(hits)}); redelivery {redelivery_s:.1f} s after the kill "
        f"(bound {bound_s:.0f} s = heartbeat {HEARTBEAT_MS / 1000:.0f} s + interval {MAINTENANCE_MS / 1000:.0f} s "
        f"+ 5 s); all delivered {all_done_s:.1f} s after the kill; with defaults the bound is "
        f"{DEFAULT_HEARTBEAT_MS // 1000} + {DEFAULT_MAINTENANCE_MS // 1000} + ~1 = {default_bound_s:.0f} s (<= 90 s)"
    )


# --------------------------------------------------------------------------------------------------------------------
# 2. Redis restarted under load
# --------------------------------------------------------------------------------------------------------------------


def test_a_redis_restart_mid_run_loses_no_callback_and_the_workers_carry_on(
    private_redis: RedisServer,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    tmp_path: Path,
    report: Report,
) -> None:
    # Given a worker and a producer on a Redis of the test's own, with the append-only file on
    renv = {**env, "WHISKYPAY_REDIS_URL": private_redis.url, "WHISKYPAY_REDIS_TIMEOUT_S": "2"}
    receiver.respond("/hook", Response(status=200, delay_s=0.01))
    worker = start_workers(env=renv, processes=1, threads=4)
    expected = set(produce(tmp_path, renv, receiver.url("/hook"), 300))
    # When Redis restarts after about 100 deliveries
    receiver.wait_for(100, timeout_s=60)
    restart_started = time.monotonic()
    private_redis.restart()
    restart_s = time.monotonic() - restart_started
    # Then all 300 arrive at least once
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= expected, timeout_s=60, what="all 300 webhook-ids")
    hits = receiver.requests()
    counts = webhook_ids(hits)
    assert set(counts) == expected
    times = [hit.at for hit in hits]
    gap_s = max((later - earlier for earlier, later in itertools.pairwise(times)), default=0.0)
    # And the worker is alive and not hung: 10 more, sent after the restart, arrive within 15 s
    assert worker.running()
    sent_more = time.monotonic()
    more = set(produce(tmp_path, renv, receiver.url("/hook"), 10))
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= more, timeout_s=15, what="10 more after the restart")
    client = redis.Redis.from_url(private_redis.url)
    with client:
        assert client.zcard("whiskypay:callbackQueue.XQ") == 0
    assert_no_leaks([worker.log().encode()], signatures=[hit.headers["webhook-signature"] for hit in hits[:50]])
    report(
        f"Redis restart: 300 callbacks, restart took {restart_s:.1f} s, longest gap between deliveries "
        f"{gap_s:.1f} s, duplicates {sum(n - 1 for n in counts.values())}, 10 more delivered "
        f"{time.monotonic() - sent_more:.1f} s after starting their producer (its start-up included)"
    )


class FirstAttemptFails:
    """A receiver handler that answers 503 to the first attempt of each webhook-id and 200 to the others."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.delay_s = delay_s

    def __call__(self, request: Received) -> Response:
        with self.lock:
            webhook_id = request.headers.get("webhook-id", "?")
            self.attempts[webhook_id] += 1
            first = self.attempts[webhook_id] == 1
        return Response(status=503, delay_s=self.delay_s) if first else Response(status=200)

    def delivered(self) -> set[str]:
        """Return the webhook-ids answered 200."""
        with self.lock:
            return {webhook_id for webhook_id, n in self.attempts.items() if n > 1}


def test_a_redis_outage_of_a_few_seconds_loses_no_scheduled_retry(
    private_redis: RedisServer,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    tmp_path: Path,
    report: Report,
) -> None:
    # Given 20 callbacks whose first attempt failed, their retries (due in 2 s) held in the worker's memory
    renv = {**env, "WHISKYPAY_REDIS_URL": private_redis.url, "WHISKYPAY_CALLBACK_BACKOFF_MS": "2000"}
    merchant = FirstAttemptFails()
    receiver.set_handler("/hook", merchant)
    start_workers(env=renv, threads=4)
    expected = set(produce(tmp_path, renv, receiver.url("/hook"), 20))
    receiver.wait_for(20, timeout_s=20)
    # When Redis crashes and is back 1.5 s later (append-only file: nothing is lost on the Redis side)
    private_redis.kill()
    time.sleep(1.5)  # the outage itself
    private_redis.start()
    back_at = time.monotonic()
    # Then every retry is still delivered, within backoff + consumer restart (3 s) + slack
    wait_until(lambda: merchant.delivered() >= expected, timeout_s=15, what="the 20 retries after the outage")
    report(
        f"Redis outage 1.5 s with 20 retries pending: all delivered {time.monotonic() - back_at:.1f} s after "
        "Redis was back"
    )


def test_an_attempt_that_fails_while_redis_is_down_is_still_retried(
    private_redis: RedisServer,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    tmp_path: Path,
    report: Report,
) -> None:
    # Given 10 first attempts that hang for 2 s and then fail
    renv = {**env, "WHISKYPAY_REDIS_URL": private_redis.url, "WHISKYPAY_WEBHOOK_READ_TIMEOUT_S": "5"}
    merchant = FirstAttemptFails(delay_s=2.0)
    receiver.set_handler("/hook", merchant)
    start_workers(env=renv, threads=10)
    expected = set(produce(tmp_path, renv, receiver.url("/hook"), 10))
    receiver.wait_for(1, timeout_s=20)
    # When Redis is down at the moment they fail (so their retries cannot be scheduled right away)
    private_redis.kill()
    time.sleep(3.0)
    private_redis.start()
    back_at = time.monotonic()
    # Then each retry waits for Redis instead of being dropped, and every callback is delivered
    wait_until(lambda: merchant.delivered() >= expected, timeout_s=20, what="the 10 retries after the outage")
    report(f"10 attempts failed during a 3 s Redis outage: all retried, delivered {time.monotonic() - back_at:.1f} s "
           "after Redis was back")


# --------------------------------------------------------------------------------------------------------------------
# 3. Redis unreachable at enqueue
# --------------------------------------------------------------------------------------------------------------------

SENDER = '''\
"""Call send_callback.send once; print how it ended and how long it took, as JSON."""
import json
import time

from actors import send_callback

started = time.monotonic()
try:
    send_callback.send(callback_url="http://127.0.0.1:9/hook", email="b@example.com", plan="pro", price=1)
    outcome = {"raised": None, "text": ""}
except Exception as exc:
    outcome = {"raised": f"{type(exc).__module__}.{type(exc).__qualname__}", "text": str(exc)}
outcome["elapsed_s"] = time.monotonic() - started
print(json.dumps(outcome))
'''


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """Yield the port of a TCP server that accepts connections and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize("where", ["nothing listening", "a host that never answers"])
def test_send_raises_enqueue_error_in_bounded_time_when_redis_is_unreachable(
    worker_env: dict[str, str], tmp_path: Path, where: str, report: Report
) -> None:
    script = tmp_path / "send_once.py"
    script.write_text(SENDER)
    timeout_s = 1.0
    with contextlib.ExitStack() as stack:
        port = free_port() if where == "nothing listening" else stack.enter_context(blackhole())
        # Given a gateway whose WHISKYPAY_REDIS_URL (with a password) points where no Redis answers
        genv = {
            **worker_env,
            "WHISKYPAY_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0",
            "WHISKYPAY_REDIS_TIMEOUT_S": str(timeout_s),
        }
        # When it sends a callback
        done = subprocess.run(
            [sys.executable, str(script)],
            env=genv,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    # Then send() raises EnqueueError within the Redis timeout + 1 s, naming the setting and not the password
    assert outcome["raised"] == "whiskypay.actor.EnqueueError", outcome
    assert outcome["elapsed_s"] < timeout_s + 1.0, outcome
    assert "WHISKYPAY_REDIS_URL" in outcome["text"]
    assert "hunter2" not in done.stdout + done.stderr
    report(
        f"Redis unreachable ({where}): EnqueueError after {outcome['elapsed_s']:.2f} s "
        f"(WHISKYPAY_REDIS_TIMEOUT_S={timeout_s:g})"
    )


# --------------------------------------------------------------------------------------------------------------------
# 4. a merchant outage: 503 for a while, then 200
# --------------------------------------------------------------------------------------------------------------------


class Outage:
    """A receiver handler that answers 503 until the outage ends, then 200, recording each answer.

    Parameters:
      length_s: How long the outage lasts after the first request, in seconds (None: until `end()`).
    """

    def __init__(self, length_s: float | None) -> None:
        self.length_s = length_s
        self.lock = threading.Lock()
        self.first_at: float | None = None
        self.ended = threading.Event()
        self.answers: list[tuple[str, int]] = []

    def end(self) -> None:
        """End the outage now."""
        self.ended.set()

    def __call__(self, request: Received) -> Response:
        with self.lock:
            if self.first_at is None:
                self.first_at = request.at
            down = not self.ended.is_set() and (self.length_s is None or request.at < self.first_at + self.length_s)
            status = 503 if down else 200
            self.answers.append((request.headers.get("webhook-id", "?"), status))
        return Response(status=status)

    def accepted(self) -> Counter[str]:
        """Count the 200 answers per webhook-id."""
        with self.lock:
            return Counter(webhook_id for webhook_id, status in self.answers if status == 200)


def test_a_merchant_outage_shorter_than_the_schedule_delivers_everything_exactly_once(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    sentry: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given a merchant down for 2 s, and 5 attempts 300, 600, 1200, 2400 ms apart (4.5 s in all)
    outage = Outage(length_s=2.0)
    receiver.set_handler("/hook", outage)
    worker = start_workers(
        env={**env, **sentry_env(sentry), "WHISKYPAY_CALLBACK_ATTEMPTS": "5", "WHISKYPAY_CALLBACK_BACKOFF_MS": "300"},
        threads=4,
    )
    # When 50 payments are sent
    expected = set(send_callbacks(receiver.url("/hook"), 50))
    # Then each webhook-id is accepted exactly once after the merchant is back, and nothing is dead-lettered
    wait_until(lambda: set(outage.accepted()) >= expected, timeout_s=30, what="50 accepted webhooks")
    time.sleep(0.5)  # a late duplicate would show up now
    accepted = outage.accepted()
    assert set(accepted) == expected and set(accepted.values()) == {1}
    assert dead_letters(redis_client, "callbackQueue") == []
    assert sentry_events(sentry) == []
    hits = receiver.requests("/hook")
    assert_no_leaks(
        [worker.log().encode(), *envelope_bodies(sentry)], signatures=[hit.headers["webhook-signature"] for hit in hits]
    )
    assert outage.first_at is not None
    back_s = max(hit.at for hit in hits) - (outage.first_at + 2.0)
    report(
        f"merchant outage 2 s < schedule 4.5 s: 50/50 accepted exactly once after {len(hits)} requests "
        f"({len(hits) - 50} failed attempts), last delivery {back_s:.1f} s after the merchant came back"
    )


def test_a_merchant_outage_longer_than_the_schedule_dead_letters_and_retry_redelivers_with_the_same_ids(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    sentry: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given a merchant that stays down past 3 attempts 100 and 200 ms apart
    outage = Outage(length_s=None)
    receiver.set_handler("/hook", outage)
    worker = start_workers(
        env={**env, **sentry_env(sentry), "WHISKYPAY_CALLBACK_ATTEMPTS": "3", "WHISKYPAY_CALLBACK_BACKOFF_MS": "100"},
        threads=4,
    )
    # When 50 payments are sent, they are all dead-lettered with their reason and one Sentry event each
    expected = set(send_callbacks(receiver.url("/hook"), 50))
    letters = wait_until(
        lambda: exactly(dead_letters(redis_client, "callbackQueue"), 50), timeout_s=30, what="50 dead letters"
    )
    assert letters is not None
    assert {letter["options"]["webhook_id"] for letter in letters} == expected
    assert {letter["options"]["traceback"] for letter in letters} == {"HttpStatusError: HTTP 503 from 127.0.0.1"}
    assert all(letter["options"]["retries"] == 2 for letter in letters)
    wait_until(lambda: len(sentry_events(sentry)) >= 50, timeout_s=15, what="50 Sentry events")
    # And once the merchant is back, `whiskypay retry --all` delivers each exactly once, under the same webhook-id
    outage.end()
    status, out = run_cli("retry", "--queue", "callbackQueue", "--all")
    assert status == 0, out
    assert "Re-drove 50 dead letter(s) onto callbackQueue." in out
    wait_until(lambda: set(outage.accepted()) >= expected, timeout_s=20, what="50 re-driven webhooks")
    time.sleep(0.5)
    accepted = outage.accepted()
    assert set(accepted) == expected and set(accepted.values()) == {1}
    assert dead_letters(redis_client, "callbackQueue") == []
    events = sentry_events(sentry)
    assert len(events) == 50
    assert sorted(event["tags"]["webhook_id"] for event in events) == sorted(expected)
    hits = receiver.requests("/hook")
    assert_no_leaks(
        [worker.log().encode(), *envelope_bodies(sentry)], signatures=[hit.headers["webhook-signature"] for hit in hits]
    )
    report(
        f"merchant outage > schedule: 50/50 dead-lettered (50 Sentry events), re-driven, 50/50 accepted once "
        f"with the same webhook-ids; {len(hits)} requests in all"
    )


# --------------------------------------------------------------------------------------------------------------------
# 5. an SMTP outage
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def relay() -> Iterator[list[SmtpSink]]:
    """An authenticating SMTP sink; a restart appends its successor (same port) to the list."""
    sinks = [SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD).start()]
    try:
        yield sinks
    finally:
        for sink in sinks:
            sink.stop()


def restart_relay(sinks: list[SmtpSink]) -> SmtpSink:
    """Start a new sink on the port of the last one (which must be stopped); append and return it."""
    sink = SmtpSink(port=sinks[-1].port, username=SMTP_USER, password=SMTP_PASSWORD).start()
    sinks.append(sink)
    return sink


def relay_mails(sinks: list[SmtpSink]) -> list[Mail]:
    """Return the mails accepted by every sink of the relay."""
    return [mail for sink in sinks for mail in sink.mails()]


def email_env(env: dict[str, str], sinks: list[SmtpSink], **extra: str) -> dict[str, str]:
    """Return env pointed at the authenticating relay."""
    return {
        **env,
        "WHISKYPAY_SMTP_HOST": sinks[0].host,
        "WHISKYPAY_SMTP_PORT": str(sinks[0].port),
        "WHISKYPAY_SMTP_USERNAME": SMTP_USER,
        "WHISKYPAY_SMTP_PASSWORD": SMTP_PASSWORD,
        "WHISKYPAY_SMTP_TIMEOUT_S": "2",
        **extra,
    }


def send_emails(count: int) -> set[str]:
    """Enqueue count email jobs; return the Message-IDs of the 2 * count emails they must send."""
    from actors import send_email

    expected = set()
    for _ in range(count):
        message = send_email.send(buyer_email=BUYER, merchant_email=MERCHANT, plan="pro", saas_name="Acme")
        message_id = message.message_id
        expected |= {f"<{message_id}.buyer@{MAIL_DOMAIN}>", f"<{message_id}.merchant@{MAIL_DOMAIN}>"}
    return expected


def message_ids(mails: list[Mail]) -> Counter[str]:
    """Count the mails per Message-ID header."""
    return Counter(str(mail.message["Message-ID"]) for mail in mails)


def test_an_smtp_outage_shorter_than_the_schedule_sends_every_email_exactly_once(
    redis_client: redis.Redis,
    relay: list[SmtpSink],
    sentry: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given an email worker with 5 attempts 300, 600, 1200, 2400 ms apart, and a relay that works
    worker = start_workers(
        "--queues",
        "emailQueue",
        env=email_env(env, relay, **sentry_env(sentry), WHISKYPAY_EMAIL_ATTEMPTS="5", WHISKYPAY_EMAIL_BACKOFF_MS="300"),
        threads=4,
    )
    expected = send_emails(15)
    relay[0].wait_for(30, timeout_s=20)
    # When the relay goes down for 2 s while 15 more jobs come in
    relay[0].stop()
    down_at = time.monotonic()
    expected |= send_emails(15)
    time.sleep(2.0)  # the outage itself, not a backoff
    restart_relay(relay)
    # Then all 60 emails go out, no Message-ID twice, and nothing is dead-lettered
    wait_until(lambda: set(message_ids(relay_mails(relay))) >= expected, timeout_s=30, what="60 emails")
    time.sleep(0.5)
    counts = message_ids(relay_mails(relay))
    assert set(counts) == expected
    assert {mid: n for mid, n in counts.items() if n > 1} == {}
    assert dead_letters(redis_client, "emailQueue") == []
    assert sentry_events(sentry) == []
    failed_attempts = worker.log().count("Retrying send_email(")
    assert failed_attempts > 0, "no attempt failed: the outage was not felt"
    assert_no_leaks([worker.log().encode(), *envelope_bodies(sentry)])
    report(
        f"SMTP outage 2 s < schedule 4.5 s: 60/60 emails, 0 duplicate Message-IDs, {failed_attempts} failed "
        f"attempts, {len(relay[1].mails())} sent after the relay came back, all done "
        f"{time.monotonic() - down_at:.1f} s after it went down"
    )


def test_an_smtp_outage_longer_than_the_schedule_dead_letters_and_retry_sends_each_email_once(
    redis_client: redis.Redis,
    relay: list[SmtpSink],
    sentry: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given an email worker with 3 attempts 100 and 200 ms apart, 10 jobs sent while the relay works
    worker = start_workers("--queues", "emailQueue", env=email_env(env, relay, **sentry_env(sentry)), threads=4)
    expected = send_emails(10)
    relay[0].wait_for(20, timeout_s=20)
    # When the relay goes down and 20 more jobs run out of attempts
    relay[0].stop()
    expected |= send_emails(20)
    letters = wait_until(
        lambda: exactly(dead_letters(redis_client, "emailQueue"), 20), timeout_s=30, what="20 dead letters"
    )
    assert letters is not None
    assert all(
        letter["options"]["traceback"].startswith("SmtpTemporaryError: SMTP connection to 127.0.0.1 failed")
        for letter in letters
    ), {letter["options"]["traceback"] for letter in letters}
    wait_until(lambda: len(sentry_events(sentry)) >= 20, timeout_s=15, what="20 Sentry events")
    # And the relay comes back and the dead letters are re-driven
    restart_relay(relay)
    status, out = run_cli("retry", "--queue", "emailQueue", "--all")
    assert status == 0, out
    # Then all 60 emails went out, each Message-ID exactly once
    wait_until(lambda: set(message_ids(relay_mails(relay))) >= expected, timeout_s=30, what="60 emails")
    time.sleep(0.5)
    counts = message_ids(relay_mails(relay))
    assert set(counts) == expected
    assert {mid: n for mid, n in counts.items() if n > 1} == {}
    assert dead_letters(redis_client, "emailQueue") == []
    assert len(sentry_events(sentry)) == 20
    assert_no_leaks([worker.log().encode(), *envelope_bodies(sentry)])
    report(
        "SMTP outage > schedule: 20 jobs dead-lettered (20 Sentry events), re-driven; 60/60 emails, "
        "0 duplicate Message-IDs"
    )


# --------------------------------------------------------------------------------------------------------------------
# 6. poison messages
# --------------------------------------------------------------------------------------------------------------------


def push_raw(client: redis.Redis, data: bytes, redis_id: str | None = None) -> str:
    """Store data as a message of callbackQueue exactly as Dramatiq's enqueue does (HSET + RPUSH); return its id."""
    redis_id = redis_id or str(uuid.uuid4())
    client.hset("whiskypay:callbackQueue.msgs", redis_id, data)
    client.rpush("whiskypay:callbackQueue", redis_id)
    return redis_id


def encoded(actor_name: str, kwargs: dict[str, Any], redis_id: str) -> bytes:
    """Return a well-formed Dramatiq message for actor_name, as Dramatiq encodes it."""
    return Message(
        queue_name="callbackQueue",
        actor_name=actor_name,
        args=(),
        kwargs=kwargs,
        options={"redis_message_id": redis_id},
    ).encode()


def test_poison_messages_are_dead_lettered_with_a_reason_and_the_workers_carry_on(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    sentry: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given 20 good callbacks with five poison messages among them, pushed straight into Redis
    garbage = b"\xff\xfe" + random.Random(7).randbytes(62)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    poison = {
        ids[0]: (garbage, "DecodeError"),
        ids[1]: (b"[1,2]", "DecodeError"),
        ids[2]: (b'{"foo": 1}', "DecodeError"),
        ids[3]: (encoded("no_such_actor", {"x": 1}, ids[3]), "ActorNotFound"),
        ids[4]: (
            encoded("send_callback", {**callback_kwargs(receiver.url("/hook")), "email": "nope"}, ids[4]),
            "InvalidMessage",
        ),
    }
    expected: set[str] = set()
    pending = list(poison.items())
    for index in range(20):
        expected |= set(send_callbacks(receiver.url("/hook"), 1))
        if index % 4 == 1 and pending:
            redis_id, (data, _) = pending.pop(0)
            push_raw(redis_client, data, redis_id)
    assert not pending
    # When a worker (with Sentry on) takes them
    worker = start_workers(env={**env, **sentry_env(sentry)}, threads=4)
    # Then each poison message is dead-lettered once, with a reason that names its problem
    wait_until(lambda: redis_client.zcard("whiskypay:callbackQueue.XQ") >= 5, timeout_s=20, what="5 dead letters")
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= expected, timeout_s=20, what="the 20 good ones")
    raw_letters = cast(dict[bytes, bytes], redis_client.hgetall("whiskypay:callbackQueue.XQ.msgs"))
    stored = {_text(key): json.loads(value) for key, value in raw_letters.items()}
    assert set(stored) == set(poison)
    reasons: dict[str, int] = {}
    for redis_id, (data, reason) in poison.items():
        options = stored[redis_id]["options"]
        assert options["traceback"].startswith(f"{reason}: "), (reason, options["traceback"])
        reasons[reason] = reasons.get(reason, 0) + 1
        if reason == "DecodeError":
            assert stored[redis_id]["actor_name"] == "undecodable-message"
            assert base64.b64decode(options["raw_base64"]) == data and options["raw_size"] == len(data)
    # And one Sentry event each; the worker is alive and 5 more good callbacks go through
    wait_until(lambda: len(sentry_events(sentry)) >= 5, timeout_s=15, what="5 Sentry events")
    assert worker.running()
    more = set(send_callbacks(receiver.url("/hook"), 5))
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= more, timeout_s=15, what="5 more good ones")
    time.sleep(0.5)
    assert len(sentry_events(sentry)) == 5
    assert set(webhook_ids(receiver.requests())) == expected | more
    assert redis_client.zcard("whiskypay:callbackQueue.XQ") == 5
    assert_no_leaks(
        [worker.log().encode(), *envelope_bodies(sentry)],
        signatures=[hit.headers["webhook-signature"] for hit in receiver.requests()],
    )
    report(
        f"poison: 5 dead-lettered with reasons {dict(sorted(reasons.items()))}, 5 Sentry events, "
        f"25/25 good callbacks delivered, worker alive"
    )


# --------------------------------------------------------------------------------------------------------------------
# 7. a slow merchant next to a fast one
# --------------------------------------------------------------------------------------------------------------------


def max_concurrency(starts: list[float], length_s: float, *, since: float = float("-inf")) -> int:
    """Return the most intervals [start, start + length_s) open at once, at or after `since`."""
    points = sorted(
        [(max(start, since), 1) for start in starts if start + length_s > since]
        + [(start + length_s, -1) for start in starts if start + length_s > since]
    )
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


def test_a_slow_merchant_gets_at_most_two_threads_and_the_fast_one_keeps_flowing(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    read_timeout_s = 3.0
    threads = 8
    # Given a merchant (host localhost) that hangs past the read timeout and one (host 127.0.0.1) that answers
    receiver.respond("/slow", Response(status=200, delay_s=10))
    receiver.respond("/fast", Response(status=200))
    start_workers(env={**env, "WHISKYPAY_WEBHOOK_READ_TIMEOUT_S": str(read_timeout_s)}, threads=threads)
    slow_url = f"http://localhost:{receiver.port}/slow"
    # When 40 callbacks to the slow merchant are queued first and hold every thread
    send_callbacks(slow_url, 40)
    receiver.wait_for(threads, path="/slow", timeout_s=15)
    saturated_at = time.monotonic()
    # And 10 fast callbacks come in while they hang, and 10 more once the slow host is capped
    first_wave = send_callbacks(receiver.url("/fast"), 10)
    receiver.wait_for(10, path="/fast", timeout_s=read_timeout_s + 10)
    time.sleep(max(0.0, saturated_at + read_timeout_s + 1.5 - time.monotonic()))
    second_wave = send_callbacks(receiver.url("/fast"), 10)
    receiver.wait_for(20, path="/fast", timeout_s=read_timeout_s + 10)
    time.sleep(0.3)
    # Then every fast callback arrived within one read timeout + 2 s of being sent, each once
    arrived = {hit.headers["webhook-id"]: hit.at for hit in receiver.requests("/fast")}
    assert len(receiver.requests("/fast")) == 20 and set(arrived) == set(first_wave) | set(second_wave)
    first = [arrived[webhook_id] - sent for webhook_id, sent in first_wave.items()]
    second = [arrived[webhook_id] - sent for webhook_id, sent in second_wave.items()]
    assert max(first + second) <= read_timeout_s + 2, (first, second)
    assert max(second) <= 2.0, second  # with the slow host capped, 6 threads are free for the fast one
    # And the slow host never had more requests in flight than there are threads, and at most 2 once capped
    slow_starts = [hit.at for hit in receiver.requests("/slow")]
    in_flight = read_timeout_s - 0.05  # the client gives up at read_timeout_s after sending
    first_window = max_concurrency([s for s in slow_starts if s < slow_starts[0] + read_timeout_s], in_flight)
    settled = max_concurrency(slow_starts, in_flight, since=slow_starts[0] + read_timeout_s + 0.5)
    assert first_window <= threads
    assert settled <= 2, f"{settled} slow requests in flight at once after the cap took effect"
    report(
        f"slow merchant: fast latency wave 1 (slow host saturating {threads} threads) p50 "
        f"{statistics.median(first):.2f} s max {max(first):.2f} s; wave 2 (slow host capped) p50 "
        f"{statistics.median(second):.2f} s max {max(second):.2f} s; slow host in flight: first window "
        f"{first_window}, after the cap {settled} (cap 2); slow requests {len(slow_starts)}"
    )
