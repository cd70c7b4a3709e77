"""Payment emails: render the buyer's receipt and the merchant's sale notice (sending them is `whiskypay.smtp`)."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr
from pathlib import Path
from typing import Literal

import jinja2

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
