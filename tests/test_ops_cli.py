"""The operations command line: `whiskypay status`, `whiskypay failed`, `whiskypay retry` (issue: ops CLI).

Pure helpers first (no Redis), then the commands against the test Redis and real `dramatiq actors` workers
delivering to the devstack's HTTP receiver and SMTP sink.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from middleware.outcome_counters import OutcomeCounters
from tests.helpers import NAMESPACE, TEST_SECRET, dead_letters, wait_until
from whiskypay import keys
from whiskypay.cli.ops import format_table, shorten
from whiskypay.dead_letters import decode_dead_letter, encode_message, redriven
from whiskypay.devstack import HttpReceiver, Response, free_port
from whiskypay.redaction import redact_url

SECRET = TEST_SECRET
BUYER = "buyer@example.com"
REPO_ROOT = Path(__file__).resolve().parent.parent


def whiskypay_executable() -> list[str]:
    """Return the installed `whiskypay` console script of this venv (or `python -m whiskypay.cli`)."""
    script = Path(sys.executable).parent / "whiskypay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "whiskypay.cli"]


# --------------------------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6390/0", "redis://:***@127.0.0.1:6390/0"),
        ("redis://ops:hunter2@redis.internal:6379/2", "redis://ops:***@redis.internal:6379/2"),
        ("rediss://default:p%40ss@cache:6380", "rediss://default:***@cache:6380"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock?db=1&password=hunter2", "unix:///run/redis.sock?db=1&password=***"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def _failed_callback(**options: Any) -> dict[str, Any]:
    return {
        "queue_name": "callbackQueue", "actor_name": "send_callback", "args": [],
        "kwargs": {"callback_url": "https://shop.example/hooks/pay?token=SECRET-TOKEN", "email": BUYER,
                   "plan": "pro", "price": 19.99},
        "options": {"redis_message_id": "old-id", "webhook_id": "evt_42", "retries": 4, "failed_at": 1_780_000_000_000,
                    "traceback": "HttpStatusError: HTTP 503 from shop.example", "failure_class": "HttpStatusError",
                    "requeue_timestamp": 1_779_999_999_000, **options},
        "message_id": "6f1c0a52-0000-4000-8000-000000000001", "message_timestamp": 1_779_999_000_000,
    }


def test_a_redriven_message_starts_over_but_keeps_its_ids() -> None:
    message = _failed_callback(eta=1_780_000_000_500, max_retries=9)
    new = redriven(message, queue="callbackQueue", redis_message_id="new-id")
    # (ledger_delivery: the re-drive is the webhook's second delivery in the delivery ledger)
    assert new["options"] == {"redis_message_id": "new-id", "webhook_id": "evt_42", "max_retries": 9,
                              "ledger_delivery": 2}
    assert new["message_id"] == message["message_id"]
    assert new["kwargs"] == message["kwargs"] and new["queue_name"] == "callbackQueue"
    assert message["options"]["retries"] == 4, "the dead letter itself is not modified"


def test_a_dead_letter_shows_host_attempts_error_and_a_masked_buyer_only() -> None:
    letter = decode_dead_letter("callbackQueue", "old-id", encode_message(_failed_callback()), 1_780_000_000_900)
    summary = letter.summary()
    assert summary["callback_host"] == "shop.example"
    assert summary["attempts"] == 5
    assert summary["buyer"] == "b***@example.com"
    assert summary["failed_at_ms"] == 1_780_000_000_000 and summary["failed_at"] == "2026-05-28T20:26:40.000Z"
    assert summary["last_error"] == "HttpStatusError: HTTP 503 from shop.example"
    assert BUYER not in json.dumps(summary) and "SECRET-TOKEN" not in json.dumps(summary)


def test_positional_arguments_are_read_by_position() -> None:
    message = {"actor_name": "send_email", "args": ["buyer@example.com", "owner@merchant.example"], "kwargs": {},
               "options": {}, "message_id": "m1", "queue_name": "emailQueue"}
    letter = decode_dead_letter("emailQueue", "r1", encode_message(message), 5)
    assert letter.buyer == "b***@example.com" and letter.callback_host is None
    assert letter.failed_at_ms == 5 and letter.attempts == 1


@pytest.mark.parametrize(("raw", "problem"), [(b"{not json", "not JSON"), (b"\xff\xfe", "not JSON"),
                                               (b'["a list"]', "not a Dramatiq message")])
def test_unreadable_dead_letters_are_described_not_decoded(raw: bytes, problem: str) -> None:
    letter = decode_dead_letter("callbackQueue", "r1", raw, 7)
    assert letter.message is None and letter.problem is not None and letter.problem.startswith(problem)
    assert letter.message_id == "r1" and letter.error == f"unreadable: {letter.problem}"


def test_format_table_aligns_columns_and_right_aligns_numbers() -> None:
    table = format_table(("QUEUE", "WAITING", "NOTE"), [("callbackQueue", 3, None), ("emailQueue", 120, "x")],
                         right=(1,))
    assert table.splitlines() == [
        "QUEUE          WAITING  NOTE",
        "callbackQueue        3  -",
        "emailQueue         120  x",
    ]


def test_shorten_keeps_one_line_within_the_limit() -> None:
    assert shorten("a\nb   c", 10) == "a b c"
    assert shorten("x" * 20, 10) == "x" * 9 + "…"


# --------------------------------------------------------------------------------------------------------------------
# the counters middleware
# --------------------------------------------------------------------------------------------------------------------


def test_outcome_counters_run_their_after_hooks_after_the_middleware_that_decide_failure() -> None:
    import actors
    from middleware.dead_letters import DeadLetterReasons
    from middleware.retry_policy import QueueRetryPolicy
    from middleware.sentry import SentryReporting

    kinds = [type(middleware) for middleware in actors.broker.middleware]
    assert kinds.count(OutcomeCounters) == 1
    position = kinds.index(OutcomeCounters)
    for decider in (SentryReporting, DeadLetterReasons, QueueRetryPolicy):
        assert position < kinds.index(decider), f"{decider.__name__} must come after OutcomeCounters"


def test_a_redis_error_while_counting_is_logged_once_at_debug_and_never_raised(caplog) -> None:
    from dramatiq import Message
    from dramatiq.broker import MessageProxy
    from dramatiq.brokers.redis import RedisBroker

    # Given a broker whose Redis does not answer
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    broker = RedisBroker(client=client, namespace="whiskypay", middleware=[])
    counters = OutcomeCounters(clock=lambda: 1_780_000_000, flush_interval_s=0)
    message = MessageProxy(Message(queue_name="callbackQueue", actor_name="a", args=(), kwargs={}, options={}))
    # When two messages complete
    with caplog.at_level(logging.DEBUG, logger="middleware.outcome_counters"):
        counters.after_process_message(broker, message)
        counters.after_process_message(broker, message)
    # Then nothing was raised, and one debug line names the key
    lines = [record for record in caplog.records if "Could not count outcomes" in record.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert "whiskypay:whiskypay.stats:callbackQueue" in lines[0].getMessage()


def test_counters_count_completed_and_failed_and_remember_when_they_started(redis_client) -> None:
    from dramatiq import Message
    from dramatiq.broker import MessageProxy

    import actors

    counters = OutcomeCounters(clock=lambda: 1_780_000_000, flush_interval_s=0)
    done = MessageProxy(Message(queue_name="callbackQueue.DQ", actor_name="a", args=(), kwargs={}, options={}))
    failed = MessageProxy(Message(queue_name="callbackQueue", actor_name="a", args=(), kwargs={}, options={}))
    failed.fail()
    retried = MessageProxy(Message(queue_name="callbackQueue", actor_name="a", args=(), kwargs={}, options={}))
    counters.after_process_message(actors.broker, done)
    counters.after_process_message(actors.broker, failed, exception=RuntimeError("x"))
    counters.after_skip_message(actors.broker, failed)
    counters.after_process_message(actors.broker, retried, exception=RuntimeError("will be retried"))
    stats = redis_client.hgetall(keys.outcome_counters(NAMESPACE, "callbackQueue"))
    assert stats == {b"completed": b"1", b"failed": b"2", b"started_at": b"1780000000"}


def test_counts_wait_in_memory_until_the_flush_interval_passes(redis_client) -> None:
    from dramatiq import Message
    from dramatiq.broker import MessageProxy

    import actors

    # Given counters that write at most every 10 s, on a clock we move by hand
    now = [1_780_000_000.0]
    counters = OutcomeCounters(clock=lambda: now[0], flush_interval_s=10)
    done = MessageProxy(Message(queue_name="callbackQueue", actor_name="a", args=(), kwargs={}, options={}))
    key = keys.outcome_counters(NAMESPACE, "callbackQueue")
    # When three messages complete within the interval, nothing is written yet
    for _ in range(3):
        counters.after_process_message(actors.broker, done)
    assert redis_client.hgetall(key) == {}
    # Then the first count after the interval writes all four in one go
    now[0] += 10
    counters.after_process_message(actors.broker, done)
    assert redis_client.hget(key, "completed") == b"4"
    # And shutdown writes what is left
    counters.after_process_message(actors.broker, done)
    counters.after_worker_shutdown(actors.broker, None)  # type: ignore[arg-type]
    assert redis_client.hget(key, "completed") == b"5"


# --------------------------------------------------------------------------------------------------------------------
# the commands, against Redis and real workers
# --------------------------------------------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `whiskypay argv...` in this process; return (exit status, stdout, stderr)."""
    from whiskypay.cli import main

    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def status_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, _ = cli(capsys, "status", "--json")
    assert code == 0
    return json.loads(out)["queues"]  # type: ignore[no-any-return]


