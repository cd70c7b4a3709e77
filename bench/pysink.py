"""Fallback HTTP sink (used only when no nginx binary exists): answer 200 to every request and log it.

Usage: python -m bench.pysink PORT LOG_PATH. Logs "<unix time with ms> <status> <uri>" per request, like the
nginx sink's `bench` log format, so the benchmarks read both the same way.
"""

from __future__ import annotations

import http.server
import sys
import threading
import time
from typing import Any

_lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_file: Any = None

    def log_message(self, *args: Any) -> None:
        """Stay quiet on stderr; every request is logged to the access log instead."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        with _lock:
            self.log_file.write(f"{time.time():.3f} 200 {self.path}\n")
            self.log_file.flush()

    do_GET = do_POST = do_PUT = _answer


def main() -> None:
    """Serve on 127.0.0.1:PORT until killed."""
    port, log_path = int(sys.argv[1]), sys.argv[2]
    _Handler.log_file = open(log_path, "a", encoding="ascii")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
