"""WorkerLiveness: each worker process keeps a liveness file (`whiskypay.worker_health`) for health probes."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.logging import get_logger

from whiskypay.worker_health import WorkerBeat, remove_beat, write_beat

#: How often the liveness file is rewritten, in seconds (the heartbeat timeout is 5 s at the least).
BEAT_INTERVAL_S = 2.0

#: TimeLimit's default time limit, in milliseconds: a message without its own runs at most this long.
DEFAULT_TIME_LIMIT_MS = 600_000


class WorkerLiveness(Middleware):
    """Rewrite `<state_dir>/<pid>.json` every beat_interval_s: alive, threads busy since when, consumers running.

    Read by `whiskypay health --worker` and by /healthz and /readyz on the metrics port. The file goes when the
    worker shuts down cleanly; a killed worker's file is ignored once its process is gone.

    Parameters:
      state_dir: The directory of the liveness files (WHISKYPAY_WORKER_STATE_DIR, or $TMPDIR/whiskypay-workers).
      time_limit_ms: The time limit of a message whose actor and options set none (TimeLimit's default).
      beat_interval_s: How often the file is rewritten, in seconds.
      clock: Unix seconds.
    """

    def __init__(
        self, *, state_dir: str, time_limit_ms: int = DEFAULT_TIME_LIMIT_MS, beat_interval_s: float = BEAT_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.state_dir = state_dir
        self.time_limit_ms = time_limit_ms
        self.beat_interval_s = beat_interval_s
        self.clock = clock
        self._busy: dict[int, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: Worker | None = None

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._worker = worker
        self._stop.clear()
        self._beat_or_warn()
        self._thread = threading.Thread(target=self._run, name="whiskypay-liveness", daemon=True)
        self._thread.start()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._beat_or_warn()  # the consumers run now: readiness need not wait for the next beat

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        remove_beat(self.state_dir, os.getpid())

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        limit = message.options.get("time_limit")
        if limit is None:
            with contextlib.suppress(Exception):
                limit = broker.get_actor(message.actor_name).options.get("time_limit")
        with self._lock:
            self._busy[threading.get_ident()] = (self.clock(), int(limit or self.time_limit_ms))

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: BaseException | None = None
    ) -> None:
        with self._lock:
            self._busy.pop(threading.get_ident(), None)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        with self._lock:
            self._busy.pop(threading.get_ident(), None)

    def beat(self) -> None:
        """Write this process's liveness file now."""
        worker: Any = self._worker
        with self._lock:
            busy = tuple(self._busy.values())
        consuming = tuple(sorted(
            name for name, thread in (worker.consumers.items() if worker is not None else ()) if thread.is_alive()
        ))
        beat = WorkerBeat(
            pid=os.getpid(), master_pid=os.getppid(), at=self.clock(),
            threads=int(worker.worker_threads) if worker is not None else 0, busy=busy, consuming=consuming,
            # WhiskyPayRedisBroker.halt: a Redis configuration error stopped the consumers (readiness fails).
            halted=str(getattr(worker.broker, "halt_reason", "")) if worker is not None else "",
        )
        write_beat(self.state_dir, beat)

    def _beat_or_warn(self) -> None:
        # An unwritable directory must not stop the deliveries: the health checks then say the worker is gone.
        try:
            self.beat()
        except OSError as exc:
            self.logger.warning("Cannot write the liveness file in %s (%s); `whiskypay health --worker` will say no "
                                "worker runs. Set WHISKYPAY_WORKER_STATE_DIR to a writable directory.",
                                self.state_dir, exc.strerror)

    def _run(self) -> None:
        while not self._stop.wait(self.beat_interval_s):
            self._beat_or_warn()
