"""send_email: the buyer's receipt and the merchant's sale notice for one payment (queue emailQueue)."""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from middleware.smtp_client import SmtpClients
from whiskypay import keys
from whiskypay.actor import WhiskyPayActor
from whiskypay.broker import middleware_of
from whiskypay.errors import PermanentError
from whiskypay.ledger import note_attempt
from whiskypay.queues import Queue
from whiskypay.redaction import mask_address
from whiskypay.redis_errors import call_through_transient

if TYPE_CHECKING:
    from whiskypay.mail import Role

logger = dramatiq.get_logger(__name__)

#: How long we remember that one email of a message went out, in seconds: longer than any retry schedule
#: plus the dead-letter retention, so a re-driven message does not send it again either.
SENT_MARKER_TTL_S = 8 * 24 * 3600

#: The marker's value from just before the SMTP exchange until its outcome is known: an attempt that finds it
#: (the previous one was killed or timed out mid-exchange) does not send again. Never twice beats maybe twice.
SENDING = "sending"
#: The marker's value once the relay accepted the email (any other existing value counts as sent, too).
SENT = "sent"


@dramatiq.actor(actor_class=WhiskyPayActor, actor_name="send_email", queue_name=Queue.EMAIL, throws=(PermanentError,))
def send_email(
    *,
    buyer_email: str,
    merchant_email: str,
    plan: str,
    saas_name: str,
    logo_url: str | None = None,
    merchant_id: str | None = None,
    event_id: str | None = None,
) -> None:
    """Send the buyer's and the merchant's email; a retry skips the one that already went out.

    merchant_id only labels the logs; event_id makes a second send() of the same payment enqueue nothing
    (`IdempotentEnqueue`, scoped by merchant).

    Each email's marker is set (SET NX, "sending") before its SMTP exchange and to "sent" after the 250, both
    waiting out transient Redis errors (OOM, READONLY, a restart): a Redis failure after the relay accepted an
    email can delay the job but never sends that email again. The marker is removed only when the relay refused
    the email or the connection failed, so that the next attempt sends it.

    Each SMTP exchange ends within WHISKYPAY_SMTP_TIMEOUT_S (`whiskypay.smtp.smtp_exchange`). An exchange cut off
    at that deadline (`SmtpTimedOut`) counts as a failed connection: the marker is removed and the next attempt
    sends the email. Cut off after the data but before the relay's reply, it is the same ambiguous case as a
    connection dropped there (the relay may have accepted the email): the recipient may get a second copy, as
    before; only a kill or a time limit (not an Exception) keeps "sending" and so sends nothing more.
    """
    # The email package's policy and header registry (and the templates) load at the first email: a callback-only
    # worker never needs them.
    from whiskypay.mail import compose

    broker = dramatiq.get_broker()
    smtp = middleware_of(broker, SmtpClients)
    message = CurrentMessage.get_current_message()
    message_id = message.message_id if message else "direct-call"
    assert smtp.mail_from is not None
    domain = smtp.mail_from.rsplit("@", 1)[1]
    redis_broker = broker if isinstance(broker, RedisBroker) and message else None
    merchant = merchant_id or "-"
    recipients: tuple[tuple[Role, str], ...] = (("buyer", buyer_email), ("merchant", merchant_email))
    for role, to in recipients:
        marker = keys.email_sent(redis_broker.namespace, message_id, role) if redis_broker else ""
        client = redis_broker.client if redis_broker else None
        what = f"the {role} email marker of message {message_id}"
        email = compose(
            role,
            to=to,
            mail_from=smtp.mail_from,
            message_id=f"<{message_id}.{role}@{domain}>",
            plan=plan,
            saas_name=saas_name,
            logo_url=logo_url,
        )
        # Intent first: once this marker exists the email is never sent again, whatever fails after the SMTP 250.
        if client and not call_through_transient(
            partial(client.set, marker, SENDING, nx=True, ex=SENT_MARKER_TTL_S), what=what, logger=logger
        ):
            if keys.text(client.get(marker) or b"") == SENDING:
                logger.warning(
                    "email message=%s merchant=%s role=%s to=%s not sent again: an earlier attempt stopped during "
                    "its SMTP exchange, so it may or may not have gone out",
                    message_id, merchant, role, mask_address(to),
                )
            else:
                logger.info("email message=%s merchant=%s role=%s already sent; skipped", message_id, merchant, role)
            continue
        started = time.perf_counter()
        try:
            smtp.send(email)
        except Exception as exc:
            note_attempt(role, "failed", code=getattr(exc, "tags", {}).get("smtp_code"), error=exc,
                         duration_ms=(time.perf_counter() - started) * 1000)
            # The relay refused it or the connection failed or was cut off at its deadline (SmtpTemporaryError,
            # SmtpTimedOut, SmtpPermanentError): taken as not accepted, so the next attempt may send it (after the
            # data that is a guess, as for a connection dropped there; see the docstring). A time limit or a kill
            # (not an Exception) keeps the marker: the exchange may have reached the 250.
            if client:
                call_through_transient(partial(client.delete, marker), what=what, logger=logger)
            raise
        note_attempt(role, "delivered", code=250, duration_ms=(time.perf_counter() - started) * 1000)
        if client:
            call_through_transient(partial(client.set, marker, SENT, ex=SENT_MARKER_TTL_S), what=what, logger=logger)
        logger.info("email message=%s merchant=%s role=%s to=%s sent", message_id, merchant, role, mask_address(to))