def pay(receiver: HttpReceiver, path: str = "/hook", **overrides: object) -> str:
    from actors import send_callback

    kwargs: dict[str, object] = {"callback_url": receiver.url(path), "email": BUYER, "plan": "pro", "price": 19.99,
                                 "timestamp": "2026-11-27T21:00:00Z"}
    kwargs.update(overrides)
    return send_callback.send(**kwargs).message_id


def xq_size(client: redis.Redis, queue: str = "callbackQueue") -> int:
    return int(client.zcard(f"{NAMESPACE}:{queue}.XQ"))


def test_status_counts_waiting_messages_without_workers(redis_client, receiver, capsys) -> None:
    # Given three callbacks enqueued and no worker
    for _ in range(3):
        pay(receiver)
    # When status runs, as text and as JSON
    code, out, _ = cli(capsys, "status")
    queues = status_json(capsys)
    # Then three wait on callbackQueue, nothing else is counted yet
    assert code == 0
    assert queues["callbackQueue"] == {"waiting": 3, "delayed": 0, "in_flight": 0, "dead_lettered": 0,
                                       "completed": 0, "failed": 0, "parked": 0, "counting_since": None}
    assert queues["emailQueue"]["waiting"] == 0
    header, *rows = out.splitlines()
    assert header.split() == ["QUEUE", "WAITING", "DELAYED", "IN", "FLIGHT", "DEAD-LETTERED", "COMPLETED",
                              "FAILED", "PARKED", "COUNTING", "SINCE"]
    by_queue = {row.split()[0]: row for row in rows}
    assert by_queue["callbackQueue"].split()[:7] == ["callbackQueue", "3", "0", "0", "0", "0", "0"]
    assert by_queue["callbackQueue"].endswith("not started") and "emailQueue" in by_queue


