"""The "bare" side of every comparison: stock Dramatiq, no WhiskyPay code at all.

A plain `dramatiq.brokers.redis.RedisBroker` with Dramatiq's default middleware, and two actors that do only the
work itself: `bare_callback` POSTs the same JSON body with one requests.Session per thread (no validation, no
signing, no network guard), and `bare_email` sends the same two emails opening a new smtplib connection for each.

Workers run it with `python -m dramatiq bench.bare:broker`; the benchmark process imports it to send. Both read
the environment at import: BENCH_BARE_REDIS_URL (required), BENCH_SMTP_HOST and BENCH_SMTP_PORT.
"""

from __future__ import annotations

import json
import os
import smtplib
import threading
from email.message import EmailMessage

import dramatiq
import requests
from dramatiq.brokers.redis import RedisBroker

#: The broker namespace of the bare side (its own private Redis server, too).
NAMESPACE = "benchbare"

#: The sender of the bare emails.
MAIL_FROM = "payments@bench.test"

broker = RedisBroker(url=os.environ["BENCH_BARE_REDIS_URL"], namespace=NAMESPACE)  # type: ignore[no-untyped-call]

_local = threading.local()


def _session() -> requests.Session:
    """Return the calling thread's requests.Session, creating it on first use."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


@dramatiq.actor(broker=broker, queue_name="callbackQueue", actor_name="bare_callback")
def bare_callback(
    callback_url: str, email: str, plan: str, price: float, timestamp: str | None = None, event_id: str | None = None
) -> None:
    """POST the seed's webhook body to callback_url on this thread's session; raise on a non-2xx answer.

    event_id is accepted (the gateway sends one) and ignored: stock Dramatiq has no idempotency.
    """
    payload = {"email": email, "plan": plan, "price": price, "status": "success", "timestamp": timestamp}
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    response = _session().post(
        callback_url, data=body, headers={"Content-Type": "application/json"}, timeout=(5, 15), allow_redirects=False
    )
    response.close()
    response.raise_for_status()


def _email(to: str, *, subject: str, plan: str, saas_name: str) -> EmailMessage:
    """Build one multipart/alternative email of about the size of ours (plain text, then HTML)."""
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = f"{saas_name} via WhiskyPay <{MAIL_FROM}>"
    message["To"] = to
    text = f"Thank you for your payment.\n\nPlan: {plan}\nSold by: {saas_name}\n\nKeep this email as your receipt.\n"
    message.set_content(text * 2)
    html = f"<html><body><h1>{saas_name}</h1><p>Thank you for your payment.</p><p>Plan: <b>{plan}</b></p></body></html>"
    message.add_alternative(html * 2, subtype="html")
    return message


@dramatiq.actor(broker=broker, queue_name="emailQueue", actor_name="bare_email")
def bare_email(buyer_email: str, merchant_email: str, plan: str, saas_name: str) -> None:
    """Send the buyer's and the merchant's email, each over a new SMTP connection."""
    host = os.environ.get("BENCH_SMTP_HOST", "127.0.0.1")
    port = int(os.environ.get("BENCH_SMTP_PORT", "25"))
    for to, subject in ((buyer_email, f"Your {saas_name} receipt: {plan}"), (merchant_email, f"New sale: {plan}")):
        with smtplib.SMTP(host, port, timeout=30) as smtp:
            smtp.send_message(_email(to, subject=subject, plan=plan, saas_name=saas_name))
