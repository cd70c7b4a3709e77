"""Fault: Redis unreachable when the gateway sends: `send()` raises EnqueueError in bounded time, naming the
setting and not the password."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.common import REPO_ROOT, Report
from whiskypay.devstack import free_port

pytestmark = pytest.mark.e2e


SENDER = '''\
"""Call send_callback.send once; print how it ended and how long it took, as JSON."""
import json
import time

from actors import send_callback
from whiskypay.actor import EnqueueError  # the public import path the gateway uses

started = time.monotonic()
try:
    send_callback.send(callback_url="http://127.0.0.1:9/hook", email="b@example.com", plan="pro", price=1)
    outcome = {"raised": None, "text": ""}
except Exception as exc:
    raised = f"{type(exc).__module__}.{type(exc).__qualname__}"
    outcome = {"raised": "whiskypay.actor.EnqueueError" if type(exc) is EnqueueError else raised, "text": str(exc)}
outcome["elapsed_s"] = time.monotonic() - started
print(json.dumps(outcome))
'''


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """Yield the port of a TCP server that accepts connections and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize("where", ["nothing listening", "a host that never answers"])
def test_send_raises_enqueue_error_in_bounded_time_when_redis_is_unreachable(
    worker_env: dict[str, str], tmp_path: Path, where: str, report: Report
) -> None:
    script = tmp_path / "send_once.py"
    script.write_text(SENDER)
    timeout_s = 1.0
    with contextlib.ExitStack() as stack:
        port = free_port() if where == "nothing listening" else stack.enter_context(blackhole())
        # Given a gateway whose WHISKYPAY_REDIS_URL (with a password) points where no Redis answers
        genv = {
            **worker_env,
            "WHISKYPAY_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0",
            "WHISKYPAY_REDIS_TIMEOUT_S": str(timeout_s),
        }
        # When it sends a callback
        done = subprocess.run(
            [sys.executable, str(script)],
            env=genv,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    # Then send() raises EnqueueError within the Redis timeout + 1 s, naming the setting and not the password
    assert outcome["raised"] == "whiskypay.actor.EnqueueError", outcome
    assert outcome["elapsed_s"] < timeout_s + 1.0, outcome
    assert "WHISKYPAY_REDIS_URL" in outcome["text"]
    assert "hunter2" not in done.stdout + done.stderr
    report(
        f"Redis unreachable ({where}): EnqueueError after {outcome['elapsed_s']:.2f} s "
        f"(WHISKYPAY_REDIS_TIMEOUT_S={timeout_s:g})"
    )
