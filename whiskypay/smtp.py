"""The SMTP transport: connect (and log in) to the relay, and classify what went wrong.

The rendering is `whiskypay.mail`; the per-thread connections are the SmtpClients middleware's, which sends
over the connections this module opens. Error texts carry the relay's host and the reply code, never addresses.
"""

from __future__ import annotations

import smtplib
import ssl

from whiskypay.errors import SmtpPermanentError, SmtpTemporaryError, WhiskyPayError


def open_smtp(
    *,
    host: str,
    port: int,
    tls: str,
    username: str | None,
    password: str | None,
    timeout_s: float,
    ca_file: str | None = None,
) -> smtplib.SMTP:
    """Connect (and log in) to the SMTP relay; raise `SmtpTemporaryError` with the host when it cannot.

    With TLS the relay's certificate must chain to a trusted CA and name host (a failed check is an
    `ssl.SSLCertVerificationError`, so a `SmtpTemporaryError` naming it).

    Parameters:
      tls: "off", "starttls" (upgrade a plain connection) or "ssl" (implicit TLS from the first byte).
      timeout_s: Socket timeout for the connection and every command, in seconds.
      ca_file: A PEM file of CA certificates to trust instead of the system's; None for the system's.
    """
    conn: smtplib.SMTP | None = None
    try:
        if tls == "ssl":
            context = ssl.create_default_context(cafile=ca_file)
            conn = smtplib.SMTP_SSL(host, port, timeout=timeout_s, context=context)
        else:
            conn = smtplib.SMTP(host, port, timeout=timeout_s)
            if tls == "starttls":
                conn.starttls(context=ssl.create_default_context(cafile=ca_file))
        if username:
            conn.login(username, password or "")
        return conn
    except (smtplib.SMTPException, OSError) as exc:
        if conn is not None:
            conn.close()  # a refused STARTTLS or login leaves the plain socket open otherwise
        raise classify_smtp_error(exc, host=host) from None


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
