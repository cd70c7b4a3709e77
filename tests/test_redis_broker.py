"""WhiskyPayRedisBroker: instant pickup through pub/sub wake-up, maintenance on a clock, poison dead-lettering."""

from __future__ import annotations

import statistics
import time

import pytest

from tests.helpers import NAMESPACE, dead_letters, wait_until
from whiskypay.devstack import HttpReceiver


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    # Dramatiq's default idle poll (1 s): the wake-up, not a short poll, must make pickup fast.
    return {key: value for key, value in env.items() if key != "dramatiq_worker_timeout"}


@pytest.mark.e2e
def test_an_idle_worker_picks_a_message_up_within_milliseconds(redis_client, receiver: HttpReceiver, start_workers,
                                                                 env):
    from actors import send_callback

    # Given an idle worker polling only once a second
    start_workers("--queues", "callbackQueue", env=env)
    time.sleep(1.5)
    # When 20 payments are sent one at a time, with pauses longer than the poll interval
    latencies = []
    for index in range(20):
        send_callback.send(callback_url=receiver.url("/hook"), email="b@example.com", plan="p", price=1)
        sent = time.monotonic()
        arrived = receiver.wait_for(index + 1, timeout_s=5)[-1].at
        latencies.append(arrived - sent)
        time.sleep(0.15 if index % 2 else 1.1)
    # Then the median pickup is far below the 1 s poll (stock Dramatiq: ~300 ms median, ~900 ms p99)
    assert statistics.median(latencies) < 0.05, latencies
    assert max(latencies) < 0.5, latencies


def test_maintenance_runs_for_each_queue_at_least_every_interval():
    import actors

    broker = actors.broker
    broker._last_maintenance.clear()
    interval = broker.maintenance_interval_ms
    assert broker._maintenance_due("fetch", "callbackQueue") == 1
    assert broker._maintenance_due("fetch", "emailQueue") == 1
    broker.maintenance_chance = 0  # the random extra chance off, to see the clock alone
    try:
        assert broker._maintenance_due("fetch", "callbackQueue") == 0
        assert broker._maintenance_due("ack", "callbackQueue") == 0
        broker._last_maintenance["callbackQueue"] -= interval
        assert broker._maintenance_due("fetch", "callbackQueue") == 1
    finally:
        broker.maintenance_chance = 1000


@pytest.mark.e2e
@pytest.mark.parametrize("poison", [b"\x00\xff random bytes \x9c", b"[1, 2]", b'{"foo": 1}', b'{"queue_name": 5}'])
def test_an_undecodable_message_is_dead_lettered_with_its_reason_and_the_worker_carries_on(
    redis_client, receiver, start_workers, env, poison
):
    from actors import send_callback

    # Given garbage stored the way Dramatiq stores messages, ahead of a good message
    redis_client.hset(f"{NAMESPACE}:callbackQueue.msgs", "poison-1", poison)
    redis_client.rpush(f"{NAMESPACE}:callbackQueue", "poison-1")
    send_callback.send(callback_url=receiver.url("/hook"), email="b@example.com", plan="p", price=1)
    worker = start_workers("--queues", "callbackQueue", env=env)
    # Then the good message is delivered and the garbage is a readable dead letter with the reason
    receiver.wait_for(1)
    (letter,) = wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="a dead letter")
    assert letter["actor_name"] == "undecodable-message"
    assert letter["options"]["traceback"].startswith("DecodeError: ")
    assert letter["options"]["raw_size"] == len(poison)
    assert worker.running()


@pytest.mark.e2e
def test_a_message_for_an_unknown_actor_is_dead_lettered_with_the_reason(redis_client, start_workers, env):
    from dramatiq import Message

    import actors

    actors.broker.enqueue(Message(queue_name="callbackQueue", actor_name="no_such_actor", args=(), kwargs={},
                                  options={}))
    start_workers("--queues", "callbackQueue", env=env)
    (letter,) = wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="a dead letter")
    assert letter["options"]["traceback"].startswith("ActorNotFound: ")


