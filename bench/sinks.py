"""The HTTP sink of the throughput benchmarks, its access log, and a measure of the sink's own rate.

`start_http_sink()` runs a private nginx (Debian's nginx or nginx-light) on a free 127.0.0.1 port with
bench/nginx.conf.template, or, when no nginx binary exists, `bench.pysink` (a threaded Python server writing
the same log format) and says so in `HttpSink.kind`. Both log one line per request: arrival time (wall clock,
seconds with ms resolution), status, URI. The benchmarks count deliveries from that log, by URI prefix.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from whiskypay.devstack import free_port

#: This folder (bench/), where the nginx template and the wrk script live.
BENCH_DIR = Path(__file__).resolve().parent

#: The repository root (the workers' and helpers' working directory).
REPO_ROOT = BENCH_DIR.parent


@dataclass(frozen=True)
class Hit:
    """One logged request: wall-clock arrival in seconds, HTTP status, URI."""

    at: float
    status: int
    uri: str


class AccessLog:
    """Reads an access log incrementally and counts requests per URI prefix.

    Parameters:
        path: the log file (created by the sink).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def mark(self) -> None:
        """Skip everything logged so far."""
        self._offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self._partial = b""

    def read(self) -> list[Hit]:
        """Return the requests logged since the last read (or mark)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        hits = []
        for line in lines:
            parts = line.decode("ascii", errors="replace").split(" ", 2)
            if len(parts) == 3:
                hits.append(Hit(at=float(parts[0]), status=int(parts[1]), uri=parts[2]))
        return hits


class HttpSink:
    """A started HTTP sink subprocess that answers 200 to every request and logs each one.

    Parameters:
        kind: "nginx" or "python" (the fallback).
        port: its 127.0.0.1 port.
        workdir: config, logs; removed on stop().
        proc: the server process (its own session).
    """

    def __init__(
        self,
        *,
        kind: str,
        port: int,
        workdir: str,
        proc: subprocess.Popen[bytes],
        delay_ms: float = 0.0,
        hosts: tuple[str, ...] = ("127.0.0.1",),
    ) -> None:
        self.kind = kind
        self.port = port
        self.workdir = workdir
        self.proc = proc
        self.delay_ms = delay_ms
        self.hosts = hosts
        self.log_path = os.path.join(workdir, "access.log")

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """Return http://HOST:PORT{path} (host: one of the addresses it listens on)."""
        return f"http://{host}:{self.port}{path}"

    def access_log(self) -> AccessLog:
        """Return a reader of this sink's access log, positioned at its current end."""
        log = AccessLog(self.log_path)
        log.mark()
        return log

    def version(self) -> str:
        """Return a one-line description of the server."""
        if self.kind == "slow":
            return (
                f"Python asyncio sink (bench.slowsink), answers after {self.delay_ms:g} ms, on {len(self.hosts)} "
                f"address(es), Python {sys.version.split()[0]}"
            )
        if self.kind != "nginx":
            return f"Python ThreadingHTTPServer (fallback: no nginx binary), Python {sys.version.split()[0]}"
        out = subprocess.run([_nginx_binary() or "nginx", "-v"], capture_output=True, text=True, check=False)
        return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its folder."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def _wait_listening(
    port: int, proc: subprocess.Popen[bytes], what: str, log: str, timeout_s: float = 10, host: str = "127.0.0.1"
) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening; see {log}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout_s} s; see {log}")


