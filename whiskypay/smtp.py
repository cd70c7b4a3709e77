"""The SMTP transport: connect (and log in) to the relay, and classify what went wrong.

The rendering is `whiskypay.mail`; the per-thread connections are the SmtpClients middleware's, which sends
over the connections this module opens. Error texts carry the relay's host and the reply code, never addresses.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass, field

from whiskypay.errors import SmtpPermanentError, SmtpTemporaryError, WhiskyPayError


@dataclass(frozen=True)
class SmtpRelay:
    """Where and how to reach the SMTP relay: the one description the workers and `whiskypay check` share.

    Parameters:
      host, port: The relay's address.
      tls: "off", "starttls" (upgrade a plain connection) or "ssl" (implicit TLS from the first byte).
      username, password: AUTH credentials, or None for none; the password never appears in `repr`.
      timeout_s: Socket timeout for the connection and every command, in seconds.
      ca_file: A PEM file of CA certificates to trust instead of the system's; None for the system's.
    """

    host: str
    port: int
    tls: str = "off"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    ca_file: str | None = None


def open_smtp(relay: SmtpRelay) -> smtplib.SMTP:
    """Connect (and log in) to the SMTP relay; raise `SmtpTemporaryError` with the host when it cannot.

    With TLS the relay's certificate must chain to a trusted CA and name the host (a failed check is an
    `ssl.SSLCertVerificationError`, so a `SmtpTemporaryError` naming it).
    """
    conn: smtplib.SMTP | None = None
    try:
        if relay.tls == "ssl":
            context = ssl.create_default_context(cafile=relay.ca_file)
            conn = smtplib.SMTP_SSL(relay.host, relay.port, timeout=relay.timeout_s, context=context)
        else:
            conn = smtplib.SMTP(relay.host, relay.port, timeout=relay.timeout_s)
            if relay.tls == "starttls":
                conn.starttls(context=ssl.create_default_context(cafile=relay.ca_file))
        if relay.username:
            conn.login(relay.username, relay.password or "")
        return conn
    except (smtplib.SMTPException, OSError) as exc:
        if conn is not None:
            conn.close()  # a refused STARTTLS or login leaves the plain socket open otherwise
        raise classify_smtp_error(exc, host=relay.host) from None


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
