"""Standard Webhooks signatures (https://www.standardwebhooks.com), pure functions.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}` over the exact bytes sent, HMAC-SHA256 with
each key, base64, prefixed `v1,`; several keys (secret rotation) give several space-separated signatures.
Signing happens at attempt time, so a retry an hour later carries a fresh timestamp and the same id.
Secrets are `whsec_<base64 of 24 to 64 random bytes>` (the Standard Webhooks format): `parse_webhook_secrets`
reads them, `new_secret` makes one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping

from whiskypay.errors import WebhookVerificationError

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "WebhookVerificationError",
    "new_secret",
    "parse_webhook_secrets",
    "signature",
    "signature_headers",
    "verify",
    "webhook_id",
]

#: How far a webhook-timestamp may be from the receiver's clock, in seconds (the spec's 5 minutes).
DEFAULT_TOLERANCE_S = 300

#: The prefix of a Standard Webhooks secret.
SECRET_PREFIX = "whsec_"

#: How many random bytes `new_secret` draws (the spec asks for 24 to 64).
SECRET_BYTES = 32


def parse_webhook_secrets(text: str) -> tuple[bytes, ...]:
    """Decode space-separated `whsec_<base64>` secrets into HMAC keys; the first one is the newest.

    Errors (ValueError) name the position of the bad secret, never its text.
    """
    keys = []
    for position, token in enumerate(text.split(), start=1):
        if not token.startswith(SECRET_PREFIX):
            raise ValueError(f"secret #{position} does not start with 'whsec_'; use the Standard Webhooks format")
        try:
            key = base64.b64decode(token[len(SECRET_PREFIX) :], validate=True)
        except ValueError:
            raise ValueError(f"secret #{position} is not valid base64 after 'whsec_'") from None
        if not 24 <= len(key) <= 64:
            raise ValueError(f"secret #{position} decodes to {len(key)} bytes; use 24 to 64 random bytes")
        keys.append(key)
    if not keys:
        raise ValueError("no secret given")
    return tuple(keys)


def new_secret(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """Return a fresh secret: `whsec_` + base64 of SECRET_BYTES random bytes.

    Parameters:
      random_bytes: The source of randomness (n -> n bytes).
    """
    return SECRET_PREFIX + base64.b64encode(random_bytes(SECRET_BYTES)).decode()


def webhook_id(message_id: str, event_id: str | None) -> str:
    """Return an event's webhook-id: the gateway's event_id when it gave one, else `msg_<message id>`.

    Both stay the same on every retry and on a re-drive, as the spec asks of webhook-id.
    """
    return event_id or f"msg_{message_id}"


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return one `v1,<base64>` signature of body for this id and timestamp."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_headers(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Return the three Standard Webhooks headers for one attempt.

    Parameters:
      keys: HMAC keys, one signature each (rotation).
      msg_id: The webhook-id, the same on every attempt of one event.
      timestamp: This attempt's time, in unix seconds.
      body: The exact bytes that will be sent.
    """
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(key, msg_id, timestamp, body) for key in keys),
    }


def verify(
    body: bytes, headers: Mapping[str, str], secret: str, *, now: float, tolerance_s: int = DEFAULT_TOLERANCE_S
) -> None:
    """Check a received webhook; raise `WebhookVerificationError` unless one signature matches one secret.

    Parameters:
      body: The raw request body, exactly as received (before any JSON parsing).
      headers: The request headers; names are matched case-insensitively.
      secret: The merchant's `whsec_...` secret, or several separated by spaces during a rotation.
      now: The receiver's clock, in unix seconds (`time.time()`).
      tolerance_s: The largest accepted distance between webhook-timestamp and now, in seconds.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id, raw_ts, sigs = (lowered.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not raw_ts or not sigs:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(raw_ts)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    if abs(now - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s} s away from now")
    offered = [sig.encode() for sig in sigs.split()]
    for key in parse_webhook_secrets(secret):
        expected = signature(key, msg_id, timestamp, body).encode()
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return
    raise WebhookVerificationError("no signature matches the secret")
