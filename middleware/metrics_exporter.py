"""MetricsExporter: Dramatiq's Prometheus middleware, serving /metrics on WHISKYPAY_METRICS_PORT.

Dramatiq's own middleware reads its port from `dramatiq_prom_port` when it is imported, and its exposition
server is a fork that the `dramatiq` master imports by name: no constructor argument can reach it. So this
subclass swaps that fork for the one it is given (`whiskypay.broker.serve_metrics`, which reads the port from
the settings in the fork itself and calls `serve_metrics_on`).
Every worker process writes its samples into Dramatiq's multiprocess directory (env `dramatiq_prom_db`,
default `$TMPDIR/dramatiq-prometheus`); the fork sums the files of all of them per scrape.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dramatiq.logging import get_logger
from dramatiq.middleware import prometheus


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


class _MetricsHandler(BaseHTTPRequestHandler):
    """Answer every GET with the sum of all worker processes' samples."""

    def do_GET(self) -> None:
        import prometheus_client
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = prometheus_client.generate_latest(registry)
        self.send_response(200)
        self.send_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        get_logger(__name__, type(self)).debug(format, *args)


def serve_metrics_on(port: int) -> int:
    """Serve /metrics on port until the `dramatiq` master stops this fork; return 0 (1 if port is taken).

    It binds `dramatiq_prom_host` (Dramatiq's variable, default 0.0.0.0, as a container's scrape target needs).
    """
    use_multiprocess_dir()
    logger = get_logger(__name__, "serve_metrics")
    try:
        httpd = ThreadingHTTPServer((prometheus.HTTP_HOST, port), _MetricsHandler)
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
