"""Payment emails: render the buyer's receipt and the merchant's sale notice, and speak SMTP."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr
from pathlib import Path
from typing import Literal

import jinja2

from whiskypay.errors import SmtpPermanentError, SmtpTemporaryError, WhiskyPayError

#: Where the email templates live (one .txt and one .html per role).
TEMPLATES = Path(__file__).resolve().parent.parent / "actors" / "templates"

Role = Literal["buyer", "merchant"]

_html = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
)
_text = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False, undefined=jinja2.StrictUndefined
)

_SUBJECTS: dict[Role, str] = {
    "buyer": "Your {saas_name} receipt: {plan}",
    "merchant": "New sale on {saas_name}: {plan}",
}


def compose(
    role: Role,
    *,
    to: str,
    mail_from: str,
    message_id: str,
    plan: str,
    saas_name: str,
    logo_url: str | None,
) -> EmailMessage:
    """Build one multipart/alternative email (plain text, then HTML) for role.

    Headers go through the email library's SMTP policy, which refuses CR or LF in a header value, so no
    field can add a header.

    Parameters:
      message_id: The Message-ID, the same on every try of this email.
    """
    context = {"plan": plan, "saas_name": saas_name, "logo_url": logo_url, "role": role}
    email = EmailMessage(policy=SMTP)
    email["Subject"] = _SUBJECTS[role].format(plan=plan, saas_name=saas_name)
    email["From"] = formataddr((f"{saas_name} via WhiskyPay", mail_from))
    email["To"] = to
    email["Message-ID"] = message_id
    email.set_content(_text.get_template(f"{role}.txt").render(context))
    email.add_alternative(_html.get_template(f"{role}.html").render(context), subtype="html")
    return email


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