def test_a_closing_consumer_hands_back_what_it_fetched_but_had_not_handed_out(redis_client, monkeypatch):
    import actors
    from actors import send_callback
    from tests.helpers import queued

    # consume() makes this process a worker (its sends would skip the ledger's pending record): undone at teardown
    monkeypatch.setattr(actors.broker, "enqueue_waits_for_redis", False)
    # (consume() also starts the process's Settler: kept off here, so later tests' acks on this broker stay direct)
    monkeypatch.setattr(actors.broker.settler, "start", lambda: None)

    # Given five messages, and a consumer that fetched all five (prefetch 5) and handed out one
    for _ in range(5):
        send_callback.send(callback_url="http://127.0.0.1:9/hook", email="b@example.com", plan="p", price=1)
    consumer = actors.broker.consume("callbackQueue", prefetch=5, timeout=100)
    first = next(consumer)
    assert first is not None and queued(redis_client, "callbackQueue") == 0
    # When it closes (worker shutdown)
    consumer.close()
    # Then the four it still held are back in the queue; only the handed-out one waits for its ack
    assert queued(redis_client, "callbackQueue") == 4
    acks = f"{NAMESPACE}:__acks__.{actors.broker.broker_id}.callbackQueue"
    assert redis_client.smembers(acks) == {first.options["redis_message_id"].encode()}


def test_a_delayed_message_coming_due_is_moved_off_the_delay_queue_in_the_same_redis_call(redis_client, redis_url):
    from dramatiq import Message

    from whiskypay.redis_broker import WhiskyPayRedisBroker

    # Given a worker's broker whose delay-queue consumer holds a delayed message (fetched, so in its Q.DQ acks)
    broker = WhiskyPayRedisBroker(url=redis_url, namespace="movetest", middleware=[])
    broker.enqueue_waits_for_redis = True  # a worker process (consume() sets it)
    acks = f"movetest:__acks__.{broker.broker_id}"
    try:
        broker.declare_queue("q")
        broker.enqueue(Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={}), delay=1)
        [data] = broker.do_fetch("q.DQ", 1)
        held = Message.decode(data)
        # When it comes due and the worker enqueues its copy on the queue (as Dramatiq's worker does)
        due = held.copy(queue_name="q")
        del due.options["eta"]
        broker.enqueue(due)
        # Then, before the worker's own ack of the delay-queue copy, that copy is already gone: nothing can run
        # the message on q while it still counts on q.DQ (the race of Dramatiq's test_redis_join_race_condition)
        assert redis_client.smembers(f"{acks}.q.DQ") == set()
        assert redis_client.hlen("movetest:q.DQ.msgs") == 0
        assert redis_client.llen("movetest:q") == 1
        # And the worker's ack afterwards finds nothing to do and loses nothing
        broker.do_ack("q.DQ", held.options["redis_message_id"])
        assert broker.do_qsize("q") == 1
        # And a message re-sent from one being processed on q (its id in the q acks, not q.DQ) moves nothing
        [data] = broker.do_fetch("q", 1)
        running = Message.decode(data)
        broker.enqueue(running.copy())
        assert redis_client.smembers(f"{acks}.q") == {running.options["redis_message_id"].encode()}
        assert redis_client.llen("movetest:q") == 1
    finally:
        broker.close()


@pytest.mark.parametrize("operation", ["ack", "nack"])
def test_an_ack_or_nack_lost_to_a_connection_error_is_retried_until_it_lands(redis_client, redis_url, monkeypatch,
                                                                              operation):
    # Dramatiq's test_redis_consumer_{ack,nack}_can_retry_on_connection_error, made deterministic: upstream patches
    # do_ack/do_nack only after send(), and our wake-up sometimes has the message done before the patch.
    import dramatiq
    import dramatiq.worker
    from dramatiq import Worker
    from dramatiq.errors import BrokerConnectionError

    from middleware.retry_policy import QueueRetryPolicy
    from whiskypay.redis_broker import WhiskyPayRedisBroker

    monkeypatch.setattr(dramatiq.worker, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.05)
    # Given our broker whose first ack (or nack) raises BrokerConnectionError, with no retries
    broker = WhiskyPayRedisBroker(url=redis_url, namespace="acktest", middleware=[QueueRetryPolicy(max_retries=0)])
    calls: list[str] = []
    if operation == "ack":
        # (acks go out in the worker process's Settler rounds: its one script call is what fails once)
        import redis as redis_py

        real_script = broker.settler.script

        def flaky_round(*, args: list[object]) -> object:
            calls.append(str(args[8:]))  # the ack group's ids (after the 5 header ARGV and the group's 3)
            if len(calls) == 1:
                raise redis_py.ConnectionError("connection lost")
            return real_script(args=args)

        broker.settler.script = flaky_round  # type: ignore[assignment]
    else:
        real = broker.do_nack

        def flaky(queue_name: str, redis_id: str) -> object:
            calls.append(redis_id)
            if len(calls) == 1:
                raise BrokerConnectionError("connection lost")
            return real(queue_name, redis_id)

        broker.do_nack = flaky  # type: ignore[method-assign]

    @dramatiq.actor(broker=broker, queue_name="q")
    def work(fail: bool) -> None:
        if fail:
            raise RuntimeError("fails")

    worker = Worker(broker, worker_timeout=100, worker_threads=1)
    worker.start()
    try:
        # When one message is processed (and fails, for the nack)
        work.send(operation == "nack")
        broker.join("q", timeout=10_000)
        worker.join()
        # Then the worker tried again, the second try landed, and nothing is outstanding
        assert len(calls) == 2 and calls[0] == calls[1]
        assert wait_until(lambda: worker.consumers["q"].consumer.outstanding_message_count == 0)
        assert redis_client.zcard("acktest:q.XQ") == (1 if operation == "nack" else 0)
    finally:
        worker.stop()
        broker.close()


