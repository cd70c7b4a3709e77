"""MetricsExporter: Dramatiq's Prometheus middleware, serving /metrics on WHISKYPAY_METRICS_PORT.

Dramatiq's own middleware reads its port from `dramatiq_prom_port` when it is imported, and its exposition
server is a fork that the `dramatiq` master imports by name: no constructor argument can reach it. So this
subclass swaps that fork for `serve_metrics`, which reads the port from our settings in the fork itself.
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
    """Dramatiq's message metrics (dramatiq_messages_total, ...), exposed by `serve_metrics` on metrics_port."""

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_metrics]


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


def serve_metrics() -> int:
    """Serve /metrics on WHISKYPAY_METRICS_PORT until the `dramatiq` master stops this fork; return 0.

    Runs in a process the master forks and imports by name, so it reads the port from the settings itself.
    It binds `dramatiq_prom_host` (Dramatiq's variable, default 0.0.0.0, as a container's scrape target needs).
    """
    from settings import get_settings  # this fork is an entry point of its own, like the docker entrypoint

    use_multiprocess_dir()
    logger = get_logger(__name__, "serve_metrics")
    port = get_settings().metrics_port
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
