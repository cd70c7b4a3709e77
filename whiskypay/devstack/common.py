"""What every local server here shares: a free port on 127.0.0.1, and waiting for a started process to be ready."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

#: How often a starting process is checked for readiness, in seconds.
POLL_INTERVAL_S = 0.05


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(
    proc: subprocess.Popen[bytes] | None,
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    exited: Callable[[int | None], Exception],
    timed_out: Callable[[], Exception],
) -> None:
    """Poll until ready() is true; raise exited(returncode) if proc ends first, or timed_out() after timeout_s.

    Parameters:
      proc: The started process (None counts as already ended).
      ready: Whether the process is ready (answers, or logged that it is).
      timeout_s: How long to wait, in seconds.
      exited: Builds the error for a process that ended before being ready, from its return code.
      timed_out: Cleans up (kills the process) and builds the error for a process not ready in time.
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is None or proc.poll() is not None:
            raise exited(None if proc is None else proc.returncode)
        if time.monotonic() > deadline:
            raise timed_out()
        time.sleep(POLL_INTERVAL_S)
