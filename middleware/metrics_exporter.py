"""MetricsExporter: Dramatiq's Prometheus middleware, serving /metrics on WHISKYPAY_METRICS_PORT.

Dramatiq's own middleware reads its port from `dramatiq_prom_port` when it is imported, and its exposition
server is a fork that the `dramatiq` master imports by name: no constructor argument can reach it. So this
subclass swaps that fork for the one it is given (`whiskypay.broker.serve_metrics`, which reads the port from
the settings in the fork itself and calls `serve_metrics_on`).
Every worker process writes its samples into Dramatiq's multiprocess directory (env `dramatiq_prom_db`,
default `$TMPDIR/dramatiq-prometheus`); the fork sums the files of all of them per scrape.

The same port answers two probes: `/healthz` (liveness: this master's worker processes heartbeat and are not all
stuck) and `/readyz` (readiness: that, Redis answers, and consumers run): 200 with one line, or 503 with the
reason. And each scrape reads the queues' gauges from Redis (`QueueGauges`): the age of the oldest waiting
message and the dead-letter depth per queue, and whether Redis answered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dramatiq.logging import get_logger
from dramatiq.middleware import prometheus

#: The longest a probe or scraper may take to send its request, in seconds: a connection that sends nothing (or
#: trickles its headers) is closed after it, instead of holding a server thread and its socket forever.
REQUEST_TIMEOUT_S = 10.0


def use_multiprocess_dir() -> str:
    """Point prometheus_client at Dramatiq's multiprocess directory; call before prometheus_client is imported."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prometheus.DB_PATH
    return prometheus.DB_PATH


class MetricsExporter(prometheus.Prometheus):
    """Dramatiq's message metrics (dramatiq_messages_total, ...), exposed by the fork it is given.

    Parameters:
      fork: A module-level function of no arguments (the master imports it by name) that serves /metrics.
    """

    def __init__(self, *, fork: Callable[[], int]) -> None:
        super().__init__()
        self.fork = fork

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [self.fork]


#: A probe: (healthy, one line saying why).
Probe = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class QueueGauge:
    """One queue's gauges at a scrape: the oldest waiting message's age (None: none waits), the dead letters."""

    queue: str
    oldest_wait_s: float | None
    dead_letters: int


class QueueGauges:
    """A Prometheus collector that reads the queues' gauges from Redis at each scrape.

    whiskypay_queue_oldest_waiting_seconds{queue} (0 when nothing waits), whiskypay_dead_letters{queue}, the
    merchant breakers' whiskypay_breakers_open and whiskypay_parked_callbacks, and whiskypay_redis_up (0 when the
    read failed: the gauges are then left out rather than reported as zero).

    Parameters:
      read: Returns every queue's QueueGauge; raises when Redis cannot be read.
      read_breakers: Returns (merchants whose breaker is open, callbacks parked); raises when Redis cannot be read.
    """

    def __init__(
        self, read: Callable[[], list[QueueGauge]], read_breakers: Callable[[], tuple[int, int]] | None = None
    ) -> None:
        self.read = read
        self.read_breakers = read_breakers

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("whiskypay_redis_up", "1 if the last scrape could read the queues from Redis.")
        try:
            gauges = self.read()
            breakers = self.read_breakers() if self.read_breakers is not None else None
        except Exception as exc:  # a scrape must answer: report Redis as down instead of failing the page
            get_logger(__name__, type(self)).debug("Cannot read the queue gauges (%s).", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        oldest = GaugeMetricFamily("whiskypay_queue_oldest_waiting_seconds",
                                   "How long the next waiting message of the queue has been ready, in seconds.",
                                   labels=["queue"])
        dead = GaugeMetricFamily("whiskypay_dead_letters", "Dead-lettered messages kept, per queue.", labels=["queue"])
        for gauge in gauges:
            oldest.add_metric([gauge.queue], gauge.oldest_wait_s or 0.0)
            dead.add_metric([gauge.queue], gauge.dead_letters)
        yield oldest
        yield dead
        if breakers is not None:
            opened = GaugeMetricFamily("whiskypay_breakers_open", "Merchants whose breaker is open (callbacks parked).")
            opened.add_metric([], breakers[0])
            parked = GaugeMetricFamily("whiskypay_parked_callbacks", "Callbacks parked, waiting for their merchant.")
            parked.add_metric([], breakers[1])
            yield opened
            yield parked


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics (and any other path): every worker process's samples summed, plus the queue gauges;
    GET /healthz and /readyz: the probes."""

    gauges: QueueGauges | None = None
    liveness: Probe | None = None
    readiness: Probe | None = None

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/readyz"):
            probe = self.liveness if path == "/healthz" else self.readiness
            ok, line = probe() if probe is not None else (True, "no probe configured")
            self._answer(200 if ok else 503, f"{'ok' if ok else 'unhealthy'}: {line}\n".encode(),
                         "text/plain; charset=utf-8")
            return
        import prometheus_client
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if self.gauges is not None:
            registry.register(self.gauges)
        self._answer(200, prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        get_logger(__name__, type(self)).debug(format, *args)


def metrics_handler(
    *, gauges: QueueGauges | None = None, liveness: Probe | None = None, readiness: Probe | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> type[BaseHTTPRequestHandler]:
    """Return the request handler class serving /metrics, /healthz and /readyz with these gauges and probes.

    Parameters:
      request_timeout_s: Each socket read of a request is bounded by it, in seconds (REQUEST_TIMEOUT_S).
    """
    return type("MetricsHandler", (_MetricsHandler,), {
        "gauges": gauges, "liveness": staticmethod(liveness) if liveness else None,
        "readiness": staticmethod(readiness) if readiness else None, "timeout": request_timeout_s,
    })


def serve_metrics_on(
    port: int, *, gauges: QueueGauges | None = None, liveness: Probe | None = None, readiness: Probe | None = None,
) -> int:
    """Serve /metrics, /healthz and /readyz on port until the `dramatiq` master stops this fork; return 0 (1 if
    port is taken).

    It binds `dramatiq_prom_host` (Dramatiq's variable, default 0.0.0.0, as a container's scrape target needs).

    Parameters:
      gauges: The queue gauges read at each scrape (none when None).
      liveness, readiness: The /healthz and /readyz probes (always healthy when None).
    """
    use_multiprocess_dir()
    logger = get_logger(__name__, "serve_metrics")
    handler = metrics_handler(gauges=gauges, liveness=liveness, readiness=readiness)
    try:
        httpd = ThreadingHTTPServer((prometheus.HTTP_HOST, port), handler)
    except OSError as exc:
        logger.error(
            "Cannot serve metrics on %s:%d (%s). Set WHISKYPAY_METRICS_PORT to a free port, or "
            "WHISKYPAY_METRICS_ENABLED=false.", prometheus.HTTP_HOST, port, exc.strerror,
        )
        return 1
    logger.info("Serving Prometheus metrics on %s:%d.", prometheus.HTTP_HOST, port)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0
