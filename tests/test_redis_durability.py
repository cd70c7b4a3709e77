"""The durability check: a worker refuses a Redis that can lose jobs, warns where it cannot tell, checks again
when the server changes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from middleware.durable_redis import DurableRedis
from tests.helpers import wait_until
from whiskypay.devstack import RedisServer
from whiskypay.errors import WorkerStartRefused
from whiskypay.redis_durability import durability

VOLATILE = ("--appendonly", "no")  # RedisServer always passes --save "": no RDB schedule either
EVICTING = ("--appendonly", "yes", "--maxmemory-policy", "allkeys-lru")


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    with RedisServer(args=request.param) as started:
        yield started


def levels(server: RedisServer, **client: str) -> dict[str, tuple[str, str]]:
    with redis.Redis(port=server.port, **client) as connection:  # type: ignore[arg-type]
        return {f.what: (f.level, f"{f.detail} / {f.fix}") for f in durability(connection)}


@pytest.mark.parametrize(("server", "expected"), [
    (VOLATILE, {"persistence": "failed", "eviction policy": "ok"}),
    (EVICTING, {"persistence": "ok", "eviction policy": "failed"}),
    (("--appendonly", "yes"), {"persistence": "ok", "eviction policy": "ok"}),
    (("--appendonly", "no", "--save", "900 1"), {"persistence": "warning", "eviction policy": "ok"}),
    (("--appendonly", "no", "--rename-command", "CONFIG", ""), {"persistence": "warning", "eviction policy": "ok"}),
], indirect=["server"], ids=["no-aof-no-rdb", "allkeys-lru", "aof", "rdb-only", "config-renamed"])
def test_each_redis_configuration_gets_its_finding(server: RedisServer, expected: dict[str, str]) -> None:
    found = levels(server)
    assert {what: level for what, (level, _) in found.items()} == expected
    if expected["persistence"] == "failed":
        assert "appendonly yes" in found["persistence"][1]
    if expected["eviction policy"] == "failed":
        assert "allkeys-lru" in found["eviction policy"][1] and "noeviction" in found["eviction policy"][1]


@pytest.mark.parametrize("server", [VOLATILE], indirect=True)
def test_config_denied_by_acl_is_a_warning_not_a_guess(server: RedisServer) -> None:
    with redis.Redis(port=server.port) as admin:
        admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                          commands=["+@all", "-config"])
    found = levels(server, username="worker", password="pw")
    assert found["persistence"][0] == "warning" and "CONFIG is renamed or denied" in found["persistence"][1]


@pytest.mark.parametrize("server", [VOLATILE, EVICTING], indirect=True, ids=["no-aof-no-rdb", "allkeys-lru"])
def test_a_worker_boot_is_refused_with_the_setting_to_change(server: RedisServer) -> None:
    broker = RedisBroker(client=redis.Redis(port=server.port), middleware=[])
    with pytest.raises(WorkerStartRefused) as refused:
        DurableRedis(allow_volatile=False).before_worker_boot(broker, None)  # type: ignore[arg-type]
    assert "WHISKYPAY_REDIS_ALLOW_VOLATILE" in str(refused.value)
    assert ("appendonly yes" if "no" in server.args else "maxmemory-policy noeviction") in str(refused.value)
    broker.close()


@pytest.mark.parametrize("server", [VOLATILE], indirect=True)
def test_allow_volatile_boots_with_a_warning(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    broker = RedisBroker(client=redis.Redis(port=server.port), middleware=[])
    middleware = DurableRedis(allow_volatile=True)
    with caplog.at_level(logging.WARNING):
        middleware.before_worker_boot(broker, None)  # type: ignore[arg-type]
    middleware.after_worker_shutdown(broker, None)  # type: ignore[arg-type]
    assert "Running anyway: WHISKYPAY_REDIS_ALLOW_VOLATILE=true" in caplog.text
    broker.close()


def test_a_worker_booting_while_redis_is_busy_checks_once_it_answers_instead_of_failing_its_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a Redis busy with another client's long script (it answers BUSY, a transient error reply)
    import threading
    import time

    with RedisServer(args=("--appendonly", "yes")) as server:
        admin = redis.Redis(port=server.port)
        admin.config_set("busy-reply-threshold", 20)
        spin = ("local t = redis.call('time') local s = t[1] + t[2] / 1e6 "
                "repeat local n = redis.call('time') until n[1] + n[2] / 1e6 - s > 0.6 return 1")
        script = threading.Thread(target=redis.Redis(port=server.port).eval, args=(spin, 0), daemon=True)
        script.start()
        time.sleep(0.1)
        broker = RedisBroker(client=redis.Redis(port=server.port, socket_timeout=2), middleware=[])
        middleware = DurableRedis(allow_volatile=False, recheck_interval_s=0.1)
        try:
            # When a worker boots then, it starts (warning that it checks later), and checks once Redis answers
            with caplog.at_level(logging.INFO):
                middleware.before_worker_boot(broker, None)  # type: ignore[arg-type]
                assert "Cannot check Redis durability now (ResponseError: BUSY" in caplog.text
                wait_until(lambda: "Redis durability checked" in caplog.text, timeout_s=10, what="the later check")
        finally:
            middleware.after_worker_shutdown(broker, None)  # type: ignore[arg-type]
            script.join(5)
            broker.close()
            admin.close()


def test_a_new_server_behind_the_same_address_is_checked_again(caplog: pytest.LogCaptureFixture) -> None:
    # Given a worker that booted on a durable Redis
    durable = RedisServer(args=("--appendonly", "yes")).start()
    broker = RedisBroker(client=redis.Redis(port=durable.port, socket_timeout=1), middleware=[])
    middleware = DurableRedis(allow_volatile=False, recheck_interval_s=0.1)
    try:
        middleware.before_worker_boot(broker, None)  # type: ignore[arg-type]
        # When that Redis is replaced by a volatile one on the same address (a failover, a restart)
        durable.stop()
        with RedisServer(port=durable.port, args=VOLATILE), caplog.at_level(logging.WARNING):
            # Then the worker checks it again and logs the failure as an error, without stopping
            wait_until(lambda: "This worker keeps running" in caplog.text, timeout_s=10, what="the second check")
        assert "checking its durability again" in caplog.text
    finally:
        middleware.after_worker_shutdown(broker, None)  # type: ignore[arg-type]
        broker.close()


@pytest.mark.e2e
def test_a_real_worker_refuses_to_start_on_a_volatile_evicting_redis(start_workers, worker_env) -> None:
    # Given a Redis without AOF, without an RDB schedule, with allkeys-lru, and no escape hatch
    with RedisServer(args=(*VOLATILE, "--maxmemory-policy", "allkeys-lru")) as server:
        env = {key: value for key, value in worker_env.items() if key != "WHISKYPAY_REDIS_ALLOW_VOLATILE"}
        env["WHISKYPAY_REDIS_URL"] = server.url
        # When `dramatiq actors` starts on it
        with pytest.raises(RuntimeError) as failed:
            start_workers("--queues", "callbackQueue", env=env, timeout_s=30)
        # Then it exits before taking any message, naming both settings to change
        log = str(failed.value)
        assert "exited" in log and "The worker will not start on it" in log
        assert "appendonly yes" in log and "maxmemory-policy noeviction" in log


def test_the_gateway_imports_actors_and_sends_on_a_volatile_redis_without_the_escape_hatch(worker_env) -> None:
    # Given a volatile Redis and no WHISKYPAY_REDIS_ALLOW_VOLATILE: the check is the workers', never the gateway's
    import subprocess
    import sys

    with RedisServer(args=VOLATILE) as server:
        env = {key: value for key, value in worker_env.items() if key != "WHISKYPAY_REDIS_ALLOW_VOLATILE"}
        env["WHISKYPAY_REDIS_URL"] = server.url
        code = ("import actors; actors.send_callback.send(callback_url='http://127.0.0.1:9/h', email='b@example.com',"
                " plan='pro', price=1)")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        # Then `import actors` and send() work, and the job is in the queue
        assert done.returncode == 0, done.stderr[-2000:]
        with redis.Redis(port=server.port) as client:
            assert client.llen("whiskypay:callbackQueue") == 1
