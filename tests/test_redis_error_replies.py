"""Delivery guarantees when Redis answers with an error reply instead of dropping the connection (issue 9, 1-3).

A private redis-server of this module's own is put into the states a bad day brings: out of memory
(`maxmemory 1` with `noeviction`: OOM), a failover (`REPLICAOF` a master that is not there: READONLY), another
client's long script (BUSY), and an ACL user denied one command (a configuration error). The workers here are
real Dramatiq Worker threads on a WhiskyPayRedisBroker with our retry and dead-letter middleware and throwaway
actors; the send() tests use the broker `build_broker` makes. The email test runs a real worker process against
the real SMTP sink.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message, Worker

from middleware.dead_letters import DeadLetterReasons
from middleware.retry_policy import QueueRetryPolicy
from tests.helpers import FakeSentry, wait_until
from whiskypay import keys
from whiskypay.devstack import RedisServer, SmtpSink, free_port
from whiskypay.redis_broker import WhiskyPayRedisBroker
from whiskypay.retrying import RetryPolicy

NS = "t9"
QUEUE = "jobs"


# --------------------------------------------------------------------------------------------------------------------
# a Redis we may break, and the faults
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the private server, which is healthy and empty at the start and the end of each test."""
    client = redis.Redis.from_url(server.url)

    def heal() -> None:
        client.replicaof("NO", "ONE")
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("busy-reply-threshold", 5000)
        client.config_set("min-replicas-to-write", 0)
        for user in client.acl_users():
            if user != b"default" and user != "default":
                client.acl_deluser(user)
        client.flushall()

    heal()
    yield client
    heal()
    client.close()


class Fault:
    """One way for Redis to refuse writes with an error reply until `clear()` (from any thread)."""

    def __init__(self, admin: redis.Redis, kind: str) -> None:
        self.admin = admin
        self.kind = kind
        self.started = threading.Event()
        self._script: threading.Thread | None = None

    def start(self) -> None:
        if self.kind == "oom":
            self.admin.config_set("maxmemory-policy", "noeviction")
            self.admin.config_set("maxmemory", 1)
        elif self.kind == "readonly":
            self.admin.replicaof("127.0.0.1", free_port())  # no master there: a replica that keeps its data
        elif self.kind == "noreplicas":
            self.admin.config_set("min-replicas-to-write", 1)  # no replica is connected: NOREPLICAS to writes
        elif self.kind == "busy":
            self.admin.config_set("busy-reply-threshold", 20)
            busy = redis.Redis(host="127.0.0.1", port=self.admin.connection_pool.connection_kwargs["port"])
            spin = ("local t = redis.call('time') local s = t[1] + t[2] / 1e6 "
                    "repeat local n = redis.call('time') until n[1] + n[2] / 1e6 - s > tonumber(ARGV[1]) return 1")
            self._script = threading.Thread(target=busy.eval, args=(spin, 0, 0.6), daemon=True)
            self._script.start()
            time.sleep(0.1)
        else:
            raise ValueError(self.kind)
        self.started.set()

    def clear(self) -> None:
        if self.kind == "oom":
            self.admin.config_set("maxmemory", 0)
        elif self.kind == "readonly":
            self.admin.replicaof("NO", "ONE")
        elif self.kind == "noreplicas":
            self.admin.config_set("min-replicas-to-write", 0)
        elif self.kind == "busy" and self._script is not None:
            self._script.join(5)


def assert_refuses_writes(admin: redis.Redis, kind: str) -> None:
    """Check that the fault is what it claims: Redis answers a write with the expected error reply."""
    if kind == "busy":
        return  # only while the script runs: checked by the test's timing instead
    expected = {"oom": redis.exceptions.OutOfMemoryError, "readonly": redis.exceptions.ReadOnlyError,
                "noreplicas": redis.ResponseError}[kind]
    with pytest.raises(expected):
        admin.set("probe", 1)


# --------------------------------------------------------------------------------------------------------------------
# a worker on the private Redis
# --------------------------------------------------------------------------------------------------------------------


