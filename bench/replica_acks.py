"""The enqueue cost of WHISKYPAY_REDIS_MIN_REPLICA_ACKS: send() with no wait against send() + WAIT 1 (one replica).

`python -m bench.replica_acks [--sends N] [--reps R]`: a private primary and its replica on loopback (both AOF,
appendfsync everysec, as in docker/compose.yaml), the whole send() pipeline (validation, event_id reservation,
the enqueue script) built by the broker factory, N sends with event ids per run, runs alternating between
MIN_REPLICA_ACKS=0 and 1; prints the median rate and per-send latency of each (p50/p99), and the ratio.
Standalone: it adds nothing to bench/suite.py's runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import dramatiq
import redis

from settings import load_settings
from whiskypay.actor import WhiskyPayActor
from whiskypay.broker import build_broker
from whiskypay.devstack import RedisServer

#: Both servers' persistence and replication start-up (no 5 s wait before the first sync).
SERVER_ARGS = ("--appendfsync", "everysec", "--repl-diskless-sync-delay", "0")

PAYMENT: dict[str, Any] = {"email": "buyer@example.com", "plan": "pro", "price": 19.99,
                           "timestamp": "2026-11-27T21:00:00Z"}


def run(url: str, acks: int, *, sends: int, tag: str) -> list[float]:
    """Time sends send() calls with min_replica_acks=acks; return each one's latency in seconds."""
    broker = build_broker(load_settings(_env_file=None, redis_url=url, redis_min_replica_acks=acks,
                                        webhook_secret="whsec_" + "A" * 32, allow_private_callbacks=True,
                                        callback_https_only=False))
    actor = dramatiq.actor(lambda **kwargs: None, broker=broker, actor_class=WhiskyPayActor,
                           actor_name="send_callback", queue_name="callbackQueue")
    latencies = []
    for i in range(sends):
        started = time.perf_counter()
        actor.send(callback_url=f"http://127.0.0.1:9/{tag}/{i}", event_id=f"evt_{tag}_{i}", **PAYMENT)
        latencies.append(time.perf_counter() - started)
    broker.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sends", type=int, default=2000, help="send() calls per run (default 2000)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each setting (default 3)")
    args = parser.parse_args(argv)
    primary = RedisServer(appendonly=True, args=SERVER_ARGS).start()
    replica = RedisServer(appendonly=True, replica_of=primary.port, args=SERVER_ARGS).start()
    try:
        with redis.Redis(port=replica.port) as client:
            while client.info("replication").get("master_link_status") != "up":
                time.sleep(0.05)
        results: dict[int, list[list[float]]] = {0: [], 1: []}
        for rep in range(args.reps):
            for acks in (0, 1) if rep % 2 == 0 else (1, 0):
                with redis.Redis(port=primary.port) as client:
                    client.flushall()
                results[acks].append(run(primary.url, acks, sends=args.sends, tag=f"r{rep}a{acks}"))
        rates = {}
        for acks, runs in results.items():
            rates[acks] = statistics.median(len(run_) / sum(run_) for run_ in runs)
            every = sorted(value for run_ in runs for value in run_)
            p50, p99 = every[len(every) // 2], every[int(len(every) * 0.99)]
            print(f"MIN_REPLICA_ACKS={acks}: {rates[acks]:,.0f} send()/s (median of {args.reps}), "
                  f"latency p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
        print(f"ratio: {rates[1] / rates[0]:.2f}x the sends per second with WAIT 1")
    finally:
        replica.stop()
        primary.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
