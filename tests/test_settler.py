"""The Settler (whiskypay/settler.py): a worker process's acks and ledger records go out in batched rounds.

Through a real Dramatiq Worker on our broker and the test Redis (NOPERM on a private server).
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import redis
from dramatiq import Worker

from tests.helpers import NAMESPACE, wait_until
from whiskypay import keys
from whiskypay.devstack import RedisServer
from whiskypay.redis_broker import WhiskyPayRedisBroker


def _evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def _unacked(client: redis.Redis, broker: WhiskyPayRedisBroker, queue: str) -> int:
    return int(client.hlen(keys.messages(NAMESPACE, queue))) + int(
        client.scard(keys.acks(NAMESPACE, broker.broker_id, queue))
    )


def test_acks_of_many_threads_share_script_calls_and_every_message_is_acked(
    whiskypay_broker: Any, redis_client: redis.Redis
) -> None:
    # Given our broker, and a worker of 8 threads whose actor holds each thread a little while
    broker: WhiskyPayRedisBroker = whiskypay_broker()
    done: list[int] = []
    lock = threading.Lock()

    @dramatiq.actor(broker=broker, queue_name="settleq")
    def work(n: int) -> None:
        threading.Event().wait(0.002)
        with lock:
            done.append(n)

    for n in range(400):
        work.send(n)
    redis_client.config_resetstat()
    worker = Worker(broker, worker_timeout=50, worker_threads=8)
    worker.start()
    try:
        # When all 400 ran
        assert wait_until(lambda: len(done) == 400, timeout_s=30)
        # Then every message is acked (gone from the queue's hash and the worker's ack set)
        assert wait_until(lambda: _unacked(redis_client, broker, "settleq") == 0, timeout_s=10)
        # And the acks took far fewer script calls than messages (every call counted: fetches and acks)
        calls = _evalsha_calls(redis_client)
        assert calls < 400 / 2, f"{calls} EVALSHA calls for 400 messages"
    finally:
        worker.stop()
    assert sorted(done) == list(range(400))


def test_a_worker_stopped_right_after_its_messages_ran_leaves_none_unacked(
    whiskypay_broker: Any, redis_client: redis.Redis
) -> None:
    # Given a Settler that gathers for a long time (its round would come well after the stop)
    broker: WhiskyPayRedisBroker = whiskypay_broker()
    broker.settler.gather_s = 5.0
    ran = threading.Semaphore(0)

    @dramatiq.actor(broker=broker, queue_name="stopq")
    def work() -> None:
        ran.release()

    for _ in range(5):
        work.send()
    worker = Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    for _ in range(5):
        assert ran.acquire(timeout=10)
    # When the worker is stopped at once
    worker.stop(timeout=10_000)
    # Then the consumers' close sent the queued acks: nothing is left for maintenance to redeliver
    assert _unacked(redis_client, broker, "stopq") == 0


def test_an_ack_redis_refuses_for_permissions_halts_the_worker_and_the_message_stays_for_a_restart() -> None:
    # Given a private Redis whose ACL user may do everything but SREM (Dramatiq's ack)
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    try:
        admin.execute_command("ACL", "SETUSER", "w", "on", ">pw", "~*", "&*", "+@all", "-srem")
        client = redis.Redis(host="127.0.0.1", port=server.port, username="w", password="pw")
        broker = WhiskyPayRedisBroker(client=client, namespace=NAMESPACE, middleware=[])
        ran = threading.Event()

        @dramatiq.actor(broker=broker, queue_name="permq")
        def work() -> None:
            ran.set()

        work.send()
        worker = Worker(broker, worker_timeout=50, worker_threads=1)
        worker.start()
        try:
            assert ran.wait(10)
            # When its ack is refused (NOPERM)
            # Then the worker halts (readiness says why), and the message stays in its ack set and hash
            assert wait_until(lambda: broker.halted.is_set(), timeout_s=10)
            assert "acknowledging" in broker.halt_reason
            assert admin.scard(keys.acks(NAMESPACE, broker.broker_id, "permq")) == 1
            assert admin.hlen(keys.messages(NAMESPACE, "permq")) == 1
        finally:
            worker.stop(timeout=5_000)
            broker.close()
    finally:
        admin.close()
        server.stop()