def make_broker(url: str) -> WhiskyPayRedisBroker:
    """A broker with our retry policy (2 attempts, 20 ms apart) and dead-letter reasons, and nothing else."""
    return WhiskyPayRedisBroker(
        client=redis.Redis.from_url(url, socket_timeout=5),
        namespace=NS,
        heartbeat_timeout=1_000,
        maintenance_interval_ms=100,
        middleware=[
            DeadLetterReasons(),
            QueueRetryPolicy(policies={}, default=RetryPolicy(attempts=2, backoff_ms=20)),
        ],
    )


@contextlib.contextmanager
def running(broker: WhiskyPayRedisBroker) -> Iterator[Worker]:
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=5_000)
        broker.close()


def acks(admin: redis.Redis) -> int:
    """How many messages some worker took and has not acked or nacked (all queues, all workers)."""
    return sum(int(admin.scard(key)) for key in admin.keys(f"{NS}:__acks__.*"))


def dead(admin: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in admin.hvals(f"{NS}:{QUEUE}.XQ.msgs")]


def declare(broker: WhiskyPayRedisBroker, fn: Callable[..., Any]) -> dramatiq.Actor[Any, Any]:
    return dramatiq.actor(fn, broker=broker, actor_name="job", queue_name=QUEUE)


def send(broker: WhiskyPayRedisBroker) -> None:
    broker.enqueue(Message(queue_name=QUEUE, actor_name="job", args=(), kwargs={}, options={}))


# --------------------------------------------------------------------------------------------------------------------
# 3. a retry, a dead letter, an ack that hit an error reply end up done once Redis accepts writes again
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["oom", "readonly", "noreplicas", "busy"])
def test_a_retry_scheduled_while_redis_refuses_writes_runs_once_redis_accepts_them(server, admin, kind, report):
    # Given a job whose first attempt fails just as Redis starts refusing writes
    broker = make_broker(server.url)
    fault = Fault(admin, kind)
    attempts: list[float] = []

    def job() -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            fault.start()
            raise RuntimeError("the first attempt fails")

    declare(broker, job)
    send(broker)
    with running(broker):
        assert fault.started.wait(5)
        assert_refuses_writes(admin, kind)
        # When Redis accepts writes again after a while
        time.sleep(0.5)
        fault.clear()
        cleared = time.monotonic()
        # Then the retry runs soon after, and nothing is left in a worker's acks or in the dead-letter queue
        wait_until(lambda: len(attempts) == 2, timeout_s=10, what="the retry")
        wait_until(lambda: acks(admin) == 0, timeout_s=5, what="no message left unacknowledged")
    assert dead(admin) == []
    assert len(attempts) == 2
    report(f"{kind}: retry ran {attempts[1] - cleared:.2f} s after Redis accepted writes again")


@pytest.mark.parametrize("kind", ["oom", "readonly", "noreplicas"])
def test_a_dead_letter_written_while_redis_refuses_writes_lands_once_redis_accepts_them(server, admin, kind):
    # Given a job that fails its last attempt just as Redis starts refusing writes
    broker = make_broker(server.url)
    fault = Fault(admin, kind)
    attempts: list[float] = []

    def job() -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 2:
            fault.start()
        raise RuntimeError(f"attempt {len(attempts)} fails")

    declare(broker, job)
    send(broker)
    with running(broker):
        assert fault.started.wait(5)
        time.sleep(0.5)
        assert acks(admin) == 1  # still held: nothing could be written
        # When Redis accepts writes again
        fault.clear()
        # Then the message is dead-lettered, with the reason, and no longer held by the worker
        (letter,) = wait_until(lambda: dead(admin), timeout_s=5, what="the dead letter")
        wait_until(lambda: acks(admin) == 0, timeout_s=5, what="no message left unacknowledged")
    assert letter["options"]["traceback"].startswith("RuntimeError: attempt 2 fails")
    assert len(attempts) == 2


