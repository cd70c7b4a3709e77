"""WorkerProcess: real `dramatiq` worker processes in their own process group, started and stopped for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from types import TracebackType
from typing import Self

from whiskypay.devstack.common import wait_until_ready

#: What each dramatiq worker process logs once it consumes.
_READY_LINE = "Worker process is ready for action."


def _children_of(pid: int) -> list[int]:
    """Return the PIDs whose parent is ``pid`` (scans /proc).

    Parameters:
        pid: parent process id.
    """
    children: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Field 2 (comm) may contain spaces/parens: parse after the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry))
    return sorted(children)


class WorkerProcess:
    """Real ``dramatiq`` worker processes in a subprocess (own session / process group).

    Parameters:
        args: extra CLI args after the module (e.g. ``"--queues", "emailQueue"``).
        env: full environment for the subprocess.
        cwd: working directory (dramatiq adds it to sys.path).
        processes: ``--processes``.
        threads: ``--threads``.
        log_path: file for stdout+stderr; a temp file when None.
        module: broker module passed to dramatiq.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str],
        cwd: str,
        processes: int = 1,
        threads: int = 2,
        log_path: str | None = None,
        module: str = "actors",
    ) -> None:
        self.args = args
        self.env = dict(env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd = cwd
        self.processes = processes
        self.threads = threads
        self.module = module
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="whiskypay-worker-", suffix=".log")
            os.close(fd)
        self.log_path: str = log_path
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        """The argv that ``start()`` runs."""
        return [
            sys.executable, "-m", "dramatiq", self.module, *self.args,
            "--processes", str(self.processes), "--threads", str(self.threads),
        ]  # fmt: skip

    @property
    def pid(self) -> int | None:
        """PID of the dramatiq master process (None before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit code of the master, None while running or before start."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        """Return True while the master process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """Return the whole log file (all runs of this object)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def ready_count(self) -> int:
        """Count the "ready for action" lines logged by worker processes since the last ``start()``."""
        return self._log_since_start().count(_READY_LINE)

    def start(self, wait_ready: bool = True, timeout_s: float = 30) -> Self:
        """Spawn the master and (optionally) wait until every worker process logged it is ready.

        Parameters:
            wait_ready: wait for ``processes`` ready lines.
            timeout_s: give up (killing the group) after this long.
        """
        if self.running():
            raise RuntimeError("worker already running")
        with open(self.log_path, "ab") as log_fh:
            self._log_offset = log_fh.tell()
            self._proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Wait until every worker process is ready; raise RuntimeError with the log tail otherwise.

        Parameters:
            timeout_s: how long to wait.
        """

        def exited(code: int | None) -> Exception:
            return RuntimeError(f"dramatiq worker exited (code {code}) before being ready; log tail:\n{self._tail()}")

        def timed_out() -> Exception:
            self.kill()
            return RuntimeError(
                f"dramatiq worker not ready within {timeout_s}s "
                f"({self.ready_count()}/{self.processes} ready); log tail:\n{self._tail()}"
            )

        wait_until_ready(self._proc, lambda: self.ready_count() >= self.processes, timeout_s=timeout_s,
                         exited=exited, timed_out=timed_out)  # fmt: skip

    def _tail(self, lines: int = 60) -> str:
        return "".join(self._log_since_start().splitlines(keepends=True)[-lines:])

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM the master (graceful dramatiq shutdown) and wait; SIGKILL the group on timeout.

        Parameters:
            timeout_s: grace period.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()  # stragglers (e.g. orphaned workers) must not outlive us
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers) and reap the master."""
        proc = self._proc
        if proc is None:
            return
        self._kill_group()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def _kill_group(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def pids_of_workers(self) -> list[int]:
        """Return the PIDs of the master's child processes (the worker processes)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        return _children_of(self._proc.pid)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"WorkerProcess(module={self.module!r}, args={self.args!r}, pid={self.pid}, returncode={self.returncode})"
        )
