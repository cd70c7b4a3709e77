"""send_callback: deliver the signed payment webhook to the merchant (queue callbackQueue)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import dramatiq
from dramatiq.middleware import CurrentMessage

from middleware.http_client import HttpClients
from middleware.signing import WebhookSigning
from whiskypay.actor import WhiskyPayActor
from whiskypay.broker import middleware_of
from whiskypay.errors import Deferred, PermanentError, WhiskyPayError
from whiskypay.ledger import note_attempt
from whiskypay.queues import Queue
from whiskypay.redaction import scrub_text
from whiskypay.signing import webhook_id as default_webhook_id

logger = dramatiq.get_logger(__name__)


def webhook_body(
    *, email: str, plan: str, price: int | float, timestamp: str | None, merchant_id: str | None = None
) -> bytes:
    """Return the webhook body: the seed's email, plan, price, status "success", timestamp (compact JSON).

    With a merchant_id it comes last, so the receiver can check the webhook is meant for it.
    """
    payload: dict[str, object] = {
        "email": email, "plan": plan, "price": price, "status": "success", "timestamp": timestamp
    }
    if merchant_id is not None:
        payload["merchant_id"] = merchant_id
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


@dramatiq.actor(
    actor_class=WhiskyPayActor, actor_name="send_callback", queue_name=Queue.CALLBACKS, throws=(PermanentError,)
)
def send_callback(
    *,
    callback_url: str,
    email: str,
    plan: str,
    price: int | float,
    timestamp: str | None = None,
    event_id: str | None = None,
    merchant_id: str | None = None,
    key_version: int = 1,
) -> None:
    """POST the signed payment webhook to callback_url once; raise a classified error when it fails.

    With merchant_id it is signed with that merchant's derived keys (generations key_version and the one before).
    """
    broker = dramatiq.get_broker()
    message = CurrentMessage.get_current_message()
    message_id = message.message_id if message else "direct-call"
    webhook_id = (message.options.get("webhook_id") if message else None) or default_webhook_id(message_id, event_id)
    attempt = (message.options.get("retries", 0) if message else 0) + 1
    body = webhook_body(email=email, plan=plan, price=price, timestamp=timestamp, merchant_id=merchant_id)
    headers = middleware_of(broker, WebhookSigning).headers(
        webhook_id, body, merchant_id=merchant_id, key_version=key_version
    )
    merchant = merchant_id or "-"
    host = urlsplit(callback_url).hostname
    try:
        result = middleware_of(broker, HttpClients).post(callback_url, body, headers)
    except Deferred as exc:
        logger.info("webhook message=%s host=%s attempt=%d deferred: %s", message_id, host, attempt, exc)
        raise
    except Exception as exc:
        status = getattr(exc, "tags", {}).get("http_status", "-")
        duration_ms = exc.duration_ms if isinstance(exc, WhiskyPayError) else None
        logger.warning(
            "webhook message=%s merchant=%s host=%s status=%s duration_ms=%s attempt=%d failed: %s",
            message_id, merchant, host, status, "-" if duration_ms is None else f"{duration_ms:.0f}", attempt,
            scrub_text(str(exc), addresses=(email,)),
        )
        note_attempt("webhook", "failed", code=status if isinstance(status, int) else None, duration_ms=duration_ms,
                     error=exc, response=getattr(exc, "response_head", None) or None)
        raise
    note_attempt("webhook", "delivered", code=result.status, duration_ms=result.duration_ms,
                 response=result.response_head)
    logger.info(
        "webhook message=%s merchant=%s host=%s status=%d duration_ms=%.0f attempt=%d delivered",
        message_id, merchant, host, result.status, result.duration_ms, attempt,
    )