def test_a_consumer_refills_its_window_in_batches_not_one_fetch_per_ack(redis_client, monkeypatch, request):
    import actors
    from actors import send_callback
    from tests.helpers import queued

    monkeypatch.setattr(actors.broker, "enqueue_waits_for_redis", False)  # as above: consume() sets it
    actors.broker.settler.start()  # this test is about acks in a worker process, which go through the Settler
    request.addfinalizer(actors.broker.settler.stop)

    # Given 20 messages and a consumer with a window of 8 (a worker's 4 threads) that holds all 8, none acked
    for _ in range(20):
        send_callback.send(callback_url="http://127.0.0.1:9/hook", email="b@example.com", plan="p", price=1)
    consumer = actors.broker.consume("callbackQueue", prefetch=8, timeout=300)
    taken = [next(consumer) for _ in range(8)]
    assert all(taken) and queued(redis_client, "callbackQueue") == 12
    try:
        # When one is acked (the window has 1 free slot of 8, and 7 messages still wait for a thread)
        consumer.ack(taken.pop())
        assert actors.broker.settler.flush(consumer)  # (acks go out in the Settler's rounds: wait for this one)
        # Then the consumer does not fetch that one slot: it waits (for the next ack, or the worker timeout)
        assert next(consumer) is None
        assert queued(redis_client, "callbackQueue") == 12
        # When a quarter of the window is free (2 of 8)
        consumer.ack(taken.pop())
        assert actors.broker.settler.flush(consumer)
        # Then it fetches both slots in one go
        assert next(consumer) is not None
        assert queued(redis_client, "callbackQueue") == 10
        # And when at most half the window is taken (a thread may be idle), it fetches at once, whatever is free
        for message in taken:
            consumer.ack(message)
        assert actors.broker.settler.flush(consumer)
        assert next(consumer) is not None  # the second of the two, from its cache: no fetch
        assert queued(redis_client, "callbackQueue") == 10
        assert next(consumer) is not None  # 2 of 8 taken: the 6 free slots in one fetch
        assert queued(redis_client, "callbackQueue") == 4
    finally:
        consumer.close()


def test_the_enqueue_hooks_run_in_order_for_middleware_added_later_with_dramatiqs_error_contract(
    redis_client, redis_url, caplog
):
    # Given a broker whose enqueue hooks skip the middleware that do not define them
    import dramatiq
    import redis
    from dramatiq import Middleware
    from dramatiq.middleware import MiddlewareError

    from whiskypay.redis_broker import WhiskyPayRedisBroker

    calls: list[str] = []

    class Noting(Middleware):
        def __init__(self, name: str, error: Exception | None = None) -> None:
            self.name, self.error = name, error

        def before_enqueue(self, broker, message, delay):
            calls.append(f"before {self.name}")
            if self.error is not None:
                raise self.error

        def after_enqueue(self, broker, message, delay):
            calls.append(f"after {self.name}")

    broker = WhiskyPayRedisBroker(client=redis.Redis.from_url(redis_url), namespace=NAMESPACE,
                                  middleware=[Noting("a"), Middleware()])
    try:
        @dramatiq.actor(broker=broker, queue_name="hooksQueue")
        def job() -> None: ...

        job.send()
        # When middleware are added after a send, one of them failing with a plain error, then one refusing
        broker.add_middleware(Noting("b", RuntimeError("a bug")))
        job.send()
        assert calls == ["before a", "after a", "before a", "before b", "after b", "after a"]
        broker.add_middleware(Noting("c", MiddlewareError("refused")))
        calls.clear()
        with pytest.raises(MiddlewareError):
            job.send()
    finally:
        broker.close()
    # Then every hook ran in Dramatiq's order (after hooks reversed), the plain error was logged and ignored,
    # and the MiddlewareError stopped the send before anything was enqueued or any after hook ran
    assert calls == ["before a", "before b", "before c"]
    assert "Unexpected failure in before_enqueue" in caplog.text and "RuntimeError: a bug" in caplog.text
    assert redis_client.llen(f"{NAMESPACE}:hooksQueue") == 2
