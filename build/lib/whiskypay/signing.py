"""Standard Webhooks signatures (https://www.standardwebhooks.com), pure functions.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}` over the exact bytes sent, HMAC-SHA256 with
each key, base64, prefixed `v1,`; several keys (secret rotation) give several space-separated signatures.
Signing happens at attempt time, so a retry an hour later carries a fresh timestamp and the same id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping

from settings import parse_webhook_secrets

#: How far a webhook-timestamp may be from the receiver's clock, in seconds (the spec's 5 minutes).
DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The webhook's headers or signature do not check out; the receiver must reject it (HTTP 400)."""


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
