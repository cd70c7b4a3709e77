"""Fault: the Redis primary is SIGKILLed mid-run and Sentinel promotes its replica; workers and a producer follow it.

One primary, one replica, three sentinels on loopback (quorum 2, 1 s down-after), 1,000 callbacks with event ids
sent by a producer process with WHISKYPAY_REDIS_MIN_REPLICA_ACKS=1 that keeps sending (and resends what raised
EnqueueError, with the same event_id), delivered by two worker processes. Every process finds the primary
through the sentinels only: WHISKYPAY_REDIS_URL points at a port where nothing listens.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.faults.common import REPO_ROOT, Report, StartWorkers, callback_kwargs, webhook_ids
from tests.helpers import wait_until
from whiskypay.devstack import HttpReceiver, RedisServer, SentinelServer, free_port

pytestmark = pytest.mark.e2e

COUNT = 1000
MASTER = "whiskypay"
#: The primary's and replica's extra arguments: a replica's first sync starts at once (Redis waits 5 s by default
#: for more replicas to share a diskless transfer).
REPLICATION_ARGS = ("--repl-diskless-sync-delay", "0")

PRODUCER = '''\
"""Send COUNT callbacks to URL with event ids, resending each until send() returns; print what happened (JSON)."""
import json
import sys
import time

from actors import send_callback
from whiskypay.errors import EnqueueError, NotReplicated

url, count, interval_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
kwargs = json.loads(sys.argv[4])
acked, not_replicated, unreachable = {}, 0, 0
started = time.monotonic()
for i in range(count):
    event_id = f"evt_{i:04d}"
    while True:
        try:
            send_callback.send(callback_url=url, **kwargs, event_id=event_id)
            acked[event_id] = time.monotonic() - started
            break
        except NotReplicated:
            not_replicated += 1
        except EnqueueError:
            unreachable += 1
        time.sleep(0.05)
    time.sleep(interval_s)
print(json.dumps({"acked": acked, "not_replicated": not_replicated, "unreachable": unreachable}))
'''


def sentinel_master_port(sentinel: SentinelServer) -> int | None:
    """Return the port of the primary this sentinel names now (None if it cannot answer)."""
    try:
        client = redis.Redis(port=sentinel.port, socket_timeout=1)
        with client:
            host_port = client.sentinel_get_master_addr_by_name(MASTER)
    except redis.RedisError:
        return None
    return int(host_port[1]) if host_port else None


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, list[SentinelServer]]]:
    """A primary with AOF, its replica (AOF too, so it passes the workers' durability check once promoted), and
    three sentinels that know both and each other."""
    primary = RedisServer(appendonly=True, args=REPLICATION_ARGS).start()
    replica = RedisServer(appendonly=True, replica_of=primary.port, args=REPLICATION_ARGS).start()
    sentinels = [SentinelServer(primary_port=primary.port, master_name=MASTER, quorum=2, down_after_ms=1000,
                                failover_timeout_ms=3000).start() for _ in range(3)]
    try:
        with redis.Redis(port=replica.port) as client:
            wait_until(lambda: client.info("replication").get("master_link_status") == "up", what="the replica sync")
        with redis.Redis(port=sentinels[0].port) as client:
            wait_until(lambda: (info := client.sentinel_master(MASTER))["num-slaves"] >= 1
                       and info["num-other-sentinels"] >= 2, what="the sentinels to know the replica and each other")
        yield primary, replica, sentinels
    finally:
        for server in (*sentinels, replica, primary):
            server.stop()


def test_a_sentinel_failover_loses_no_acknowledged_send(
    topology: tuple[RedisServer, RedisServer, list[SentinelServer]], receiver: HttpReceiver,
    start_workers: StartWorkers, env: dict[str, str], tmp_path: Path, report: Report,
) -> None:
    primary, replica, sentinels = topology
    run_env = {**env, "WHISKYPAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing there: Sentinel only
               "WHISKYPAY_REDIS_SENTINELS": ",".join(sentinel.address for sentinel in sentinels),
               "WHISKYPAY_REDIS_SENTINEL_MASTER": MASTER, "WHISKYPAY_REDIS_MIN_REPLICA_ACKS": "1",
               "WHISKYPAY_REDIS_TIMEOUT_S": "1"}
    run_env.pop("WHISKYPAY_REDIS_ALLOW_VOLATILE", None)  # the workers' durability check runs for real
    # Given two worker processes on the Sentinel-managed primary
    workers = start_workers("--queues", "callbackQueue", env=run_env, processes=2, threads=8)
    assert workers.log().count("Redis durability checked") == 2
    # When a producer sends 1,000 callbacks (about 200 a second) and the primary is SIGKILLed after 300 deliveries
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    kwargs = {key: value for key, value in callback_kwargs(receiver.url("/hook")).items() if key != "callback_url"}
    producer = subprocess.Popen(
        [sys.executable, str(script), receiver.url("/hook"), str(COUNT), "0.004", json.dumps(kwargs)],
        env=run_env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        def three_hundred_delivered() -> bool:
            assert producer.poll() is None, producer.communicate()[1][-3000:]
            return len(receiver.requests()) >= 300

        wait_until(three_hundred_delivered, timeout_s=30, what="300 deliveries before the kill")
        primary.kill()
        killed_at = time.monotonic()
        # Then Sentinel promotes the replica; the old primary comes back as its replica (as Sentinel would make it
        # some 10 s later), so that sends can be acknowledged by a replica again
        wait_until(lambda: sentinel_master_port(sentinels[0]) == replica.port, timeout_s=20, what="the promotion")
        promoted_s = time.monotonic() - killed_at
        restarted = RedisServer(port=primary.port, appendonly=True, replica_of=replica.port,
                                args=REPLICATION_ARGS).start()
        try:
            out, err = producer.communicate(timeout=60)
            assert producer.returncode == 0, err[-3000:]
            result = json.loads(out.strip().splitlines()[-1])
            acked: dict[str, float] = result["acked"]
            # And every acknowledged send is delivered, by the same two workers, which never restarted
            wait_until(lambda: set(acked) <= set(webhook_ids(receiver.requests())), timeout_s=30,
                       what="every acknowledged send delivered")
        finally:
            restarted.stop()
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.communicate()
    time.sleep(0.5)  # a late duplicate, if any, is counted too
    requests = receiver.requests()
    counts = webhook_ids(requests)
    delivered = set(counts)
    duplicated = sum(count - 1 for count in counts.values())
    lost = sorted(set(acked) - delivered)
    times = sorted(request.at for request in requests)
    gap_s = max(later - earlier for earlier, later in itertools.pairwise(times))
    report(f"failover: replica promoted {promoted_s:.1f} s after the SIGKILL; longest time without deliveries "
           f"{gap_s:.1f} s")
    report(f"failover: {len(acked)} acknowledged sends, {len(delivered)} delivered, {duplicated} duplicated "
           f"(same webhook-id), {len(lost)} lost; producer resends: {result['not_replicated']} not replicated, "
           f"{result['unreachable']} Redis unreachable")
    assert len(acked) == COUNT
    assert not lost, lost[:10]
    assert delivered <= set(acked)
    assert workers.running() and len(workers.pids_of_workers()) == 2
    # And the workers checked the new primary's durability after the failover
    assert "checking its durability again" in workers.log()