@pytest.mark.parametrize("kind", ["oom", "readonly", "noreplicas"])
def test_an_ack_refused_by_redis_goes_through_once_redis_accepts_writes(server, admin, kind):
    # Given a job that succeeds, but Redis starts refusing writes before the worker acks it
    broker = make_broker(server.url)
    fault = Fault(admin, kind)
    runs: list[float] = []

    def job() -> None:
        runs.append(time.monotonic())
        fault.start()

    declare(broker, job)
    send(broker)
    with running(broker):
        assert fault.started.wait(5)
        time.sleep(0.5)
        # When Redis accepts writes again
        fault.clear()
        # Then the ack goes through: nothing held, nothing left in the queue, the job ran once
        wait_until(lambda: acks(admin) == 0, timeout_s=5, what="the ack")
        time.sleep(0.3)
    assert admin.hlen(f"{NS}:{QUEUE}.msgs") == 0
    assert dead(admin) == [] and len(runs) == 1


# --------------------------------------------------------------------------------------------------------------------
# 3. a configuration error: report it, stop consuming, keep the message for the next worker
# --------------------------------------------------------------------------------------------------------------------


def test_a_retry_redis_refuses_for_good_is_reported_and_the_worker_stops_but_keeps_the_message(
    server, admin, sentry: FakeSentry, caplog, tmp_path
):
    from middleware.worker_liveness import WorkerLiveness
    from whiskypay.worker_health import assess_workers, read_beats

    # Given a worker whose Redis user may not run HSET (so it can fetch and ack, but not enqueue a retry)
    admin.execute_command("ACL", "SETUSER", "worker", "on", ">pw", "~*", "&*", "+@all", "-hset")
    broker = make_broker(server.url.replace("redis://", "redis://worker:pw@"))
    liveness = WorkerLiveness(state_dir=str(tmp_path), beat_interval_s=60)
    broker.add_middleware(liveness)
    producer = make_broker(server.url)
    attempts: list[float] = []

    def job() -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("the first attempt fails")

    declare(broker, job)
    send(producer)
    with sentry.reporting_here(), running(broker):
        # When its first attempt fails and the retry cannot be written
        wait_until(lambda: attempts, what="the first attempt")
        time.sleep(0.5)
        # Then the message is neither acked nor lost: still this worker's, with its data
        assert acks(admin) == 1 and admin.hlen(f"{NS}:{QUEUE}.msgs") == 1
        # And the worker takes nothing more: a second job stays queued
        send(producer)
        time.sleep(0.6)
        assert admin.llen(f"{NS}:{QUEUE}") == 1
        assert len(attempts) == 1 and broker.halted.is_set()
        # And its readiness check fails, saying why
        liveness.beat()
        ready, why = assess_workers(read_beats(str(tmp_path)), now=time.time(), heartbeat_timeout_s=60,
                                    need_consumers=True)
        assert not ready and "stopped taking messages: Redis refused enqueuing message" in why, why
        # And the log and Sentry got the error once, with what to do about it
        events = wait_until(sentry.events, timeout_s=5, what="the Sentry event")
    assert len(events) == 1 and events[0]["tags"]["redis_error"] == "NOPERM"
    assert "configuration error" in caplog.text and "ACL" in caplog.text
    # When a worker with a proper Redis user runs after the first one stopped (its heartbeat ran out)
    admin.execute_command("ACL", "SETUSER", "worker", "+hset")
    fixed = make_broker(server.url)
    declare(fixed, job)
    with running(fixed):
        # Then the kept message is redelivered, retried, and both jobs run
        wait_until(lambda: len(attempts) >= 3, timeout_s=10, what="the kept message and the second job")
    assert not fixed.halted.is_set()


# --------------------------------------------------------------------------------------------------------------------
# 2. send() fails closed and in bounded time
# --------------------------------------------------------------------------------------------------------------------


def gateway(url: str, **settings: Any) -> dramatiq.Actor[Any, Any]:
    """Return an actor `notify` on a broker that build_broker made for url (the gateway's middleware)."""
    from settings import Settings
    from whiskypay.actor import WhiskyPayActor
    from whiskypay.broker import build_broker

    broker = build_broker(Settings(redis_url=url, **settings))  # type: ignore[arg-type]
    return dramatiq.actor(lambda **kw: None, broker=broker, actor_name="notify", queue_name="callbackQueue",
                          actor_class=WhiskyPayActor)


