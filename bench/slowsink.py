"""The slow-merchant HTTP sink: answer 200 to every request after a fixed delay, and log each arrival.

Usage: python -m bench.slowsink PORT LOG_PATH DELAY_MS [HOST ...] (default host 127.0.0.1). One process, one
asyncio loop, listening on PORT of every HOST given (127.0.0.2 ... 127.0.0.101 for the many-merchants runs:
one server, a hundred "merchants"). Keep-alive HTTP/1.1; each request's answer is scheduled DELAY_MS after its
body arrived (`loop.call_later`, no task per request), so the sink waits, it does not compute. Logs
"<unix time with ms> 200 <uri>" per request at its arrival, like the nginx sink's `bench` format, so the
benchmarks read both the same way; lines are written in batches every 20 ms.

Standard library only: the benchmarks must not depend on what they measure.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import IO

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Type: text/plain\r\n\r\n"


class _Log:
    """Arrival lines, buffered and written every 20 ms."""

    def __init__(self, fh: IO[str], loop: asyncio.AbstractEventLoop) -> None:
        self.fh = fh
        self.loop = loop
        self.lines: list[str] = []
        loop.call_later(0.02, self.flush)

    def flush(self) -> None:
        if self.lines:
            lines, self.lines = self.lines, []
            self.fh.write("".join(lines))
            self.fh.flush()
        self.loop.call_later(0.02, self.flush)


class _SlowHttp(asyncio.Protocol):
    """One keep-alive connection: parse request head and Content-Length body, answer after the delay."""

    def __init__(self, delay_s: float, log: _Log, loop: asyncio.AbstractEventLoop) -> None:
        self.delay_s = delay_s
        self.log = log
        self.loop = loop
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.buffer = self.buffer[end:]
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            uri = parts[1].decode("ascii", "replace") if len(parts) > 1 else "?"
            self.log.lines.append(f"{time.time():.3f} 200 {uri}\n")
            self.loop.call_later(self.delay_s, self._answer)

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_RESPONSE)


async def serve(port: int, log_path: str, delay_s: float, hosts: list[str]) -> None:
    """Serve on port of every host until killed."""
    loop = asyncio.get_running_loop()
    with open(log_path, "a", encoding="ascii") as fh:
        log = _Log(fh, loop)
        server = await loop.create_server(lambda: _SlowHttp(delay_s, log, loop), host=hosts, port=port, backlog=1024)
        async with server:
            await server.serve_forever()


def main() -> None:
    """Parse the command line and serve."""
    port, log_path, delay_ms = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    hosts = sys.argv[4:] or ["127.0.0.1"]
    asyncio.run(serve(port, log_path, delay_ms / 1000, hosts))


if __name__ == "__main__":
    main()
