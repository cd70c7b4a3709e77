"""Tier 1: our signatures against the reference `standardwebhooks` library, both directions, and verify() on bad input.

The reference verifier reads its own clock, so webhooks here are stamped relative to time.time(), never at the
exact 5-minute edge (the edges against an injected clock are in tests/test_signing.py).
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from whiskypay.signing import WebhookVerificationError, parse_webhook_secrets, signature_headers, verify

KEY = bytes(range(32))
OLD_KEY = bytes(range(200, 224))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OLD_SECRET = "whsec_" + base64.b64encode(OLD_KEY).decode()
MSG_ID = "evt_2f1c9a"

BODIES = {
    "ascii-json": b'{"email":"buyer@example.com","plan":"Pro","price":10}',
    "unicode": json.dumps({"name": "Zoë 山田 😀", "note": "שלום مرحبا"}, ensure_ascii=False).encode(),
    "empty": b"",
    "1-MiB": json.dumps({"blob": "x" * (1 << 20)}).encode(),
}


def reference_headers(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers a sender using the reference library would send (one signature per secret)."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)  # sign() wants UTC (facts.md)
    signatures = " ".join(Webhook(secret).sign(msg_id, when, body.decode()) for secret in secrets)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}


def reference_accepts(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except Exception:  # the reference raises several kinds; any of them is a refusal
        return False
    return True


def ours_accepts(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        verify(body, headers, secret, now=time.time())
    except WebhookVerificationError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# both directions, over bodies, rotation, tampering and the 5-minute window
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", list(BODIES.values()), ids=list(BODIES))
def test_our_signature_verifies_with_the_reference_and_theirs_with_ours(body: bytes) -> None:
    now = int(time.time())
    # Given a webhook signed by us, and the same one signed by the reference library
    ours = signature_headers([KEY], MSG_ID, now, body)
    theirs = reference_headers([SECRET], MSG_ID, now, body)
    # Then each verifier accepts the other's, and the signatures are the same string
    assert reference_accepts(SECRET, body, ours)
    assert ours_accepts(SECRET, body, theirs)
    assert ours == theirs


@pytest.mark.parametrize("receiver_secret", [SECRET, OLD_SECRET, f"{SECRET} {OLD_SECRET}", f"{OLD_SECRET} {SECRET}"])
def test_a_rotation_verifies_in_both_directions_with_either_secret(receiver_secret: str) -> None:
    now = int(time.time())
    body = BODIES["unicode"]
    # Given a webhook signed with the new and the old key, by us and by the reference library
    ours = signature_headers([KEY, OLD_KEY], MSG_ID, now, body)
    theirs = reference_headers([SECRET, OLD_SECRET], MSG_ID, now, body)
    # Then our verifier, holding one or both secrets, accepts both
    assert ours_accepts(receiver_secret, body, ours)
    assert ours_accepts(receiver_secret, body, theirs)
    # And the reference (one secret per verifier) accepts ours with each secret
    for secret in receiver_secret.split():
        assert reference_accepts(secret, body, ours)


def _tamper(field: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    headers = dict(headers)
    if field == "body":
        return body + b" ", headers
    if field == "webhook-id":
        headers["webhook-id"] = MSG_ID + "x"
    elif field == "webhook-timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) + 1)
    else:
        version, mac = headers["webhook-signature"].split(",", 1)
        flipped = "A" if mac[0] != "A" else "B"
        headers["webhook-signature"] = f"{version},{flipped}{mac[1:]}"
    return body, headers


@pytest.mark.parametrize("field", ["body", "webhook-id", "webhook-timestamp", "webhook-signature"])
@pytest.mark.parametrize("signer", ["ours", "reference"])
def test_a_tampered_webhook_is_refused_by_both_verifiers(signer: str, field: str) -> None:
    now = int(time.time())
    body = BODIES["ascii-json"]
    signed = signature_headers([KEY], MSG_ID, now, body) if signer == "ours" else reference_headers(
        [SECRET], MSG_ID, now, body
    )
    # When one signed part changes in transit, then neither verifier accepts it
    tampered_body, tampered = _tamper(field, body, signed)
    assert not ours_accepts(SECRET, tampered_body, tampered)
    assert not reference_accepts(SECRET, tampered_body, tampered)


@pytest.mark.parametrize(("offset_s", "accepted"), [(-240, True), (240, True), (-360, False), (360, False),
                                                     (-86_400, False)])
@pytest.mark.parametrize("signer", ["ours", "reference"])
def test_both_verifiers_apply_the_same_five_minute_window(signer: str, offset_s: int, accepted: bool) -> None:
    stamp = int(time.time()) + offset_s
    body = BODIES["ascii-json"]
    signed = signature_headers([KEY], MSG_ID, stamp, body) if signer == "ours" else reference_headers(
        [SECRET], MSG_ID, stamp, body
    )
    assert ours_accepts(SECRET, body, signed) is accepted
    assert reference_accepts(SECRET, body, signed) is accepted


# --------------------------------------------------------------------------------------------------------------
# secrets: what the reference accepts, we accept when verifying; what it refuses raises our error
# --------------------------------------------------------------------------------------------------------------

_B64_32 = base64.b64encode(bytes(range(32))).decode()  # 44 characters, one "=" of padding
VERIFY_SECRETS = {
    "padded": (bytes(range(32)), "whsec_" + _B64_32),
    "unpadded": (bytes(range(32)), "whsec_" + _B64_32.rstrip("=")),
    "16-byte": (bytes(range(16)), "whsec_" + base64.b64encode(bytes(range(16))).decode()),
    "16-byte-unpadded": (bytes(range(16)), "whsec_" + base64.b64encode(bytes(range(16))).decode().rstrip("=")),
    "no-prefix": (bytes(range(32)), _B64_32),
    "1-byte": (b"\x07", "whsec_" + base64.b64encode(b"\x07").decode()),
    "100-byte": (bytes(range(100)), "whsec_" + base64.b64encode(bytes(range(100))).decode()),
}


@pytest.mark.parametrize(("key", "secret"), list(VERIFY_SECRETS.values()), ids=list(VERIFY_SECRETS))
def test_every_secret_the_reference_accepts_verifies_with_ours_too(key: bytes, secret: str) -> None:
    now = int(time.time())
    body = BODIES["unicode"]
    # Given a webhook signed with that key, by us and by the reference library (from the secret text)
    ours = signature_headers([key], MSG_ID, now, body)
    theirs = reference_headers([secret], MSG_ID, now, body)
    # Then both verifiers, configured with the secret text, accept both
    assert reference_accepts(secret, body, ours) and reference_accepts(secret, body, theirs)
    assert ours_accepts(secret, body, ours) and ours_accepts(secret, body, theirs)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [("", "no secret"), ("   ", "no secret"), ("whsec_", "#1 is empty"), ("whsec_a", "#1 is not base64"),
     ("whsec_ünïcødé", "#1 is not base64"), (f"{SECRET} whsec_abcde", "#2 is not base64")],
    ids=["empty", "blank", "prefix-only", "one-char", "non-ascii", "second-of-two"],
)
def test_a_malformed_secret_raises_our_verification_error_naming_it_without_its_text(secret: str, problem: str) -> None:
    headers = signature_headers([KEY], MSG_ID, int(time.time()), b"{}")
    # When verified with it, then WebhookVerificationError (not ValueError) says which secret, not what it is
    with pytest.raises(WebhookVerificationError, match=problem) as raised:
        verify(b"{}", headers, secret, now=time.time())
    for token in secret.split():
        if token != SECRET:
            assert token not in str(raised.value) or token == "whsec_"
    # And the reference refuses the same secrets (it raises its own errors)
    if secret.split() and secret.split()[-1] != SECRET:
        with pytest.raises(Exception):  # noqa: B017 - the reference raises ValueError, binascii.Error...
            Webhook(secret.split()[-1])


def test_the_signing_side_accepts_unpadded_secrets_and_refuses_short_ones_with_the_reason() -> None:
    # Given an unpadded 32-byte secret, when parsed for signing, then it is the same key as padded
    assert parse_webhook_secrets("whsec_" + _B64_32.rstrip("=")) == (bytes(range(32)),)
    # Given a 16-byte secret (which verifiers accept), when parsed for signing, then it is refused, saying why
    with pytest.raises(ValueError, match="decodes to 16 bytes; the Standard Webhooks spec asks for 24 to 64"):
        parse_webhook_secrets("whsec_" + base64.b64encode(bytes(16)).decode())


# --------------------------------------------------------------------------------------------------------------
# any header value: WebhookVerificationError, never another exception (issue 9 item 14)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timestamp",
    ["9" * 309, "1" * 5_000, "١٧٩٠٠٠٠٠٠٠", "１７９０００００００", "1.79e9", "+1790000000", " 1790000000",
     "1_790_000_000", "-1", "nan", "inf", ""],
    ids=["309-digits", "5000-digits", "arabic-indic-digits", "fullwidth-digits", "float", "plus", "space",
         "underscores", "negative", "nan", "inf", "empty"],
)
def test_a_timestamp_that_is_not_ascii_integer_seconds_is_a_verification_error(timestamp: str) -> None:
    headers = signature_headers([KEY], MSG_ID, int(time.time()), b"{}")
    headers["webhook-timestamp"] = timestamp
    with pytest.raises(WebhookVerificationError):
        verify(b"{}", headers, SECRET, now=time.time())


@pytest.mark.parametrize(
    "change",
    [{"webhook-id": "\udc80surrogate"}, {"webhook-signature": "v1"}, {"webhook-signature": "v1,,,"},
     {"webhook-signature": "v1,ü"}, {"webhook-signature": "v1,@@@@"}, {"webhook-signature": ","},
     {"webhook-id": None}, {"webhook-timestamp": b"1790000000"}, {"webhook-signature": 42}],
    ids=["surrogate-id", "no-comma", "commas", "non-ascii-mac", "not-base64", "bare-comma", "none", "bytes", "int"],
)
def test_odd_header_values_are_verification_errors(change: dict[str, Any]) -> None:
    headers: dict[str, Any] = {**signature_headers([KEY], MSG_ID, int(time.time()), b"{}"), **change}
    with pytest.raises(WebhookVerificationError):
        verify(b"{}", headers, SECRET, now=time.time())


_header_value = st.one_of(st.text(max_size=60), st.from_regex(r"[0-9]{1,400}", fullmatch=True),
                          st.from_regex(r"(v1,[A-Za-z0-9+/=]{0,50} ?){0,3}", fullmatch=True))


@settings(max_examples=300, deadline=None)
@given(
    msg_id=_header_value,
    timestamp=_header_value,
    sigs=_header_value,
    secret=st.one_of(
        st.text(max_size=40), st.just(SECRET), st.from_regex(r"whsec_[A-Za-z0-9+/=]{0,12}", fullmatch=True)
    ),
    body=st.one_of(st.binary(max_size=64), st.text(max_size=32)),
)
def test_verify_raises_only_its_own_error_for_any_input(
    msg_id: str, timestamp: str, sigs: str, secret: str, body: bytes | str
) -> None:
    headers = {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": sigs}
    try:
        verify(body, headers, secret, now=1_790_000_000)
    except WebhookVerificationError:
        pass


@pytest.mark.parametrize(
    ("secret", "signature_value"),
    [("whpk_!!!!", "v1a,AAAA"), ("whpk_" + base64.b64encode(bytes(5)).decode(), "v1a,AAAA"),
     ("whpk_" + base64.b64encode(bytes(range(32))).decode(), "v1a,ü"),
     ("whpk_" + base64.b64encode(bytes(range(32))).decode(), "v1a," + base64.b64encode(bytes(3)).decode())],
    ids=["not-base64-key", "short-key", "non-ascii-v1a", "short-v1a"],
)
def test_ed25519_keys_and_v1a_signatures_that_are_malformed_are_verification_errors(
    secret: str, signature_value: str
) -> None:
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(int(time.time())), "webhook-signature": signature_value}
    with pytest.raises(WebhookVerificationError):
        verify(b"{}", headers, secret, now=time.time())
