"""Tier 1: Standard Webhooks signatures, checked against the reference `standardwebhooks` implementation."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceVerificationError

from whiskypay.signing import (
    DEFAULT_TOLERANCE_S,
    WebhookVerificationError,
    signature,
    signature_headers,
    verify,
)

KEY_NEW = bytes(range(32))
KEY_OLD = bytes(range(100, 124))
SECRET_NEW = "whsec_" + base64.b64encode(KEY_NEW).decode()
SECRET_OLD = "whsec_" + base64.b64encode(KEY_OLD).decode()
BODY = b'{"email":"buyer@example.com","plan":"Pro","price":10}'
MSG_ID = "msg_2f1c9a"
NOW = 1_790_000_000


def test_signature_is_v1_prefixed_base64_of_a_32_byte_hmac() -> None:
    # Given a key, an id, a timestamp and a body
    # When one signature is computed
    sig = signature(KEY_NEW, MSG_ID, NOW, BODY)
    # Then it is "v1," followed by the base64 of a SHA-256 MAC
    version, encoded = sig.split(",", 1)
    assert version == "v1"
    assert len(base64.b64decode(encoded)) == 32


def test_signature_headers_carry_the_id_the_timestamp_and_one_signature_per_key() -> None:
    # Given two keys (a rotation)
    # When the headers are built
    headers = signature_headers([KEY_NEW, KEY_OLD], MSG_ID, NOW, BODY)
    # Then the id and timestamp are copied and both signatures are present, newest first
    assert headers["webhook-id"] == MSG_ID
    assert headers["webhook-timestamp"] == str(NOW)
    assert headers["webhook-signature"].split(" ") == [
        signature(KEY_NEW, MSG_ID, NOW, BODY),
        signature(KEY_OLD, MSG_ID, NOW, BODY),
    ]


def test_our_headers_are_accepted_by_the_reference_standardwebhooks_verifier() -> None:
    # Given headers signed now with one key
    headers = signature_headers([KEY_NEW], MSG_ID, int(time.time()), BODY)
    # When the reference library verifies them
    payload = Webhook(SECRET_NEW).verify(BODY, headers)
    # Then the body is accepted and parsed
    assert payload == {"email": "buyer@example.com", "plan": "Pro", "price": 10}


@pytest.mark.parametrize("secret", [SECRET_NEW, SECRET_OLD], ids=["new-secret", "old-secret"])
def test_during_a_rotation_each_secret_alone_verifies_the_doubly_signed_webhook(secret: str) -> None:
    # Given headers signed with the new and the old key
    headers = signature_headers([KEY_NEW, KEY_OLD], MSG_ID, int(time.time()), BODY)
    # When a receiver that knows only one of the secrets verifies, with the reference library and with ours
    Webhook(secret).verify(BODY, headers)
    verify(BODY, headers, secret, now=time.time())
    # Then both accept (no exception)


def test_our_verify_accepts_what_the_reference_library_signs() -> None:
    # Given headers produced by standardwebhooks' sign() (it wants a UTC datetime)
    when = datetime.fromtimestamp(NOW, tz=UTC)
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(NOW),
        "webhook-signature": Webhook(SECRET_NEW).sign(MSG_ID, when, BODY.decode()),
    }
    # When our verify() checks them
    verify(BODY, headers, SECRET_NEW, now=NOW)
    # Then it accepts (no exception), and the signatures are byte-identical
    assert headers["webhook-signature"] == signature(KEY_NEW, MSG_ID, NOW, BODY)


def test_verify_accepts_a_rotation_secret_list_where_only_the_second_secret_matches() -> None:
    # Given headers signed only with the old key
    headers = signature_headers([KEY_OLD], MSG_ID, NOW, BODY)
    # When the receiver configured "new old" verifies
    verify(BODY, headers, f"{SECRET_NEW} {SECRET_OLD}", now=NOW)
    # Then it accepts (no exception)


def test_verify_matches_header_names_case_insensitively() -> None:
    # Given headers as a framework may present them, capitalised
    headers = {name.title(): value for name, value in signature_headers([KEY_NEW], MSG_ID, NOW, BODY).items()}
    # When verified, then accepted
    verify(BODY, headers, SECRET_NEW, now=NOW)


@pytest.mark.parametrize(
    "offset_s",
    [-DEFAULT_TOLERANCE_S, -DEFAULT_TOLERANCE_S + 1, 0, DEFAULT_TOLERANCE_S - 1, DEFAULT_TOLERANCE_S],
    ids=["-5min", "-5min+1s", "now", "+5min-1s", "+5min"],
)
def test_verify_accepts_timestamps_within_five_minutes_either_way(offset_s: int) -> None:
    # Given a webhook stamped offset_s away from the receiver's clock
    headers = signature_headers([KEY_NEW], MSG_ID, NOW + offset_s, BODY)
    # When verified at NOW, then accepted
    verify(BODY, headers, SECRET_NEW, now=NOW)


@pytest.mark.parametrize("offset_s", [-DEFAULT_TOLERANCE_S - 1, DEFAULT_TOLERANCE_S + 1, -86_400, 86_400])
def test_verify_rejects_timestamps_more_than_five_minutes_away_in_either_direction(offset_s: int) -> None:
    # Given a correctly signed webhook stamped too far from the receiver's clock
    headers = signature_headers([KEY_NEW], MSG_ID, NOW + offset_s, BODY)
    # When verified at NOW, then it is rejected
    with pytest.raises(WebhookVerificationError, match="away from now"):
        verify(BODY, headers, SECRET_NEW, now=NOW)


def test_reference_library_also_rejects_our_headers_when_stale() -> None:
    # Given our headers stamped ten minutes ago
    headers = signature_headers([KEY_NEW], MSG_ID, int(time.time()) - 600, BODY)
    # When the reference library verifies, then it refuses them as too old
    with pytest.raises(ReferenceVerificationError):
        Webhook(SECRET_NEW).verify(BODY, headers)


@pytest.mark.parametrize(
    ("field", "tampered"),
    [
        ("body", b'{"email":"buyer@example.com","plan":"Pro","price":1000}'),
        ("webhook-id", "msg_other"),
        ("webhook-timestamp", str(NOW + 1)),
    ],
)
def test_verify_rejects_a_tampered_body_id_or_timestamp(field: str, tampered: bytes | str) -> None:
    # Given a genuine webhook
    body = BODY
    headers = signature_headers([KEY_NEW], MSG_ID, NOW, BODY)
    # When one signed part is changed in transit
    if field == "body":
        assert isinstance(tampered, bytes)
        body = tampered
    else:
        assert isinstance(tampered, str)
        headers[field] = tampered
    # Then no signature matches
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(body, headers, SECRET_NEW, now=NOW)


def test_verify_rejects_a_webhook_signed_with_another_secret() -> None:
    # Given a webhook signed with the old key only
    headers = signature_headers([KEY_OLD], MSG_ID, NOW, BODY)
    # When a receiver that only knows the new secret verifies, then it is rejected
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(BODY, headers, SECRET_NEW, now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_a_webhook_missing_one_header(missing: str) -> None:
    # Given genuine headers with one removed
    headers = signature_headers([KEY_NEW], MSG_ID, NOW, BODY)
    del headers[missing]
    # When verified, then it is rejected as missing a header
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(BODY, headers, SECRET_NEW, now=NOW)


@pytest.mark.parametrize("raw_timestamp", ["soon", "1.5e9", ""])
def test_verify_rejects_a_non_integer_timestamp(raw_timestamp: str) -> None:
    # Given headers whose timestamp is not an integer
    headers = signature_headers([KEY_NEW], MSG_ID, NOW, BODY)
    headers["webhook-timestamp"] = raw_timestamp
    # When verified, then it is rejected
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, SECRET_NEW, now=NOW)


def test_verify_rejects_a_signature_with_another_version_prefix() -> None:
    # Given a correct MAC presented under a version we do not know
    genuine = signature(KEY_NEW, MSG_ID, NOW, BODY)
    headers = signature_headers([KEY_NEW], MSG_ID, NOW, BODY)
    headers["webhook-signature"] = genuine.replace("v1,", "v1a,", 1)
    # When verified, then it is rejected
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, SECRET_NEW, now=NOW)
