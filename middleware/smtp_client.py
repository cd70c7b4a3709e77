"""SmtpClients: one SMTP connection per worker thread, reused across messages and reopened when dropped.

Each exchange with the relay (opening a connection, sending one email, QUIT) ends within the relay's timeout_s
(`whiskypay.smtp.smtp_exchange`, on this middleware's `Watchdog`), however slowly the relay answers.
"""

from __future__ import annotations

import smtplib
import threading
from email.message import EmailMessage

from dramatiq import Broker, Middleware, Worker
from dramatiq.logging import get_logger

from whiskypay.deadline import Watchdog
from whiskypay.errors import SmtpTimedOut, WorkerStartRefused
from whiskypay.queues import Queue, consumes
from whiskypay.smtp import SmtpRelay, classify_smtp_error, open_smtp, quit_smtp, send_over


class SmtpClients(Middleware):
    """Own this worker process's SMTP connections and send emails over them.

    A connection the server dropped (idle timeout, restart) is reopened once, transparently; any other failure
    is raised as SmtpPermanentError (5xx) or SmtpTemporaryError. An exchange cut off at its deadline raises
    `SmtpTimedOut` (a SmtpTemporaryError) and is not tried again on a new connection: one send() takes at most
    twice the timeout on a fresh connection, three times when a reused one was dropped and reopened. A worker
    that consumes emailQueue refuses to start without a sender address.

    Parameters:
      relay: The SMTP relay (host, port, TLS mode, credentials, timeout: the deadline of each exchange, CA file).
      mail_from: The envelope and From address.
    """

    def __init__(self, *, relay: SmtpRelay, mail_from: str | None) -> None:
        self.logger = get_logger(__name__, type(self))
        self.relay = relay
        self.host = relay.host
        self.mail_from = mail_from
        self._local = threading.local()
        self._connections: list[smtplib.SMTP] = []
        self._lock = threading.Lock()
        self.watchdog = Watchdog()

    def __repr__(self) -> str:
        return f"SmtpClients(host={self.relay.host!r}, port={self.relay.port})"

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        if consumes(worker, Queue.EMAIL) and not self.mail_from:
            raise WorkerStartRefused(
                "WHISKYPAY_MAIL_FROM is not set: the email worker needs a sender address, "
                "e.g. WHISKYPAY_MAIL_FROM=payments@your-domain.example."
            )

    def _connect(self) -> smtplib.SMTP:
        conn = open_smtp(self.relay, watchdog=self.watchdog)
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def _drop(self, conn: smtplib.SMTP) -> None:
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except OSError:
            pass
        self._local.conn = None

    def send(self, email: EmailMessage) -> None:
        """Send email from mail_from over this thread's connection."""
        assert self.mail_from is not None
        conn: smtplib.SMTP | None = getattr(self._local, "conn", None)
        fresh = conn is None
        if conn is None:
            conn = self._connect()
        try:
            send_over(conn, email, mail_from=self.mail_from, relay=self.relay, watchdog=self.watchdog)
        except SmtpTimedOut:
            # Cut off at the deadline: no second try on a new connection (the deadline bounds the send), and
            # after the data the relay may have taken it: the caller treats it as a dropped connection.
            self._drop(conn)
            raise
        except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self._drop(conn)
            if fresh:
                raise classify_smtp_error(exc, host=self.host) from None
            self.logger.debug("SMTP connection to %s was closed; reconnecting.", self.host)
            conn = self._connect()
            try:
                send_over(conn, email, mail_from=self.mail_from, relay=self.relay, watchdog=self.watchdog)
            except SmtpTimedOut:
                self._drop(conn)
                raise
            except (smtplib.SMTPException, OSError) as retry_exc:
                self._drop(conn)
                raise classify_smtp_error(retry_exc, host=self.host) from None
        except (smtplib.SMTPException, OSError) as exc:
            if not isinstance(exc, smtplib.SMTPResponseException | smtplib.SMTPRecipientsRefused):
                self._drop(conn)
            raise classify_smtp_error(exc, host=self.host) from None

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            quit_smtp(conn, self.relay, watchdog=self.watchdog)
        self.watchdog.stop()
