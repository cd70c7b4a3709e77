"""WebhookSigning: Standard Webhooks signatures on every callback attempt, and a stable webhook-id per event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.common import q_name
from dramatiq.logging import get_logger

from whiskypay.errors import WorkerStartRefused
from whiskypay.queues import Queue, consumes
from whiskypay.signing import merchant_signing_keys, signature_headers, webhook_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: Which signatures a webhook carries: HMAC (`v1`), ed25519 (`v1a`) or both.
Signatures = Literal["v1", "v1a", "both"]

__all__ = ["WebhookSigning", "WorkerStartRefused"]


class WebhookSigning(Middleware):
    """Give each callback message a `webhook_id` at enqueue and sign each attempt with a fresh timestamp.

    The id is `whiskypay.signing.webhook_id`'s (the event_id, else `msg_<message id>`); it is stored in the
    message's options, so every retry (and a re-drive from the dead-letter queue) carries the same id. A callback
    with a `merchant_id` is signed with that merchant's derived keys (`whiskypay.signing.merchant_signing_keys`:
    versions N and N-1 per master key) instead of the master keys. A worker that consumes callbackQueue refuses
    to start without the keys its `signatures` need.

    Parameters:
      keys: HMAC master keys, newest first (one signature each, for rotation).
      signing_key: The `whsk_` ed25519 secret key, or None; parsed here (`cryptography` loads only if given).
      signatures: `v1` (HMAC), `v1a` (ed25519) or `both`.
      clock: Unix seconds; injected for tests.
    """

    def __init__(
        self,
        *,
        keys: tuple[bytes, ...],
        signing_key: str | None = None,
        signatures: Signatures = "v1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.keys = keys
        self.signatures = signatures
        self.clock = clock
        self.signing_key: Ed25519PrivateKey | None = None
        if signing_key is not None and signatures != "v1":
            from whiskypay.ed25519 import parse_secret_key

            self.signing_key = parse_secret_key(signing_key)

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        if not consumes(worker, Queue.CALLBACKS):
            return
        if self.signatures != "v1a" and not self.keys:
            raise WorkerStartRefused(
                "WHISKYPAY_WEBHOOK_SECRET is not set: the callback worker signs every webhook and will not start "
                "without a key. Set it to one or more space-separated whsec_<base64> secrets "
                "(`whiskypay secret` prints a new one), or sign with ed25519 only "
                "(WHISKYPAY_WEBHOOK_SIGNATURES=v1a and WHISKYPAY_WEBHOOK_SIGNING_KEY)."
            )
        if self.signatures != "v1" and self.signing_key is None:
            raise WorkerStartRefused(
                f"WHISKYPAY_WEBHOOK_SIGNATURES={self.signatures} needs WHISKYPAY_WEBHOOK_SIGNING_KEY "
                "(`whiskypay secret --ed25519` prints a key pair)."
            )

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        if q_name(message.queue_name) == Queue.CALLBACKS and "webhook_id" not in message.options:
            message.options["webhook_id"] = webhook_id(message.message_id, message.kwargs.get("event_id"))

    def headers(
        self, msg_id: str, body: bytes, *, merchant_id: str | None = None, key_version: int = 1
    ) -> dict[str, str]:
        """Return this attempt's webhook-id (msg_id), webhook-timestamp and webhook-signature headers for body.

        Parameters:
          merchant_id: Sign with this merchant's derived keys; None signs with the master keys.
          key_version: The merchant's key generation (N; N-1 is signed too while N > 1).
        """
        keys = () if self.signatures == "v1a" else merchant_signing_keys(self.keys, merchant_id, key_version)
        return signature_headers(keys, msg_id, int(self.clock()), body, signing_key=self.signing_key)