def stored(admin: redis.Redis) -> list[bytes]:
    """Every key the gateway wrote (the queue, its messages, reservations), but not pub/sub or heartbeats."""
    return sorted(key for key in admin.keys("whiskypay:*") if b"__heartbeats__" not in key)


@pytest.mark.parametrize("denied", ["set", "hset", "rpush"])
def test_a_send_redis_refuses_raises_enqueue_error_enqueues_nothing_and_reserves_nothing(server, admin, denied):
    from whiskypay.actor import EnqueueError

    # Given a gateway whose Redis user may not run one of the commands a send needs
    admin.execute_command("ACL", "SETUSER", "gw", "on", ">pw", "~*", "&*", "+@all", f"-{denied}")
    notify = gateway(server.url.replace("redis://", "redis://gw:pw@"))
    # When it sends an event
    with pytest.raises(EnqueueError, match="notify: the job was not accepted"):
        notify.send(event_id="evt_1")
    # Then nothing was enqueued and nothing reserved
    assert stored(admin) == []
    # And once Redis lets it, the gateway's retry of the same event is enqueued, once
    admin.execute_command("ACL", "SETUSER", "gw", f"+{denied}")
    first = notify.send(event_id="evt_1")
    again = notify.send(event_id="evt_1")
    assert again.message_id == first.message_id
    assert admin.llen("whiskypay:callbackQueue") == 1