def start_http_sink(*, prefer: str = "nginx") -> HttpSink:
    """Start nginx as the sink, or the Python fallback when prefer is "python" or no nginx binary is found.

    Parameters:
        prefer: "nginx" or "python".
    """
    workdir = tempfile.mkdtemp(prefix="whiskypay-bench-sink-")
    port = free_port()
    nginx = _nginx_binary() if prefer == "nginx" else None
    out = open(os.path.join(workdir, "server.out"), "wb")
    if nginx is not None:
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        # As root, nginx drops its workers to `nobody:nobody`, and Debian has no group "nobody".
        user_line = "user nobody nogroup;" if os.geteuid() == 0 else ""
        config = (BENCH_DIR / "nginx.conf.template").read_text()
        for key, value in {"{dir}": workdir, "{port}": str(port), "{user_line}": user_line}.items():
            config = config.replace(key, value)
        conf_path = os.path.join(workdir, "nginx.conf")
        Path(conf_path).write_text(config)
        os.chmod(workdir, 0o755)
        proc = subprocess.Popen(
            [nginx, "-p", workdir, "-c", conf_path, "-e", os.path.join(workdir, "error.log")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        sink = HttpSink(kind="nginx", port=port, workdir=workdir, proc=proc)
        _wait_listening(port, proc, "nginx", os.path.join(workdir, "error.log"))
    else:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.pysink", str(port), os.path.join(workdir, "access.log")],
            cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        sink = HttpSink(kind="python", port=port, workdir=workdir, proc=proc)
        _wait_listening(port, proc, "bench.pysink", os.path.join(workdir, "server.out"))
    out.close()
    return sink


def many_hosts(count: int = 100) -> tuple[str, ...]:
    """Return the loopback addresses of the many-merchants runs: 127.0.0.2, 127.0.0.3, ... (count of them)."""
    if not 1 <= count <= 250:
        raise ValueError(f"count={count}: between 1 and 250 addresses of 127.0.0.0/24")
    return tuple(f"127.0.0.{i}" for i in range(2, 2 + count))


def start_slow_sink(*, delay_ms: float, hosts: tuple[str, ...] = ("127.0.0.1",)) -> HttpSink:
    """Start `bench.slowsink` (one asyncio process) answering 200 after delay_ms, on one port of every host.

    Parameters:
        delay_ms: how long every answer waits after the request arrived, in milliseconds.
        hosts: the loopback addresses it listens on (the same port on each).
    """
    workdir = tempfile.mkdtemp(prefix="whiskypay-bench-slowsink-")
    port = free_port()
    log = os.path.join(workdir, "server.out")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.slowsink", str(port), os.path.join(workdir, "access.log"), f"{delay_ms:g}",
             *hosts],
            cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    sink = HttpSink(kind="slow", port=port, workdir=workdir, proc=proc, delay_ms=delay_ms, hosts=hosts)
    for host in (hosts[0], hosts[-1]):
        _wait_listening(port, proc, "bench.slowsink", log, host=host)
    return sink


@dataclass(frozen=True)
class SinkRate:
    """The sink's own rate under a load generator: requests per second and how it was measured."""

    requests_per_s: float
    tool: str


def measure_sink_rate(sink: HttpSink, *, seconds: float, connections: int = 32) -> SinkRate:
    """Load the sink from separate processes for `seconds` and return its rate.

    Uses wrk (2 threads, `connections` connections, POST of a webhook-sized body) when installed, otherwise
    `bench.load` (2 processes x 8 threads, one requests.Session per thread), which is itself the bottleneck.

    Parameters:
        sink: the started sink.
        seconds: how long to load it.
        connections: wrk's concurrent connections (a slow sink needs many: rate <= connections / delay).
    """
    url = sink.url("/sink-rate", host=sink.hosts[0])
    wrk = shutil.which("wrk")
    if wrk is not None:
        duration = max(1, round(seconds))
        out = subprocess.run(
            [wrk, "-t2", f"-c{connections}", f"-d{duration}s", "-s", str(BENCH_DIR / "post.lua"), url],
            capture_output=True, text=True, check=True, timeout=duration + 30,
        )  # fmt: skip
        match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
        if match is None:
            raise RuntimeError(f"could not read wrk's output:\n{out.stdout}\n{out.stderr}")
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
        if non2xx:
            raise RuntimeError(f"the sink answered {non2xx.group(1)} requests with a non-2xx status")
        return SinkRate(float(match.group(1)), f"wrk -t2 -c{connections} -d{duration}s, POST {len(_BODY)} B")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.load", "http", url, str(seconds), "8"],
            cwd=str(REPO_ROOT),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    total = sum(float((p.communicate(timeout=seconds + 30)[0] or "0").strip() or 0) for p in procs)
    return SinkRate(total, "python requests, 2 processes x 8 threads (no wrk installed; the client is the limit)")


_BODY = (
    b'{"email":"buyer@example.com","plan":"pro","price":19.99,"status":"success","timestamp":"2026-11-27T21:00:00Z"}'
)
