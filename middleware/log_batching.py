"""LogBatching: a worker process sends its log lines to the `dramatiq` master in chunks, not one pipe message each.

The `dramatiq` CLI points each worker process's logging (and its stdout and stderr) at a pipe to the master, which
writes every message it receives to its stderr or log file and flushes it: one send in the worker and one receive,
write and flush in the master per line. With a line per delivered webhook that is master CPU per webhook, on the
cores the workers need. Here the lines are gathered and sent as one chunk at most every `interval_s`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from dramatiq import Broker, Middleware, Worker
from dramatiq.compat import StreamablePipe

#: How long a log line may wait for others before its chunk goes to the master, in seconds.
DEFAULT_INTERVAL_S = 0.025

#: Records at this level and above are sent at once, with everything written before them.
URGENT_LEVEL = logging.WARNING

#: Characters gathered that are sent at once, without waiting: what a burst of lines may hold in memory.
MAX_CHUNK_CHARS = 64 * 1024


class BatchedPipe:
    """A text stream over a dramatiq StreamablePipe: what is written goes to the master at most interval_s later.

    Each write is kept whole, and writes go out in the order they were made (one lock orders the sends). A sender
    thread wakes only when something waits (an idle worker costs nothing); `flush()` sends everything now;
    `close()` flushes, then closes the pipe. Once closed, writes are dropped (the pipe is gone).

    Parameters:
      pipe: The worker process's pipe to the master (dramatiq's StreamablePipe).
      interval_s: How long written text may wait for more, in seconds.
      max_chars: Sent at once when this many characters wait.
    """

    def __init__(
        self, pipe: StreamablePipe, *, interval_s: float = DEFAULT_INTERVAL_S, max_chars: int = MAX_CHUNK_CHARS
    ) -> None:
        self.pipe = pipe
        self.encoding: str = pipe.encoding
        self.interval_s = interval_s
        self.max_chars = max_chars
        self._parts: list[str] = []
        self._chars = 0
        self._closed = False
        self._lock = threading.Lock()  # guards _parts, _chars, _closed
        self._send_lock = threading.Lock()  # taken before the text is, held until it is sent: sends stay in order
        self._waiting = threading.Event()
        self._thread = threading.Thread(target=self._run, name="whiskypay-log-batching", daemon=True)
        self._thread.start()

    def write(self, text: str) -> int:
        with self._lock:
            if self._closed:
                return len(text)
            self._parts.append(text)
            self._chars += len(text)
            full = self._chars >= self.max_chars
        if full:
            self.flush()
        elif not self._waiting.is_set():
            self._waiting.set()
        return len(text)

    def flush(self) -> None:
        """Send everything written so far, now."""
        with self._send_lock:
            with self._lock:
                text = "".join(self._parts)
                self._parts = []
                self._chars = 0
            if text:
                self.pipe.write(text)

    def close(self) -> None:
        """Send what waits, stop the sender thread and close the pipe."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
            self._waiting.set()
            self.pipe.pipe.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return int(self.pipe.fileno())

    def isatty(self) -> bool:
        return False

    def _run(self) -> None:
        while True:
            self._waiting.wait()
            if self._closed:
                return
            time.sleep(self.interval_s)  # let more lines join this chunk
            self._waiting.clear()
            try:
                self.flush()
            except OSError:  # the master is gone: nothing can be sent any more
                return
            if self._closed:  # closed while this chunk waited: close() sent it
                return


class _FlushingWrites:
    """sys.stderr over a BatchedPipe: each write goes at once (tracebacks, warnings), after what waits before it."""

    def __init__(self, stream: BatchedPipe) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        self.stream.flush()
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _BatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The worker's StreamHandler, flushing only records at URGENT_LEVEL and above (BatchedPipe sends the rest)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= URGENT_LEVEL:
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class LogBatching(Middleware):
    """In a `dramatiq` worker process, send the log lines to the master in chunks, at most every interval_s.

    Records of WARNING and above go at once, with every line before them; lines are whole and in order, from
    logging and from stdout and stderr alike. What waits is sent when the worker shuts down and when its pipe
    closes or the process exits. Only worker processes are touched: after_process_boot is the `dramatiq` CLI's
    worker-process hook, and only a root handler writing to dramatiq's pipe is replaced (the gateway, tests and
    `--skip-logging` keep their logging as it is).

    Parameters:
      interval_s: How long a line may wait for others, in seconds.
    """

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.stream: BatchedPipe | None = None

    def after_process_boot(self, broker: Broker) -> None:
        root = logging.getLogger()
        found = [
            (index, handler, handler.stream)
            for index, handler in enumerate(root.handlers)
            if type(handler) is logging.StreamHandler and isinstance(handler.stream, StreamablePipe)
        ]
        if not found:
            return
        index, handler, pipe = found[0]
        stream = self.stream = BatchedPipe(pipe, interval_s=self.interval_s)
        batched = _BatchedHandler(stream)
        batched.setLevel(handler.level)
        batched.setFormatter(handler.formatter)
        for log_filter in handler.filters:
            batched.addFilter(log_filter)
        root.handlers[index] = batched
        if sys.stdout is pipe:
            sys.stdout = stream
        if sys.stderr is pipe:
            sys.stderr = _FlushingWrites(stream)
        # The CLI closes this pipe last of all (after "Worker has been shut down."): what waits goes first.
        pipe.close = stream.close  # type: ignore[method-assign]

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        if self.stream is not None:
            self.stream.flush()
