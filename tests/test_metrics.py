"""Prometheus metrics: a real worker with WHISKYPAY_METRICS_ENABLED serves Dramatiq's and our delivery metrics."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import dead_letters, wait_until
from whiskypay.devstack import HttpReceiver, Response, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of the /metrics page as {(name, sorted labels): value}; {} while nothing answers."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.ConnectionError:
        return {}
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def deliveries(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return samples.get(("whiskypay_deliveries_total", (("outcome", outcome), ("queue", "callbackQueue"))), 0.0)


def test_a_worker_serves_delivery_counts_and_times_after_deliveries(
    redis_client, receiver: HttpReceiver, start_workers, worker_env, tmp_path: Path
):
    from actors import send_callback

    # Given a worker with metrics on, its own port and multiprocess directory, and three merchants
    port = free_port()
    env = {
        **worker_env,
        "WHISKYPAY_METRICS_ENABLED": "true",
        "WHISKYPAY_METRICS_PORT": str(port),
        "WHISKYPAY_CALLBACK_ATTEMPTS": "2",
        "dramatiq_prom_db": str(tmp_path / "prometheus"),
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_worker_timeout": "100",
        "WHISKYPAY_WORKER_STATE_DIR": str(tmp_path / "workers"),
    }
    receiver.respond("/ok", Response(200))
    receiver.respond("/flaky", Response(500), Response(200))
    receiver.respond("/down", Response(500))
    worker = start_workers("--queues", "callbackQueue", env=env)
    # When one callback is delivered at once, one after a retry, and one fails both attempts
    for path in ("/ok", "/flaky", "/down"):
        send_callback.send(callback_url=receiver.url(path), email="buyer@example.com", plan="pro", price=1.0)
    wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="the failing callback's dead letter")
    # Then /metrics counts 2 delivered, 2 retried and 1 dead-lettered attempt, and times all 5
    samples = wait_until(
        lambda: (s := scrape(port)) and deliveries(s, "dead_lettered") == 1 and deliveries(s, "delivered") == 2 and s,
        timeout_s=15, what="the counters on /metrics",
    )
    assert deliveries(samples, "retried") == 2
    assert samples[("whiskypay_delivery_seconds_count", (("queue", "callbackQueue"),))] == 5
    assert samples[("whiskypay_delivery_seconds_sum", (("queue", "callbackQueue"),))] > 0
    # And the merchant breakers' gauges (one failure is no outage: nothing open, nothing parked)
    assert samples[("whiskypay_breakers_open", ())] == 0 and samples[("whiskypay_parked_callbacks", ())] == 0
    # And Dramatiq's own metrics are there too
    assert samples[("dramatiq_messages_total", (("actor_name", "send_callback"), ("queue_name", "callbackQueue")))] == 5
    assert f"Serving Prometheus metrics on 127.0.0.1:{port}" in worker.log()
    # And the queue gauges and the send-to-delivery latency of the 2 delivered callbacks are there
    assert samples[("whiskypay_redis_up", ())] == 1
    assert samples[("whiskypay_dead_letters", (("queue", "callbackQueue"),))] == 1
    assert samples[("whiskypay_queue_oldest_waiting_seconds", (("queue", "callbackQueue"),))] == 0
    assert samples[("whiskypay_send_to_delivery_seconds_count", (("queue", "callbackQueue"),))] == 2
    assert 0 < samples[("whiskypay_send_to_delivery_seconds_sum", (("queue", "callbackQueue"),))] < 30
    # And the probes on the same port, and `whiskypay health --worker` on this host, say the worker is healthy
    assert probe(port, "/healthz")[0] == 200
    status, line = probe(port, "/readyz")
    assert status == 200 and "1 worker process(es) heartbeating" in line, line
    code, out = health_cli(env, "--worker")
    assert code == 0 and out.startswith("healthy: Redis at ") and "1 worker process(es) heartbeating" in out, out
    # When the worker stops, then `whiskypay health --worker` fails with one line saying why
    worker.stop()
    code, out = health_cli(env, "--worker")
    assert code == 1 and out.startswith("unhealthy: no worker process runs on this host"), out


def probe(port: int, path: str) -> tuple[int, str]:
    """Return the status and body of GET path on the metrics port."""
    answer = requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    return answer.status_code, answer.text.strip()


def health_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `whiskypay health ARGS` in a process of its own with env; return its status and output line."""
    done = subprocess.run([sys.executable, "-m", "whiskypay.cli", "health", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    return done.returncode, done.stdout.strip()


def test_health_fails_with_one_line_when_redis_does_not_answer(worker_env):
    # Given settings pointing at a port where no Redis listens
    env = {**worker_env, "WHISKYPAY_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
           "WHISKYPAY_REDIS_TIMEOUT_S": "1"}
    # When `whiskypay health` runs, then it exits 1 naming the Redis (password hidden) and what to check
    code, out = health_cli(env)
    assert code == 1, out
    assert out.startswith("unhealthy: Redis at redis://:***@127.0.0.1:") and "does not answer" in out
    assert "hunter2" not in out


def test_metrics_are_off_by_default(redis_client, start_workers, worker_env):
    import actors
    from middleware.delivery_metrics import DeliveryMetrics

    assert not any(isinstance(m, DeliveryMetrics) for m in actors.broker.middleware)
    port = free_port()
    worker = start_workers("--queues", "callbackQueue", env={**worker_env, "WHISKYPAY_METRICS_PORT": str(port)})
    time.sleep(1.0)  # the exposition fork would start right after the workers are ready
    assert scrape(port) == {}
    assert "Serving Prometheus metrics" not in worker.log()


def test_the_example_alert_rules_use_metrics_we_export():
    import re

    import yaml

    from middleware import delivery_metrics, metrics_exporter

    rules = [rule for group in yaml.safe_load((REPO_ROOT / "docs" / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    assert len(rules) >= 2 and all(rule["alert"] and rule["expr"] and rule["for"] for rule in rules)
    source = Path(delivery_metrics.__file__).read_text() + Path(metrics_exporter.__file__).read_text()
    for rule in rules:
        for metric in re.findall(r"whiskypay_[a-z_]+", rule["expr"]):
            assert metric.removesuffix("_bucket") in source, f"{rule['alert']}: {metric} is not exported"
