"""HttpClients: one pooled requests.Session per worker thread, guarded against private addresses."""

from __future__ import annotations

import threading

import requests
from dramatiq import Broker, Middleware, Worker
from dramatiq.logging import get_logger

from whiskypay.delivery import Attempt, post_webhook
from whiskypay.netguard import GuardedAdapter


class HttpClients(Middleware):
    """Own the webhook HTTP sessions of this worker process: one per thread, reused across messages.

    Sessions ignore proxy and .netrc settings from the environment (trust_env off), never follow redirects
    (the delivery code passes allow_redirects=False) and, unless allow_private, refuse to talk to a
    non-public peer address. All are closed in `after_worker_shutdown`, after the worker threads joined.

    Parameters:
      allow_private: Accept loopback and private callback hosts (development and tests).
      connect_timeout_s, read_timeout_s: Socket timeouts of every attempt, in seconds.
      max_response_bytes: The most of a response body read, in bytes.
      pool_size: Connections kept per host and session.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_response_bytes: int,
        pool_size: int = 4,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.allow_private = allow_private
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_response_bytes = max_response_bytes
        self.pool_size = pool_size
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        """Return the calling thread's session, creating it on first use."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            adapter = GuardedAdapter(
                allow_private=self.allow_private, pool_connections=self.pool_size, pool_maxsize=self.pool_size
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = "WhiskyPay-Webhooks/1"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """Make one webhook attempt on the calling thread's session (see `whiskypay.delivery.post_webhook`)."""
        return post_webhook(
            self.session(),
            url,
            body,
            headers,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            max_response_bytes=self.max_response_bytes,
        )

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
