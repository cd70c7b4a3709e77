"""Load generators for measuring the sinks' own rates from a separate process.

Usage:
  python -m bench.load http URL SECONDS THREADS   (when wrk is not installed)
  python -m bench.load smtp HOST:PORT SECONDS THREADS
Prints the requests (or messages) per second this process reached; each thread keeps one requests.Session
(or one SMTP connection) for the whole run.
"""

from __future__ import annotations

import smtplib
import sys
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage

import requests

_BODY = (
    b'{"email":"buyer@example.com","plan":"pro","price":19.99,"status":"success","timestamp":"2026-11-27T21:00:00Z"}'
)


def _http(url: str) -> Callable[[Callable[[], bool]], int]:
    def loop(go_on: Callable[[], bool]) -> int:
        count = 0
        with requests.Session() as session:
            while go_on():
                session.post(url, data=_BODY, headers={"Content-Type": "application/json"}, timeout=5).close()
                count += 1
        return count

    return loop


def _smtp(address: str) -> Callable[[Callable[[], bool]], int]:
    host, port = address.rsplit(":", 1)
    message = EmailMessage()
    message["Subject"] = "Your Acme Cloud receipt: pro"
    message["From"] = "payments@bench.test"
    message["To"] = "buyer@example.com"
    message.set_content("Thank you for your payment.\n" * 10)
    message.add_alternative("<p>Thank you for your payment.</p>" * 10, subtype="html")

    def loop(go_on: Callable[[], bool]) -> int:
        count = 0
        with smtplib.SMTP(host, int(port), timeout=10) as smtp:
            while go_on():
                smtp.send_message(message)
                count += 1
        return count

    return loop


def main() -> None:
    """Load the target for SECONDS with THREADS threads and print the rate."""
    kind, target, seconds, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    loop = _http(target) if kind == "http" else _smtp(target)
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def run(index: int) -> None:
        counts[index] = loop(lambda: time.monotonic() < deadline)

    started = time.monotonic()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(f"{sum(counts) / (time.monotonic() - started):.1f}")


if __name__ == "__main__":
    main()
