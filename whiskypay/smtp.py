"""The SMTP transport: connect (and log in) to the relay, send over the connection, and classify what went wrong.

The rendering is `whiskypay.mail`; the per-thread connections are the SmtpClients middleware's, which sends
over the connections this module opens. Error texts carry the relay's host and the reply code, never addresses.

Every exchange with the relay ends within the relay's timeout_s, whatever the relay does: opening a connection
(resolution, connect, the greeting, EHLO, STARTTLS or the TLS handshake, AUTH), sending one email (MAIL, RCPT,
DATA and the reply after the data) and QUIT. smtplib's own timeout bounds each socket read only, so a relay that
trickles its replies one byte at a time would hold the thread as long as it likes; here each exchange runs as
one attempt of a `whiskypay.deadline.Watchdog` (the webhooks' mechanism), which shuts the connection's socket
down at the deadline: the blocked read returns at once and the exchange fails with `SmtpTimedOut`.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import BinaryIO, cast

from whiskypay.deadline import AttemptScope, Watchdog, current_attempt
from whiskypay.errors import SmtpPermanentError, SmtpTemporaryError, SmtpTimedOut, WhiskyPayError
from whiskypay.netguard import connect_within

#: The watchdog of the exchanges of callers that bring none (`whiskypay check`); SmtpClients has its own.
DEFAULT_WATCHDOG = Watchdog()


@dataclass(frozen=True)
class SmtpRelay:
    """Where and how to reach the SMTP relay: the one description the workers and `whiskypay check` share.

    Parameters:
      host, port: The relay's address.
      tls: "off", "starttls" (upgrade a plain connection) or "ssl" (implicit TLS from the first byte).
      username, password: AUTH credentials, or None for none; the password never appears in `repr`.
      timeout_s: The deadline of each whole exchange (opening a connection, sending one email, QUIT), and so of
        every socket read, in seconds.
      ca_file: A PEM file of CA certificates to trust instead of the system's; None for the system's.
    """

    host: str
    port: int
    tls: str = "off"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    ca_file: str | None = None


def _bounded_socket(host: str, port: int, timeout: float) -> socket.socket:
    """Resolve and connect within the running exchange's budget, and hand the socket to it (its watchdog's)."""
    scope = current_attempt()
    budget = timeout if scope is None else max(min(timeout, scope.remaining()), 0.001)
    sock = connect_within(host, port, budget, resolver=scope.resolver if scope else socket.getaddrinfo)
    sock.settimeout(timeout)
    if scope is not None:
        scope.use(sock)
    return sock


class _WholeLines:
    """The reply stream smtplib reads, refusing a line cut off by the end of the stream.

    smtplib takes a last line without its CRLF as a whole reply: a "250 ..." trickled until the watchdog shut the
    socket down would read as accepted, and a truncated EHLO as answered. A line the stream ends in the middle of
    is a connection lost mid-reply (`SMTPServerDisconnected`), past the deadline `SmtpTimedOut`.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def readline(self, size: int = -1) -> bytes:
        line = self._raw.readline(size)
        if line and not line.endswith(b"\n") and (size < 0 or len(line) < size):
            raise smtplib.SMTPServerDisconnected("Connection closed in the middle of a reply")
        return line

    def close(self) -> None:
        self._raw.close()