def test_a_send_while_redis_is_out_of_memory_raises_enqueue_error_and_the_retry_goes_through(server, admin):
    from whiskypay.actor import EnqueueError

    notify = gateway(server.url)
    Fault(admin, "oom").start()
    with pytest.raises(EnqueueError, match="not accepting writes"):
        notify.send(event_id="evt_2")
    Fault(admin, "oom").clear()
    assert stored(admin) == []
    notify.send(event_id="evt_2")
    notify.send(event_id="evt_2")
    assert admin.llen("whiskypay:callbackQueue") == 1


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """Yield the port of a TCP server that accepts connections and never answers."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def test_a_send_with_an_event_id_answers_within_the_redis_timeout_when_redis_never_answers(report):
    from whiskypay.actor import EnqueueError

    timeout_s = 1.0
    with blackhole() as port:
        # Given a gateway whose Redis accepts connections and never answers
        notify = gateway(f"redis://127.0.0.1:{port}/0", redis_timeout_s=timeout_s)
        # When it sends an event
        started = time.monotonic()
        with pytest.raises(EnqueueError, match="WHISKYPAY_REDIS_URL"):
            notify.send(event_id="evt_3")
        elapsed = time.monotonic() - started
    # Then it raised within the Redis timeout plus a small margin (one round trip, not two)
    assert elapsed < timeout_s + 0.5, elapsed
    report(f"send(event_id=...) with Redis never answering: EnqueueError after {elapsed:.2f} s "
           f"(WHISKYPAY_REDIS_TIMEOUT_S={timeout_s:g})")


# --------------------------------------------------------------------------------------------------------------------
# 1. an email the relay accepted is never sent again because a Redis write failed
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_redis_running_out_of_memory_right_after_an_smtp_250_sends_no_second_copy(
    server, admin, smtp_sink: SmtpSink, start_workers, env, report
):
    # Given an email worker on the private Redis, and a relay that, as it accepts the first email, sees Redis
    # run out of memory (so the worker's "sent" marker write is refused right after the 250)
    fault = Fault(admin, "oom")
    accept = smtp_sink.handle_DATA  # type: ignore[attr-defined]

    async def accept_then_fill_redis(smtp: Any, session: Any, envelope: Any) -> str:
        status = str(await accept(smtp, session, envelope))
        if not fault.started.is_set():
            fault.start()
        return status

    smtp_sink.handle_DATA = accept_then_fill_redis  # type: ignore[attr-defined]
    start_workers("--queues", "emailQueue", env={**env, "WHISKYPAY_REDIS_URL": server.url}, threads=1)
    producer = WhiskyPayRedisBroker(client=redis.Redis.from_url(server.url), namespace="whiskypay")
    kwargs = {"buyer_email": "buyer@example.com", "merchant_email": "owner@merchant.example", "plan": "pro",
              "saas_name": "Acme"}
    producer.enqueue(Message(queue_name="emailQueue", actor_name="send_email", args=(), kwargs=kwargs, options={}))
    # When one email job runs and Redis accepts writes again a second after the buyer's 250
    smtp_sink.wait_for(1)
    time.sleep(1.0)
    fault.clear()
    cleared = time.monotonic()
    # Then the merchant gets theirs, and the buyer no second copy (a retry is 100 ms away: wait well past it)
    smtp_sink.wait_for(2, timeout_s=10)
    merchant_after = time.monotonic() - cleared
    time.sleep(1.5)
    recipients = sorted(rcpt for mail in smtp_sink.mails() for rcpt in mail.rcpt_tos)
    assert recipients == ["buyer@example.com", "owner@merchant.example"]
    assert admin.llen("whiskypay:emailQueue") == 0 and acks_of(admin, "whiskypay") == 0
    # And when a job comes back whose earlier attempt was killed during the buyer's SMTP exchange (its marker
    # still says "sending": the 250 may have come), the buyer's email is not sent again, the merchant's is
    smtp_sink.clear()
    crashed: Message[Any] = Message(queue_name="emailQueue", actor_name="send_email", args=(), kwargs=kwargs,
                                    options={})
    admin.set(keys.email_sent("whiskypay", crashed.message_id, "buyer"), "sending")
    producer.enqueue(crashed)
    (mail,) = smtp_sink.wait_for(1)
    time.sleep(0.5)
    assert mail.rcpt_tos == ("owner@merchant.example",) and len(smtp_sink.mails()) == 1
    producer.close()
    report(f"OOM right after the buyer's SMTP 250: buyer 1 copy, merchant 1 copy, {merchant_after:.2f} s after "
           "Redis accepted writes again; an attempt killed mid-exchange: buyer 0 copies more, merchant 1")


def acks_of(admin: redis.Redis, namespace: str) -> int:
    return sum(int(admin.scard(key)) for key in admin.keys(f"{namespace}:__acks__.*"))


# --------------------------------------------------------------------------------------------------------------------
# the delivery ledger's writer keeps what Redis refuses for a while (review)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["oom", "readonly", "noreplicas"])
def test_an_attempt_record_redis_refuses_for_a_while_is_kept_and_written_once_it_accepts_writes(
    server, admin, kind
):
    # Given a worker's ledger holding one record, and a Redis that refuses writes (redis-py strips the OOM /
    # READONLY code from the error's text, so only its class or status_code tells the kind)
    from middleware.ledger import DeliveryLedger
    from whiskypay.ledger import LedgerConfig, pending_op

    broker = make_broker(server.url)
    ledger_mw = DeliveryLedger(retention_s=3600, max_payments=100)
    config = LedgerConfig(namespace=NS, retention_s=3600, max_payments=100)
    message: Message[Any] = Message(
        queue_name="callbackQueue", actor_name="send_callback", args=(),
        kwargs={"callback_url": "https://m.example/h", "email": "b@example.com", "plan": "p", "price": 1,
                "event_id": "pay_kept"}, options={"redis_message_id": "r-1"},
    )
    op = pending_op(config, message, now_ms=int(time.time() * 1000))
    assert op is not None
    ledger_mw._backlog.append(op)
    fault = Fault(admin, kind)
    fault.start()
    try:
        assert_refuses_writes(admin, kind)
        # When the writer sends it while Redis refuses it
        assert ledger_mw.flush(broker) == 0
        # Then it is kept for the next round
        assert len(ledger_mw._backlog) == 1
    finally:
        fault.clear()
    # And once Redis accepts writes again it is written
    assert ledger_mw.flush(broker) == 1
    assert not ledger_mw._backlog
    assert admin.keys(keys.ledger_prefix(NS) + "*")
    broker.close()


# --------------------------------------------------------------------------------------------------------------------
# outcome counters: a flush Redis refuses part of never counts twice
# --------------------------------------------------------------------------------------------------------------------


def _delivered(counters: Any, broker: Any, merchant_id: str) -> None:
    from dramatiq.broker import MessageProxy

    message = MessageProxy(Message(queue_name=QUEUE, actor_name="job", args=(), kwargs={"merchant_id": merchant_id},
                                   options={}))
    counters.after_process_message(broker, message)


def test_a_counter_flush_redis_refuses_one_command_of_applies_nothing_and_counts_once_when_it_is_allowed(
    server, admin
):
    from dramatiq.brokers.redis import RedisBroker

    from middleware.outcome_counters import OutcomeCounters

    # Given a worker whose Redis user may HINCRBY but not HSETNX (the flush's `started_at`)
    admin.execute_command("ACL", "SETUSER", "counter", "on", ">pw", "~*", "&*", "+@all", "-hsetnx")
    client = redis.Redis.from_url(server.url.replace("redis://", "redis://counter:pw@"))
    broker = RedisBroker(client=client, namespace=NS, middleware=[])
    counters = OutcomeCounters(clock=lambda: 1_780_000_000, flush_interval_s=3600)
    # When two deliveries are counted and the flush is refused
    _delivered(counters, broker, "m_1")
    _delivered(counters, broker, "m_1")
    counters.flush(broker)
    # Then nothing was applied (not the HINCRBYs queued before the refused HSETNX either)
    stats, per_merchant = keys.outcome_counters(NS, QUEUE), keys.merchant_outcome_counters(NS, QUEUE)
    assert admin.hgetall(stats) == {} and admin.hgetall(per_merchant) == {}
    # When Redis allows it again and the next flush runs
    admin.execute_command("ACL", "SETUSER", "counter", "+hsetnx")
    counters.flush(broker)
    counters.flush(broker)
    # Then each delivery is counted once
    assert admin.hget(stats, "completed") == b"2"
    assert admin.hget(per_merchant, "completed:m_1") == b"2"
    client.close()


def test_a_counter_flush_one_key_of_fails_keeps_only_that_count(server, admin):
    from dramatiq.brokers.redis import RedisBroker

    from middleware.outcome_counters import OutcomeCounters

    # Given the per-merchant counters' key holding a string (WRONGTYPE for HINCRBY, inside EXEC)
    per_merchant = keys.merchant_outcome_counters(NS, QUEUE)
    admin.set(per_merchant, "not a hash")
    client = redis.Redis.from_url(server.url)
    broker = RedisBroker(client=client, namespace=NS, middleware=[])
    counters = OutcomeCounters(clock=lambda: 1_780_000_000, flush_interval_s=3600)
    # When a delivery is counted and flushed twice, the key repaired between the flushes
    _delivered(counters, broker, "m_1")
    counters.flush(broker)
    admin.delete(per_merchant)
    counters.flush(broker)
    counters.flush(broker)
    # Then the queue's count (applied by the first flush) is 1, not 2, and the merchant's came through once
    assert admin.hget(keys.outcome_counters(NS, QUEUE), "completed") == b"1"
    assert admin.hget(per_merchant, "completed:m_1") == b"1"
    client.close()


# --------------------------------------------------------------------------------------------------------------------
# a re-drive or a replay's promotion Redis refuses a write of loses nothing (writes first, the delete last)
# --------------------------------------------------------------------------------------------------------------------


def _dead_letter(admin: redis.Redis) -> Any:
    from whiskypay.dead_letters import decode_dead_letter, encode_message

    raw = encode_message({"queue_name": QUEUE, "actor_name": "job", "args": [], "kwargs": {}, "message_id": "m-1",
                          "message_timestamp": 1, "options": {"redis_message_id": "dead-1", "retries": 3}})
    admin.zadd(keys.dead_letters(NS, QUEUE), {"dead-1": 1_780_000_000_000})
    admin.hset(keys.dead_letter_messages(NS, QUEUE), "dead-1", raw)
    return decode_dead_letter(QUEUE, "dead-1", raw, 1_780_000_000_000)


@pytest.mark.parametrize(("paced", "denied"), [(False, "rpush"), (False, "hset"), (True, "zadd"), (True, "hset"),
                                                (False, "publish")])
def test_a_redrive_redis_refuses_a_write_of_keeps_the_dead_letter_and_goes_through_once_allowed(
    server, admin, paced, denied
):
    from whiskypay.dead_letters import redrive, redrive_paced

    # Given a dead letter, and an operator's Redis user that may not run one of the re-drive's writes
    letter = _dead_letter(admin)
    admin.execute_command("ACL", "SETUSER", "ops", "on", ">pw", "~*", "&*", "+@all", f"-{denied}")
    client = redis.Redis.from_url(server.url.replace("redis://", "redis://ops:pw@"))

    def move() -> str:
        if paced:
            return redrive_paced(client, NS, letter, order=1, new_id="new-1")[0]
        return redrive(client, NS, letter, new_id="new-1")

    target = keys.replay_lane(NS, QUEUE) if paced else keys.queue(NS, QUEUE)
    # When it re-drives it
    with pytest.raises(redis.ResponseError, match=r"can.t run this command"):
        move()
    # Then the dead letter is still there, as it was, and nothing was listed on the queue or the lane
    assert admin.zscore(keys.dead_letters(NS, QUEUE), "dead-1") is not None
    assert admin.hget(keys.dead_letter_messages(NS, QUEUE), "dead-1") == letter.raw
    assert admin.exists(target) == 0
    # When Redis allows it and the re-drive is run again
    admin.execute_command("ACL", "SETUSER", "ops", f"+{denied}")
    assert move() == "re-driven"
    # Then it moved once
    assert admin.zcard(keys.dead_letters(NS, QUEUE)) == 0
    listed = admin.zrange(target, 0, -1) if paced else admin.lrange(target, 0, -1)
    assert listed == [b"new-1"]
    client.close()


@pytest.mark.parametrize("denied", ["rpush", "hset"])
def test_a_promotion_redis_refuses_a_write_of_leaves_the_replay_in_its_lane(server, admin, denied):
    from whiskypay.replay import LanePromoter, add_to_lane

    # Given one replay waiting in the lane, and a worker's Redis user that may not run one of the promotion's writes
    message = {"queue_name": QUEUE, "actor_name": "job", "args": [], "kwargs": {}, "message_id": "m-1",
               "message_timestamp": 1, "options": {"redis_message_id": "r-1"}}
    pipe = admin.pipeline()
    add_to_lane(pipe, NS, QUEUE, message, json.dumps(message).encode(), 1)
    pipe.execute()
    admin.execute_command("ACL", "SETUSER", "wk", "on", ">pw", "~*", "&*", "+@all", f"-{denied}")
    client = redis.Redis.from_url(server.url.replace("redis://", "redis://wk:pw@"))
    # When the consumer promotes it
    with pytest.raises(redis.ResponseError, match=r"can.t run this command"):
        LanePromoter(client, NS, rate=100).promote(QUEUE, 1, now_ms=1_000)
    # Then the replay is still in its lane, with its message
    assert admin.zrange(keys.replay_lane(NS, QUEUE), 0, -1) == [b"r-1"]
    assert admin.hexists(keys.replay_lane_messages(NS, QUEUE), "r-1")
    # When Redis allows it, then the next promotion moves it onto the queue, once
    admin.execute_command("ACL", "SETUSER", "wk", f"+{denied}")
    assert LanePromoter(client, NS, rate=100).promote(QUEUE, 1, now_ms=2_000) == (1, 0)
    assert admin.lrange(keys.queue(NS, QUEUE), 0, -1) == [b"r-1"] and admin.zcard(keys.replay_lane(NS, QUEUE)) == 0
    client.close()
