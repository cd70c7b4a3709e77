"""WHISKYPAY_REDIS_MIN_REPLICA_ACKS: send() waits for replicas on the enqueue's own connection, or says it may have
been accepted, keeping the event_id reservation."""

from __future__ import annotations

from collections.abc import Iterator

import dramatiq
import pytest
import redis

from middleware.idempotency import IdempotentEnqueue
from whiskypay.actor import WhiskyPayActor
from whiskypay.devstack import RedisServer
from whiskypay.errors import EnqueueError, NotReplicated
from whiskypay.redis_broker import WhiskyPayRedisBroker

REPLICATION_ARGS = ("--repl-diskless-sync-delay", "0")


@pytest.fixture(scope="module")
def primary() -> Iterator[RedisServer]:
    server = RedisServer(args=REPLICATION_ARGS).start()
    yield server
    server.stop()


def broker_on(server: RedisServer, acks: int, timeout_ms: int = 100) -> WhiskyPayRedisBroker:
    client = redis.Redis(port=server.port, socket_timeout=2)
    client.flushall()
    return WhiskyPayRedisBroker(client=client, namespace="t", min_replica_acks=acks, replica_ack_timeout_ms=timeout_ms,
                                middleware=[IdempotentEnqueue(window_s=60)])


def actor_on(broker: WhiskyPayRedisBroker) -> WhiskyPayActor:
    actor = dramatiq.actor(lambda **kw: None, broker=broker, actor_class=WhiskyPayActor, actor_name="cb",
                           queue_name="q")
    assert isinstance(actor, WhiskyPayActor)
    return actor


def test_without_a_replica_send_says_the_job_may_have_been_accepted_and_keeps_the_event_id(
    primary: RedisServer,
) -> None:
    # Given a primary with no replica and min_replica_acks=1
    broker = broker_on(primary, acks=1)
    actor = actor_on(broker)
    # When a job is sent with an event id, then send() raises NotReplicated, an EnqueueError that says so
    with pytest.raises(NotReplicated) as raised:
        actor.send(plan="pro", event_id="pay_1")
    assert isinstance(raised.value, EnqueueError)
    assert "may still have been accepted" in str(raised.value)
    assert "0 of 1 replica(s)" in str(raised.value) and "WHISKYPAY_REDIS_MIN_REPLICA_ACKS" in str(raised.value)
    # And the job is in the primary's queue, its reservation kept: the gateway's retry enqueues nothing more, and
    # does not report success either while no replica has the first one
    assert broker.client.llen("t:q") == 1
    with pytest.raises(NotReplicated):
        actor.send(plan="pro", event_id="pay_1")
    assert broker.client.llen("t:q") == 1
    broker.close()


def test_with_a_replica_send_returns_once_it_has_the_message(primary: RedisServer) -> None:
    # Given a replica of the primary, in sync
    replica = RedisServer(replica_of=primary.port, args=REPLICATION_ARGS).start()
    try:
        replica_client = redis.Redis(port=replica.port)
        broker = broker_on(primary, acks=1, timeout_ms=3000)  # a loaded machine: the replica answers in time
        while replica_client.info("replication").get("master_link_status") != "up":
            pass
        # When a job is sent, then it returns, and the replica already has the message
        actor = actor_on(broker)
        message = actor.send(plan="pro", event_id="pay_2")
        assert replica_client.hget("t:q.msgs", message.options["redis_message_id"]) is not None
        # And a retry of the same event returns too, without a second message
        actor.send(plan="pro", event_id="pay_2")
        assert broker.client.llen("t:q") == 1
        broker.close()
        replica_client.close()
    finally:
        replica.stop()


def test_the_wait_runs_on_the_enqueue_connection_in_one_round_trip(primary: RedisServer) -> None:
    # Given a broker that needs one replica, and a record of the commands its connections run
    broker = broker_on(primary, acks=1)
    monitor = redis.Redis(port=primary.port).monitor()
    with monitor:
        with pytest.raises(NotReplicated):
            actor_on(broker).send(plan="pro")
        # Then EVALSHA and WAIT came from the same client connection, one right after the other
        seen = []
        while len(seen) < 2:
            command = monitor.next_command()
            if command["command"].split()[0].upper() in {"EVALSHA", "WAIT"}:
                seen.append(command)
    assert [c["command"].split()[0].upper() for c in seen] == ["EVALSHA", "WAIT"]
    assert seen[0]["client_address"] == seen[1]["client_address"] and seen[0]["client_port"] == seen[1]["client_port"]
    broker.close()


def test_workers_enqueues_do_not_wait_for_replicas(primary: RedisServer) -> None:
    # Given a broker in a worker process (it consumes): its enqueues are retries and delayed messages coming due
    broker = broker_on(primary, acks=1)
    broker.enqueue_waits_for_redis = True
    # When it enqueues, then nothing waits and nothing raises
    actor_on(broker).send(plan="pro")
    assert broker.client.llen("t:q") == 1
    broker.close()