class _BoundedReplies(smtplib.SMTP):
    """An SMTP client whose socket joins the running exchange (`smtp_exchange`) and whose replies are whole lines."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return _bounded_socket(host, port, timeout)

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:  # smtplib opens it here too, and again after STARTTLS
            self.file = cast(BinaryIO, _WholeLines(self.sock.makefile("rb")))
        return super().getreply()


class _SMTP(_BoundedReplies):
    pass


class _SMTP_SSL(_BoundedReplies, smtplib.SMTP_SSL):
    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # The plain socket is watched, so the deadline also ends a trickled TLS handshake.
        return self.context.wrap_socket(_bounded_socket(host, port, timeout), server_hostname=host)


@contextmanager
def smtp_exchange(
    relay: SmtpRelay, *, conn: smtplib.SMTP | None = None, watchdog: Watchdog | None = None
) -> Iterator[AttemptScope]:
    """Run the body as one exchange with the relay that ends within relay.timeout_s; yield its scope.

    conn is the open connection the body uses (None while opening one: its socket joins the exchange when it
    connects). An smtplib or socket error raised once the deadline passed becomes `SmtpTimedOut`, and the
    connection is closed (it is cut off, and useless); other errors pass through.
    """
    with (watchdog or DEFAULT_WATCHDOG).attempt(relay.timeout_s) as scope:
        if conn is not None and conn.sock is not None:
            scope.use(conn.sock)
        try:
            yield scope
        except (smtplib.SMTPException, OSError):
            if not scope.expired:
                raise
            if conn is not None:
                conn.close()
            raise SmtpTimedOut(
                f"SMTP exchange with {relay.host} took longer than {relay.timeout_s:g} s; cut off",
                host=relay.host,
            ) from None


def open_smtp(relay: SmtpRelay, *, watchdog: Watchdog | None = None) -> smtplib.SMTP:
    """Connect, EHLO (and STARTTLS, log in) to the SMTP relay within relay.timeout_s in all; raise
    `SmtpTemporaryError` with the host when it cannot (`SmtpTimedOut` past the deadline).

    With TLS the relay's certificate must chain to a trusted CA and name the host (a failed check is an
    `ssl.SSLCertVerificationError`, so a `SmtpTemporaryError` naming it).
    """
    conn: smtplib.SMTP | None = None
    try:
        with smtp_exchange(relay, watchdog=watchdog):
            try:
                if relay.tls == "ssl":
                    context = ssl.create_default_context(cafile=relay.ca_file)
                    conn = _SMTP_SSL(relay.host, relay.port, timeout=relay.timeout_s, context=context)
                else:
                    conn = _SMTP(relay.host, relay.port, timeout=relay.timeout_s)
                    if relay.tls == "starttls":
                        conn.starttls(context=ssl.create_default_context(cafile=relay.ca_file))
                conn.ehlo_or_helo_if_needed()
                if relay.username:
                    conn.login(relay.username, relay.password or "")
                return conn
            except BaseException:
                if conn is not None:
                    conn.close()  # a refused STARTTLS or login leaves the plain socket open otherwise
                raise
    except (smtplib.SMTPException, OSError) as exc:
        raise classify_smtp_error(exc, host=relay.host) from None


def send_over(
    conn: smtplib.SMTP, email: EmailMessage, *, mail_from: str, relay: SmtpRelay, watchdog: Watchdog | None = None
) -> None:
    """Send email over conn (MAIL, RCPT, DATA and the reply after the data) within relay.timeout_s.

    smtplib's errors pass through (the caller classifies them and decides about reconnecting), except past the
    deadline: `SmtpTimedOut`, with conn closed.
    """
    with smtp_exchange(relay, conn=conn, watchdog=watchdog):
        conn.send_message(email, from_addr=mail_from)


def quit_smtp(conn: smtplib.SMTP, relay: SmtpRelay, *, watchdog: Watchdog | None = None) -> None:
    """Say QUIT within relay.timeout_s, or just close the connection; never raises smtplib or socket errors."""
    try:
        with smtp_exchange(relay, conn=conn, watchdog=watchdog):
            conn.quit()
    except (smtplib.SMTPException, OSError, SmtpTimedOut):
        conn.close()


def classify_smtp_error(exc: BaseException, *, host: str) -> WhiskyPayError:
    """Map an smtplib/socket error to SmtpPermanentError (5xx) or SmtpTemporaryError (4xx, connection)."""
    code: int | None = None
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        code = next(iter(exc.recipients.values()))[0]
    elif isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
    if code is not None and 500 <= code < 600:
        return SmtpPermanentError(f"SMTP {code} from {host}: rejected", host=host, smtp_code=code)
    if code is not None:
        return SmtpTemporaryError(f"SMTP {code} from {host}: try again later", host=host, smtp_code=code)
    return SmtpTemporaryError(f"SMTP connection to {host} failed ({type(exc).__name__})", host=host)
