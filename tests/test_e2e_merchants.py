"""Merchants as tenants end to end (issue 10): one real worker process signs per merchant, with v1a next to v1.

One worker start covers every item; the cases that need no worker are in tests/test_merchants.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceVerificationError

from tests.helpers import TEST_SECRET, all_queue_keys, queued, wait_until
from whiskypay import ed25519
from whiskypay.devstack import HttpReceiver, Received
from whiskypay.schemas import InvalidPayload
from whiskypay.signing import merchant_secret

pytestmark = pytest.mark.e2e

BUYER = "buyer@example.com"


def callback(receiver: HttpReceiver, path: str, **kwargs: Any) -> dict[str, Any]:
    return dict(callback_url=receiver.url(path), email=BUYER, plan="pro", price=19.99, **kwargs)


def email(**kwargs: Any) -> dict[str, Any]:
    return dict(buyer_email=BUYER, merchant_email="owner@merchant.example", plan="pro", saas_name="Acme", **kwargs)


def verifies(secret: str, hook: Received) -> bool:
    try:
        Webhook(secret).verify(hook.body, hook.headers)
    except ReferenceVerificationError:
        return False
    return True


def v1a_verifies(public_key: str, hook: Received) -> bool:
    """Check the v1a signature with `cryptography` directly (not through our verifier)."""
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key.removeprefix("whpk_")))
    content = f"{hook.headers['webhook-id']}.{hook.headers['webhook-timestamp']}.".encode() + hook.body
    [v1a] = [sig for sig in hook.headers["webhook-signature"].split() if sig.startswith("v1a,")]
    key.verify(base64.b64decode(v1a.removeprefix("v1a,")), content)  # raises InvalidSignature
    return True


def test_each_merchant_gets_webhooks_only_its_own_secret_verifies_and_equal_event_ids_are_both_delivered(
    redis_client, receiver, smtp_sink, start_workers, env
):
    from actors import send_callback, send_email

    # Given a bad merchant_id: it is refused at send(), and nothing reaches Redis
    with pytest.raises(InvalidPayload, match="send_callback: merchant_id: must be 1-64 characters"):
        send_callback.send(**callback(receiver, "/x", merchant_id="m_42; DROP"))
    with pytest.raises(InvalidPayload, match="send_email: merchant_id: must be 1-64 characters"):
        send_email.send(**email(merchant_id="m" * 65))
    assert all_queue_keys(redis_client) == []

    # Given merchant m_a at key version 1 and m_b rotating to version 2, and a single-merchant-mode callback,
    # all three with the same event id, and each sent twice
    for _ in range(2):
        send_callback.send(**callback(receiver, "/a", merchant_id="m_a", event_id="pay_1"))
        send_callback.send(**callback(receiver, "/b", merchant_id="m_b", key_version=2, event_id="pay_1"))
        send_callback.send(**callback(receiver, "/none", event_id="pay_1"))
        send_email.send(**email(merchant_id="m_a", event_id="pay_1"))
        send_email.send(**email(merchant_id="m_b", event_id="pay_1"))
    # Then each merchant's first send was enqueued and its repeat was not
    assert queued(redis_client, "callbackQueue") == 3 and queued(redis_client, "emailQueue") == 2

    # When a worker signs with the master secret and an ed25519 key (v1 and v1a)
    signing_key, public_key = ed25519.new_key_pair()
    worker = start_workers(env={**env, "WHISKYPAY_WEBHOOK_SIGNING_KEY": signing_key})
    hooks = {hook.path: hook for hook in receiver.wait_for(3)}
    smtp_sink.wait_for(4)

    # Then m_a's webhook verifies (reference library) with m_a's derived secret, not the master's or m_b's
    a, b, single = hooks["/a"], hooks["/b"], hooks["/none"]
    assert verifies(merchant_secret(TEST_SECRET, "m_a"), a)
    assert not verifies(TEST_SECRET, a)
    assert not verifies(merchant_secret(TEST_SECRET, "m_b"), a)
    assert not verifies(merchant_secret(TEST_SECRET, "m_b", 2), a)
    # And m_b's carries both key versions: its old (1) and new (2) secrets verify, m_a's and the master do not
    assert verifies(merchant_secret(TEST_SECRET, "m_b", 2), b)
    assert verifies(merchant_secret(TEST_SECRET, "m_b", 1), b)
    assert not verifies(merchant_secret(TEST_SECRET, "m_a"), b)
    assert not verifies(TEST_SECRET, b)
    assert [sig.split(",")[0] for sig in b.headers["webhook-signature"].split()] == ["v1", "v1", "v1a"]
    # And without a merchant the master secret signs, as in the single-merchant mode
    assert verifies(TEST_SECRET, single) and not verifies(merchant_secret(TEST_SECRET, "m_a"), single)
    # And every webhook's v1a verifies with the public key, checked with cryptography itself
    assert all(v1a_verifies(public_key, hook) for hook in (a, b, single))
    # And the bodies name their merchant (after the seed's fields); the ids are the shared event id
    assert [json.loads(hook.body).get("merchant_id") for hook in (a, b, single)] == ["m_a", "m_b", None]
    assert {hook.headers["webhook-id"] for hook in (a, b, single)} == {"pay_1"}
    # And both merchants' emails for the same event id went out, two each
    assert len(smtp_sink.mails()) == 4 and len(receiver.requests()) == 3
    # And the worker's log lines name the merchant (they reach the log within LogBatching's interval)
    wait_until(lambda: "merchant=m_a" in worker.log() and "merchant=m_b" in worker.log(), timeout_s=5,
               what="both merchants' log lines")
    log = worker.log()
    assert "merchant=m_a" in log and "merchant=m_b" in log
