"""send_email: the buyer's receipt and the merchant's sale notice for one payment (queue emailQueue)."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from middleware.smtp_client import SmtpClients
from whiskypay import keys
from whiskypay.actor import WhiskyPayActor
from whiskypay.broker import middleware_of
from whiskypay.errors import PermanentError
from whiskypay.mail import Role, compose
from whiskypay.queues import Queue
from whiskypay.redaction import mask_address

logger = dramatiq.get_logger(__name__)

#: How long we remember that one email of a message went out, in seconds: longer than any retry schedule
#: plus the dead-letter retention, so a re-driven message does not send it again either.
SENT_MARKER_TTL_S = 8 * 24 * 3600


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
    """
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
        if client and client.exists(marker):
            logger.info("email message=%s merchant=%s role=%s already sent; skipped", message_id, merchant, role)
            continue
        email = compose(
            role,
            to=to,
            mail_from=smtp.mail_from,
            message_id=f"<{message_id}.{role}@{domain}>",
            plan=plan,
            saas_name=saas_name,
            logo_url=logo_url,
        )
        smtp.send(email)
        if client:
            client.set(marker, 1, ex=SENT_MARKER_TTL_S)
        logger.info("email message=%s merchant=%s role=%s to=%s sent", message_id, merchant, role, mask_address(to))