@pytest.mark.e2e
def test_status_counts_dead_letters_failures_and_completions_from_real_workers(
    redis_client, receiver, start_workers, env, capsys
) -> None:
    # Given a worker with one attempt per callback, and a merchant path that answers 503
    receiver.respond("/broken", Response(503))
    start_workers("--queues", "callbackQueue", env={**env, "WHISKYPAY_CALLBACK_ATTEMPTS": "1"})
    before = time.time()
    # When one callback goes to the broken path and two to a working one
    pay(receiver, "/broken")
    pay(receiver, "/ok")
    pay(receiver, "/ok")
    # Then status shows one dead letter, one failure and two completions, counted since just now
    queues = wait_until(
        lambda: (q := status_json(capsys)) and q["callbackQueue"]["completed"] == 2
        and q["callbackQueue"]["failed"] == 1 and q["callbackQueue"]["dead_lettered"] == 1 and q,
        what="the counters",
    )
    callbacks = queues["callbackQueue"]
    assert callbacks["waiting"] == 0 and callbacks["delayed"] == 0 and callbacks["in_flight"] == 0
    since = time.mktime(time.strptime(callbacks["counting_since"], "%Y-%m-%dT%H:%M:%S.000Z")) - time.timezone
    assert before - 2 <= since <= time.time() + 1
    assert queues["emailQueue"]["completed"] == 0
    # And the installed console script says the same, as a subprocess with the test environment
    run = subprocess.run([*whiskypay_executable(), "status", "--queue", "callbackQueue"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    row = run.stdout.splitlines()[1].split()
    assert row[:7] == ["callbackQueue", "0", "0", "0", "1", "2", "1"]
    assert run.stdout.rstrip().endswith("UTC")


def test_an_unreachable_redis_exits_2_quickly_naming_the_setting_without_the_password(worker_env) -> None:
    port = free_port()
    env = {**worker_env, "WHISKYPAY_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"}
    started = time.monotonic()
    run = subprocess.run([*whiskypay_executable(), "status"], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=30, check=False)
    assert time.monotonic() - started < 10
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "WHISKYPAY_REDIS_URL" in lines[0] and f"redis://:***@127.0.0.1:{port}/0" in lines[0]
    assert "hunter2" not in run.stderr


def test_a_malformed_redis_url_stops_status_and_import_actors_without_quoting_its_password(worker_env) -> None:
    # Given a Redis URL whose password has an unencoded "/" and "#" (a traceback used to quote part of it)
    env = {**worker_env, "WHISKYPAY_REDIS_URL": "redis://:TOPSECRET/pa#rt@127.0.0.1:6379/0"}
    # When `whiskypay status` runs, and when a process imports actors
    status = subprocess.run([*whiskypay_executable(), "status"], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=30, check=False)  # fmt: skip
    imported = subprocess.run([sys.executable, "-c", "import actors"], env=env, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip
    # Then both stop, naming the variable and the fix, and neither prints any part of the password
    assert status.returncode == 2 and imported.returncode != 0
    for run in (status, imported):
        output = run.stdout + run.stderr
        assert "WHISKYPAY_REDIS_URL" in output and "must be percent-encoded" in output
        for fragment in ("TOPSECRET", "pa#rt", "rt@127"):
            assert fragment not in output, output
    assert len(status.stderr.strip().splitlines()) == 1


def test_a_redis_that_never_answers_fails_within_the_redis_timeout(worker_env) -> None:
    # Given a server that accepts connections and never says anything
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = {**worker_env, "WHISKYPAY_REDIS_URL": f"redis://:hunter2@127.0.0.1:{silent.getsockname()[1]}/0",
               "WHISKYPAY_REDIS_TIMEOUT_S": "0.5"}
        started = time.monotonic()
        run = subprocess.run([*whiskypay_executable(), "failed"], env=env, cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=30, check=False)
        elapsed = time.monotonic() - started
    # Then it gives up after about one timeout, with the same one-line message
    assert run.returncode == 2 and elapsed < 8
    assert "TimeoutError" in run.stderr and "WHISKYPAY_REDIS_URL" in run.stderr and "hunter2" not in run.stderr


def dead_letter_callbacks(receiver: HttpReceiver, start_workers: Any, env: dict[str, str], redis_client: redis.Redis,
                          count: int, *, attempts: int) -> tuple[Any, list[str]]:
    """Send count callbacks to a 503 path and wait until all are dead-lettered; return (workers, message ids).

    The merchant's breaker would open after 10 failures in a row and park the rest: these tests need dead letters,
    so the threshold is above count * attempts.
    """
    receiver.respond("/hook", Response(503))
    worker = start_workers("--queues", "callbackQueue", env={
        **env, "WHISKYPAY_CALLBACK_ATTEMPTS": str(attempts), "WHISKYPAY_BREAKER_FAILURES": str(count * attempts + 1)
    })
    ids = [pay(receiver) for _ in range(count)]
    wait_until(lambda: xq_size(redis_client) == count, what=f"{count} dead letters")
    assert len(receiver.requests("/hook")) == count * attempts
    return worker, ids


@pytest.mark.e2e
def test_failed_lists_id_host_error_and_attempts_with_the_buyer_masked(
    redis_client, receiver, start_workers, env, capsys
) -> None:
    # Given one callback dead-lettered after two 503s
    _, (message_id,) = dead_letter_callbacks(receiver, start_workers, env, redis_client, 1, attempts=2)
    # When failed runs as text and as JSON
    code, out, err = cli(capsys, "failed")
    json_code, json_out, _ = cli(capsys, "failed", "--queue", "callbackQueue", "--json")
    # Then the row names the message, the host, two attempts, the 503 and the masked buyer only
    assert code == 0 and json_code == 0 and err == ""
    header, row = out.splitlines()
    assert header.split()[:5] == ["MESSAGE", "ID", "ACTOR", "QUEUE", "FAILED"]
    assert row.split()[:3] == [message_id, "send_callback", "callbackQueue"]
    assert row.split()[6:9] == ["2", "-", "127.0.0.1"]  # attempts, merchant (none given), host
    assert "  127.0.0.1  b***@example.com  HttpStatusError: HTTP 503 from 127.0.0.1" in row
    (letter,) = json.loads(json_out)["dead_letters"]
    assert letter["message_id"] == message_id and letter["attempts"] == 2
    assert letter["callback_host"] == "127.0.0.1" and letter["buyer"] == "b***@example.com"
    assert letter["webhook_id"] == f"msg_{message_id}" and "503" in letter["last_error"]
    for text in (out, json_out):
        assert BUYER not in text and "/hook" not in text and "kwargs" not in text


@pytest.mark.e2e
def test_retry_redrives_each_dead_letter_once_with_its_webhook_id(
    redis_client, receiver, start_workers, env, capsys
) -> None:
    # Given three callbacks dead-lettered after two 503s each, and a merchant that has recovered
    _, ids = dead_letter_callbacks(receiver, start_workers, env, redis_client, 3, attempts=2)
    receiver.respond("/hook", Response(200))

    # When a dry run is asked for, nothing moves
    code, out, _ = cli(capsys, "retry", "--queue", "callbackQueue", "--all", "--dry-run")
    assert code == 0 and "Would re-drive 3 dead letter(s) onto callbackQueue (dry run: nothing moved)." in out
    time.sleep(0.5)
    assert xq_size(redis_client) == 3 and len(receiver.requests()) == 6

    # When one id is re-driven, only that one is delivered
    code, out, _ = cli(capsys, "retry", "--queue", "callbackQueue", "--id", ids[0])
    assert code == 0 and "Re-drove 1 dead letter(s) onto callbackQueue." in out
    assert out.splitlines()[1].split()[:2] == ["re-driven", ids[0]]
    receiver.wait_for(7)
    time.sleep(0.5)
    assert xq_size(redis_client) == 2 and len(receiver.requests()) == 7

    # When the rest are re-driven, twice
    code, out, _ = cli(capsys, "retry", "--queue", "callbackQueue", "--all")
    assert code == 0 and "Re-drove 2 dead letter(s)" in out
    code, out, _ = cli(capsys, "retry", "--queue", "callbackQueue", "--all")
    assert code == 0 and out.strip() == "Re-drove 0 dead letter(s) onto callbackQueue."

    # Then each message was delivered exactly once more, with the webhook-id of its failed attempts
    receiver.wait_for(9)
    time.sleep(0.7)
    requests = receiver.requests("/hook")
    assert len(requests) == 9
    per_webhook_id = Counter(request.headers["webhook-id"] for request in requests)
    assert per_webhook_id == {f"msg_{message_id}": 3 for message_id in ids}
    assert xq_size(redis_client) == 0 and dead_letters(redis_client, "callbackQueue") == []
    # And the re-driven attempts count as completed; the first failures stay counted
    callbacks = wait_until(lambda: (q := status_json(capsys)["callbackQueue"])["completed"] == 3 and q,
                           what="three completions")
    assert callbacks["failed"] == 3 and callbacks["dead_lettered"] == 0


@pytest.mark.e2e
def test_two_concurrent_retries_enqueue_each_dead_letter_once(
    redis_client, receiver, start_workers, env, capsys
) -> None:
    # Given twenty dead letters and no worker running
    worker, ids = dead_letter_callbacks(receiver, start_workers, env, redis_client, 20, attempts=1)
    worker.stop()
    # When two `retry --all` run at the same time on the same set
    from whiskypay.cli import main

    barrier = threading.Barrier(2)
    codes: list[int] = []

    def retry() -> None:
        barrier.wait()
        codes.append(main(["retry", "--queue", "callbackQueue", "--all"]))

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    out = capsys.readouterr().out
    # Then every message is in the queue's replay lane exactly once, with a fresh attempt count, none dead-lettered
    from whiskypay import keys

    assert codes == [0, 0]
    queued_ids = [raw.decode() for raw in redis_client.zrange(keys.replay_lane(NAMESPACE, "callbackQueue"), 0, -1)]
    stored = redis_client.hgetall(keys.replay_lane_messages(NAMESPACE, "callbackQueue"))
    assert len(queued_ids) == 20 and set(queued_ids) == {key.decode() for key in stored}
    messages = [json.loads(stored[redis_id.encode()]) for redis_id in queued_ids]
    assert sorted(message["message_id"] for message in messages) == sorted(ids)
    assert all("retries" not in message["options"] and "traceback" not in message["options"] for message in messages)
    pairs = zip(messages, queued_ids, strict=True)
    assert all(message["options"]["redis_message_id"] == redis_id for message, redis_id in pairs)
    assert xq_size(redis_client) == 0
    moved = [line.split()[1] for line in out.splitlines() if line.startswith("re-driven ")]
    assert sorted(moved) == sorted(ids), "each message was moved by exactly one of the two runs"


def test_an_unreadable_dead_letter_is_reported_and_left_in_place(redis_client, capsys) -> None:
    # Given a dead letter whose stored JSON is damaged
    redis_client.zadd(f"{NAMESPACE}:callbackQueue.XQ", {"broken-1": 1_780_000_000_000})
    redis_client.hset(f"{NAMESPACE}:callbackQueue.XQ.msgs", "broken-1", b"{\"actor_name\": \"send_ca")
    # When it is listed and re-driven
    _, listed, _ = cli(capsys, "failed")
    code, out, _ = cli(capsys, "retry", "--queue", "callbackQueue", "--all")
    # Then it is shown as unreadable, skipped with exit 1, and still dead-lettered
    assert "broken-1" in listed and "unreadable: not JSON" in listed
    assert code == 1 and "skipped (unreadable JSON, left in place)" in out and "Skipped 1 unreadable" in out
    assert xq_size(redis_client) == 1 and redis_client.llen(f"{NAMESPACE}:callbackQueue") == 0


def test_retry_of_an_unknown_id_moves_nothing_and_exits_1(redis_client, capsys) -> None:
    code, out, _ = cli(capsys, "retry", "--queue", "emailQueue", "--id", "no-such-message")
    assert code == 1 and "not found: no-such-message is not dead-lettered in emailQueue" in out


@pytest.mark.e2e
def test_a_dead_lettered_email_is_redriven_after_the_smtp_server_recovers_and_sent_once(
    redis_client, smtp_sink, start_workers, env, capsys
) -> None:
    from actors import send_email

    # Given an SMTP server that permanently refuses the merchant's address once
    smtp_sink.fail_next(1, code=550, text="5.1.1 mailbox unavailable", stage="RCPT", rcpt="owner@merchant.example")
    start_workers("--queues", "emailQueue", env=env)
    message_id = send_email.send(buyer_email=BUYER, merchant_email="owner@merchant.example", plan="pro",
                                 saas_name="Acme Analytics").message_id
    wait_until(lambda: xq_size(redis_client, "emailQueue") == 1, what="the email dead letter")
    _, listed, _ = cli(capsys, "failed", "--queue", "emailQueue")
    assert "SmtpPermanentError: SMTP 550" in listed
    assert listed.splitlines()[1].split()[6:10] == ["1", "-", "-", "b***@example.com"]
    assert BUYER not in listed
    # When it is re-driven (the sink has recovered: its one failure is spent)
    code, out, _ = cli(capsys, "retry", "--queue", "emailQueue", "--all")
    # Then the merchant gets the email once, and the buyer's, sent before the failure, is not sent again
    assert code == 0 and message_id in out
    smtp_sink.wait_for(2)
    time.sleep(0.7)
    recipients = sorted(rcpt for mail in smtp_sink.mails() for rcpt in mail.rcpt_tos)
    assert recipients == [BUYER, "owner@merchant.example"]
    assert xq_size(redis_client, "emailQueue") == 0
    assert wait_until(lambda: status_json(capsys)["emailQueue"]["completed"] == 1, what="the completion")


def test_the_commands_are_registered_with_their_options() -> None:
    from whiskypay.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["retry", "--queue", "callbackQueue", "--id", "a", "b", "--id", "c", "--dry-run"])
    assert args.id == ["a", "b", "c"] and args.dry_run and not args.all
    with pytest.raises(SystemExit):
        parser.parse_args(["retry", "--queue", "callbackQueue"])  # neither --id nor --all
    with pytest.raises(SystemExit):
        parser.parse_args(["retry", "--queue", "callbackQueue", "--all", "--id", "a"])
    assert parser.parse_args(["failed"]).limit == 50
