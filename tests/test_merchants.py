"""Tiers 1 and 2 of merchants as tenants (issue 10): derived keys, ed25519 `v1a`, the contract's fields, scoped keys.

The end-to-end proof through a real worker is tests/test_e2e_merchants.py; everything else is here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceVerificationError

from actors.callbacks import webhook_body
from middleware.signing import WebhookSigning, WorkerStartRefused
from middleware.validation import PayloadValidation
from settings import ConfigurationError, load_settings
from tests.helpers import NAMESPACE
from whiskypay import ed25519, keys
from whiskypay.dead_letters import encode_message
from whiskypay.keys import event_reservation, length_prefixed
from whiskypay.schemas import CallbackArgs, EmailArgs, InvalidPayload, describe, validate_args
from whiskypay.signing import (
    MERCHANT_KEY_LABEL,
    WebhookVerificationError,
    merchant_key,
    merchant_secret,
    merchant_signing_keys,
    signature_headers,
    verify,
)

README = Path(__file__).resolve().parent.parent / "README.md"
MASTER_KEY = bytes(range(32))
MASTER = "whsec_" + base64.b64encode(MASTER_KEY).decode()
OLD_MASTER_KEY = bytes(range(100, 132))
OLD_MASTER = "whsec_" + base64.b64encode(OLD_MASTER_KEY).decode()
BODY = b'{"email":"buyer@example.com","plan":"Pro","price":10,"merchant_id":"m_42"}'
NOW = 1_790_000_000
CALLBACK: dict[str, Any] = {"callback_url": "https://m.example/h", "email": "b@example.com", "plan": "p", "price": 1}
EMAIL: dict[str, Any] = {
    "buyer_email": "b@example.com", "merchant_email": "o@example.com", "plan": "p", "saas_name": "S"
}


def whsec(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


def signed_now(keys: tuple[bytes, ...], **kwargs: Any) -> dict[str, str]:
    return signature_headers(keys, "msg_1", int(time.time()), BODY, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# tier 1: the derivation
# --------------------------------------------------------------------------------------------------------------------


def readme_vectors() -> list[tuple[str, str, int, str]]:
    """Return the README's test vectors: (master secret, merchant_id, key_version, derived secret)."""
    text = README.read_text()
    section = text[text.index("### Test vector") :]
    master = re.search(r"master secret\s+`?(whsec_[^`\s]+)", section)
    assert master, "the README's test vector gives no master secret"
    rows = re.findall(r"^\s*(\S+)\s+(\d+)\s+(whsec_\S+)\s*$", section.split("```")[1], re.MULTILINE)
    return [(master.group(1), merchant, int(version), secret) for merchant, version, secret in rows]


def test_the_readme_test_vectors_are_what_merchant_secret_computes() -> None:
    # Given the README's test vectors (the derivation a gateway in another language reimplements)
    vectors = readme_vectors()
    assert len(vectors) >= 3
    for master, merchant_id, key_version, expected in vectors:
        # Then our function gives each derived secret
        assert merchant_secret(master, merchant_id, key_version) == expected
        # And so does the derivation as the README spells it out, written here with hmac alone
        raw = merchant_id.encode()
        data = b"whiskypay/merchant-webhook-key/v1\x00" + len(raw).to_bytes(2, "big") + raw
        data += key_version.to_bytes(4, "big")
        master_key = base64.b64decode(master.removeprefix("whsec_"))
        assert whsec(hmac.new(master_key, data, hashlib.sha256).digest()) == expected


def test_the_derivation_input_is_unambiguous_and_labelled() -> None:
    # Given ids that a naive concatenation would confuse
    # Then their keys differ, and differ from the master key and between versions
    keys = {
        merchant_key(MASTER_KEY, "a:b", 1),
        merchant_key(MASTER_KEY, "a", 1),
        merchant_key(MASTER_KEY, "a:b:1", 1),
        merchant_key(MASTER_KEY, "ab", 1),
        merchant_key(MASTER_KEY, "m_42", 1),
        merchant_key(MASTER_KEY, "m_42", 2),
        merchant_key(MASTER_KEY, "m_42", 256),
        MASTER_KEY,
    }
    assert len(keys) == 8
    # And the label is part of the input: a plain HMAC of the id is not the key
    assert merchant_key(MASTER_KEY, "m_42") != hmac.new(MASTER_KEY, b"m_42", hashlib.sha256).digest()
    assert MERCHANT_KEY_LABEL.startswith(b"whiskypay/")


@pytest.mark.parametrize(("merchant_id", "key_version"), [("", 1), ("m 42", 1), ("x" * 65, 1), ("m", 0), ("m", True)])
def test_the_derivation_refuses_what_the_contract_refuses(merchant_id: str, key_version: int) -> None:
    with pytest.raises(ValueError, match=r"merchant_id|key_version"):
        merchant_key(MASTER_KEY, merchant_id, key_version)


def test_a_merchants_webhook_verifies_with_its_secret_only() -> None:
    # Given a webhook signed for merchant m_42, version 1
    headers = signed_now(merchant_signing_keys((MASTER_KEY,), "m_42", 1))
    # Then the reference library accepts it with m_42's derived secret
    Webhook(merchant_secret(MASTER, "m_42")).verify(BODY, headers)
    verify(BODY, headers, merchant_secret(MASTER, "m_42"), now=time.time())
    # And refuses it with the master secret and with another merchant's secret
    for wrong in (MASTER, merchant_secret(MASTER, "m_43"), merchant_secret(MASTER, "m_42", 2)):
        with pytest.raises(ReferenceVerificationError):
            Webhook(wrong).verify(BODY, headers)


def test_a_rotated_merchant_is_signed_with_versions_n_and_n_minus_1_for_every_master_key() -> None:
    # Given a master rotation in progress and merchant m_42 at version 3
    keys = merchant_signing_keys((MASTER_KEY, OLD_MASTER_KEY), "m_42", 3)
    # Then four keys, newest master first, version N before N-1
    assert keys == tuple(merchant_key(m, "m_42", v) for m in (MASTER_KEY, OLD_MASTER_KEY) for v in (3, 2))
    headers = signed_now(keys)
    assert len(headers["webhook-signature"].split()) == 4
    # And the merchant verifies with its version 3 or 2 secret, from either master, but not version 1
    for master in (MASTER, OLD_MASTER):
        for version in (3, 2):
            Webhook(merchant_secret(master, "m_42", version)).verify(BODY, headers)
    with pytest.raises(ReferenceVerificationError):
        Webhook(merchant_secret(MASTER, "m_42", 1)).verify(BODY, headers)


def test_merchant_secret_derives_from_the_newest_master_and_without_merchant_the_master_keys_sign() -> None:
    assert merchant_secret(f"{MASTER} {OLD_MASTER}", "m_42") == merchant_secret(MASTER, "m_42")
    assert merchant_signing_keys((MASTER_KEY, OLD_MASTER_KEY), None, 1) == (MASTER_KEY, OLD_MASTER_KEY)
    assert merchant_signing_keys((MASTER_KEY,), "m_42", 1) == (merchant_key(MASTER_KEY, "m_42", 1),)


# --------------------------------------------------------------------------------------------------------------------
# tier 1: ed25519
# --------------------------------------------------------------------------------------------------------------------


def test_a_new_key_pair_is_whsk_seed_and_whpk_raw_public_key() -> None:
    secret, public = ed25519.new_key_pair()
    assert secret.startswith("whsk_") and public.startswith("whpk_")
    assert len(base64.b64decode(secret[5:])) == 32 and len(base64.b64decode(public[5:])) == 32
    assert ed25519.encode_public_key(ed25519.parse_secret_key(secret)) == public
    # The libsodium form (seed followed by the public key) reads as the same key
    sodium = "whsk_" + base64.b64encode(base64.b64decode(secret[5:]) + base64.b64decode(public[5:])).decode()
    assert ed25519.encode_public_key(ed25519.parse_secret_key(sodium)) == public


def test_v1a_is_an_ed25519_signature_that_cryptography_verifies_with_the_public_key() -> None:
    # Given headers signed now with HMAC and ed25519
    secret, public = ed25519.new_key_pair()
    now = int(time.time())
    headers = signature_headers((MASTER_KEY,), "msg_1", now, BODY, signing_key=ed25519.parse_secret_key(secret))
    v1, v1a = headers["webhook-signature"].split()
    assert v1.startswith("v1,") and v1a.startswith("v1a,")
    # Then cryptography itself verifies the v1a signature of "{id}.{timestamp}.{body}" with the raw public key
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public.removeprefix("whpk_")))
    raw = base64.b64decode(v1a.removeprefix("v1a,"))
    key.verify(raw, f"msg_1.{now}.".encode() + BODY)
    with pytest.raises(InvalidSignature):
        key.verify(raw, f"msg_1.{now}.".encode() + BODY + b" ")
    # And our verify() accepts the public key, and refuses another key pair's
    verify(BODY, headers, public, now=now)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, ed25519.new_key_pair()[1], now=now)
    # And the reference library (HMAC only) still verifies the v1 signature next to it
    Webhook(MASTER).verify(BODY, headers)


def test_verify_takes_public_keys_and_secrets_together_and_ignores_a_v1a_for_an_hmac_secret() -> None:
    secret, public = ed25519.new_key_pair()
    only_v1a = signature_headers((), "msg_1", NOW, BODY, signing_key=ed25519.parse_secret_key(secret))
    verify(BODY, only_v1a, f"{MASTER} {public}", now=NOW)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, only_v1a, MASTER, now=NOW)
    with pytest.raises(WebhookVerificationError, match="public key"):
        verify(BODY, only_v1a, "whpk_bm90LWEta2V5", now=NOW)


@pytest.mark.parametrize(
    "text", ["whsec_AAAA", "whsk_not base64", "whsk_" + base64.b64encode(b"x" * 31).decode(),
             "whsk_" + base64.b64encode(bytes(64)).decode()],
)  # fmt: skip
def test_a_bad_signing_key_is_refused_without_quoting_it(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        ed25519.parse_secret_key(text)
    assert text[5:] not in str(caught.value)


# --------------------------------------------------------------------------------------------------------------------
# tier 1: the contract and settings
# --------------------------------------------------------------------------------------------------------------------

BAD_MERCHANT_FIELDS = [
    (CallbackArgs, CALLBACK, {"merchant_id": ""}, "merchant_id: must be 1-64"),
    (CallbackArgs, CALLBACK, {"merchant_id": "m/42"}, "merchant_id: must be 1-64"),
    (CallbackArgs, CALLBACK, {"merchant_id": "m" * 65}, "merchant_id: must be 1-64"),
    (CallbackArgs, CALLBACK, {"merchant_id": 42}, "merchant_id"),
    (CallbackArgs, CALLBACK, {"merchant_id": "m", "key_version": 0}, "key_version: must be an integer from 1"),
    (CallbackArgs, CALLBACK, {"merchant_id": "m", "key_version": "2"}, "key_version"),
    (CallbackArgs, CALLBACK, {"merchant_id": "m", "key_version": True}, "key_version"),
    (CallbackArgs, CALLBACK, {"key_version": 2}, "key_version: needs merchant_id"),
    (EmailArgs, EMAIL, {"merchant_id": "m\n"}, "merchant_id: must be 1-64"),
    (EmailArgs, EMAIL, {"event_id": "pay 1"}, "event_id: must be 1-128"),
    (EmailArgs, EMAIL, {"key_version": 1}, "key_version: is not an argument"),
]


@pytest.mark.parametrize(("model", "good", "override", "expected"), BAD_MERCHANT_FIELDS)
def test_bad_merchant_fields_are_named(
    model: Any, good: dict[str, Any], override: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_args(model, {**good, **override}, https_only=True)
    assert expected in describe(caught.value)


def test_good_merchant_fields_pass() -> None:
    validate_args(CallbackArgs, {**CALLBACK, "merchant_id": "acme.eu:shop-1_A", "key_version": 7}, https_only=True)
    validate_args(EmailArgs, {**EMAIL, "merchant_id": "m" * 64, "event_id": "pay_123"}, https_only=True)


def test_the_body_carries_merchant_id_last_only_when_given() -> None:
    seed = webhook_body(email="b@example.com", plan="p", price=1, timestamp="t")
    tagged = webhook_body(email="b@example.com", plan="p", price=1, timestamp="t", merchant_id="m_42")
    assert b"merchant_id" not in seed
    assert tagged == seed[:-1] + b',"merchant_id":"m_42"}'


def test_the_event_reservation_key_is_scoped_by_merchant_and_unambiguous() -> None:
    key = event_reservation
    assert key("ns", "send_callback", "a:b", "c") != key("ns", "send_callback", "a", "b:c")
    assert key("ns", "send_callback", "m_1", "pay_1") != key("ns", "send_callback", "m_2", "pay_1")
    assert key("ns", "send_callback", None, "pay_1") != key("ns", "send_email", None, "pay_1")
    assert key("ns", "send_callback", "m_1", "pay_1") == "ns:whiskypay.events:13.send_callback:3.m_1:5.pay_1"
    assert length_prefixed("a:b", "c") != length_prefixed("a", "b:c")


def test_signature_settings_need_their_keys() -> None:
    secret, _ = ed25519.new_key_pair()
    assert load_settings(webhook_signing_key=secret).signature_kinds() == "both"
    assert load_settings(webhook_signing_key=secret, webhook_signatures="v1").signature_kinds() == "v1"
    assert load_settings().signature_kinds() == "v1"
    with pytest.raises(ConfigurationError, match="WHISKYPAY_WEBHOOK_SIGNATURES: v1a needs WHISKYPAY_WEBHOOK_SIGNING"):
        load_settings(webhook_signatures="v1a")
    with pytest.raises(ConfigurationError, match="WHISKYPAY_WEBHOOK_SIGNING_KEY") as caught:
        load_settings(webhook_signing_key="whsk_" + secret[6:])
    assert secret[6:] not in str(caught.value)


# --------------------------------------------------------------------------------------------------------------------
# tier 2: the middleware on a StubBroker
# --------------------------------------------------------------------------------------------------------------------


def test_webhook_signing_signs_with_the_merchants_keys_and_v1a_as_configured() -> None:
    secret, public = ed25519.new_key_pair()
    for kinds, expected in (("v1", ["v1", "v1"]), ("v1a", ["v1a"]), ("both", ["v1", "v1", "v1a"])):
        signing = WebhookSigning(keys=(MASTER_KEY,), signing_key=secret, signatures=kinds, clock=lambda: NOW)  # type: ignore[arg-type]
        headers = signing.headers("evt_1", BODY, merchant_id="m_42", key_version=2)
        assert [sig.split(",")[0] for sig in headers["webhook-signature"].split()] == expected
        if "v1" in expected:
            verify(BODY, headers, merchant_secret(MASTER, "m_42", 1), now=NOW)
        if "v1a" in expected:
            verify(BODY, headers, public, now=NOW)


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [({"keys": ()}, "WHISKYPAY_WEBHOOK_SECRET is not set"),
     ({"keys": (MASTER_KEY,), "signatures": "both"}, "needs WHISKYPAY_WEBHOOK_SIGNING_KEY")],
)  # fmt: skip
def test_a_callback_worker_refuses_to_start_without_the_keys_it_signs_with(kwargs: dict[str, Any], fix: str) -> None:
    broker = StubBroker(middleware=[WebhookSigning(**kwargs)])
    try:
        with pytest.raises(WorkerStartRefused, match=fix):
            Worker(broker, worker_timeout=100).start()
    finally:
        broker.close()


def test_an_ed25519_only_worker_starts_without_an_hmac_secret() -> None:
    secret, _ = ed25519.new_key_pair()
    broker = StubBroker(middleware=[WebhookSigning(keys=(), signing_key=secret, signatures="v1a")])
    worker = Worker(broker, worker_timeout=100)
    try:
        worker.start()
    finally:
        worker.stop()
        broker.close()


@pytest.fixture
def requiring_broker() -> Iterator[StubBroker]:
    """A StubBroker whose PayloadValidation requires merchant_id on send_callback (WHISKYPAY_REQUIRE_MERCHANT_ID)."""
    validation = PayloadValidation(
        schemas={"send_callback": CallbackArgs}, https_only=True, required_at_send={"send_callback": ("merchant_id",)}
    )
    broker = StubBroker(middleware=[validation])
    dramatiq.actor(lambda **kw: None, broker=broker, actor_name="send_callback", queue_name="callbackQueue")
    yield broker
    broker.close()


def test_a_required_merchant_id_is_refused_at_send_when_missing(requiring_broker: StubBroker) -> None:
    actor = requiring_broker.get_actor("send_callback")
    with pytest.raises(InvalidPayload, match="merchant_id: is required"):
        actor.send(**CALLBACK)
    assert requiring_broker.queues["callbackQueue"].qsize() == 0
    actor.send(**CALLBACK, merchant_id="m_42")
    assert requiring_broker.queues["callbackQueue"].qsize() == 1


# --------------------------------------------------------------------------------------------------------------------
# tier 3: the commands against the test Redis (no worker)
# --------------------------------------------------------------------------------------------------------------------


#: A time of the dead letters the tests bury, in unix milliseconds.
T0 = 1_780_000_000_000


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from whiskypay.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def bury(client: Any, queue: str, actor: str, kwargs: dict[str, Any], *, at_ms: int) -> str:
    """Put one dead letter into queue's dead-letter set, as Dramatiq stores it; return its message id."""
    message_id = f"dead-{at_ms}"
    message = {"queue_name": queue, "actor_name": actor, "args": [], "kwargs": kwargs, "message_id": message_id,
               "message_timestamp": at_ms, "options": {"retries": 2, "traceback": "HttpStatusError: HTTP 503 from h"}}
    client.zadd(keys.dead_letters(NAMESPACE, queue), {message_id: at_ms})
    client.hset(keys.dead_letter_messages(NAMESPACE, queue), message_id, encode_message(message))
    return message_id


def test_failed_shows_the_merchant_and_failed_and_retry_take_one_merchant(redis_client, capsys) -> None:
    # Given dead letters of two merchants (one of them on both queues) and one without a merchant
    a1 = bury(redis_client, "callbackQueue", "send_callback", {**CALLBACK, "merchant_id": "m_a"}, at_ms=T0 + 1000)
    b1 = bury(redis_client, "callbackQueue", "send_callback", {**CALLBACK, "merchant_id": "m_b"}, at_ms=T0 + 2000)
    a2 = bury(redis_client, "emailQueue", "send_email", {**EMAIL, "merchant_id": "m_a"}, at_ms=T0 + 3000)
    none = bury(redis_client, "callbackQueue", "send_callback", CALLBACK, at_ms=T0 + 4000)
    # When failed lists them all, then one merchant's
    _, everything, _ = cli(capsys, "failed")
    _, only_a, _ = cli(capsys, "failed", "--merchant", "m_a")
    _, as_json, _ = cli(capsys, "failed", "--merchant", "m_a", "--json")
    # Then a MERCHANT column names each one's merchant ("-" without), and --merchant keeps only m_a's
    header, *rows = everything.splitlines()
    assert "MERCHANT" in header.split()
    merchant_of = {row.split()[0]: row.split()[7] for row in rows}
    assert merchant_of == {a1: "m_a", b1: "m_b", a2: "m_a", none: "-"}
    assert [row.split()[0] for row in only_a.splitlines()[1:]] == [a2, a1]
    document = json.loads(as_json)
    assert document["total"] == 2 and {letter["merchant_id"] for letter in document["dead_letters"]} == {"m_a"}
    # When m_a's callback dead letters are re-driven (dry run first)
    code, dry, _ = cli(capsys, "retry", "--queue", "callbackQueue", "--merchant", "m_a", "--dry-run")
    assert code == 0 and "Would re-drive 1 dead letter(s) of merchant m_a onto callbackQueue" in dry
    code, out, _ = cli(capsys, "retry", "--queue", "callbackQueue", "--merchant", "m_a")
    # Then only a1 moved back (into callbackQueue's replay lane); m_b's, the merchant-less one and m_a's email
    # stay dead
    assert code == 0 and a1 in out and b1 not in out
    assert redis_client.zcard(keys.replay_lane(NAMESPACE, "callbackQueue")) == 1
    still_dead = set(redis_client.hkeys(keys.dead_letter_messages(NAMESPACE, "callbackQueue")))
    assert still_dead == {b1.encode(), none.encode()}
    assert redis_client.zcard(keys.dead_letters(NAMESPACE, "emailQueue")) == 1
    # And a bad merchant id is refused by the parser, --merchant excludes --all
    for argv in (["failed", "--merchant", "m a"], ["retry", "--queue", "callbackQueue", "--all", "--merchant", "m"]):
        with pytest.raises(SystemExit):
            cli(capsys, *argv)


def test_status_of_one_merchant_counts_its_messages_and_outcomes(redis_client, capsys) -> None:
    from dramatiq import Message
    from dramatiq.broker import MessageProxy

    import actors
    from middleware.outcome_counters import OutcomeCounters

    # Given m_a's two waiting callbacks, m_b's one, one dead letter of m_a and counted outcomes
    for merchant_id in ("m_a", "m_a", "m_b"):
        actors.send_callback.send(**CALLBACK, merchant_id=merchant_id)
    bury(redis_client, "callbackQueue", "send_callback", {**CALLBACK, "merchant_id": "m_a"}, at_ms=T0)
    counters = OutcomeCounters(clock=lambda: 1_780_000_000, flush_interval_s=0)
    for merchant_id in ("m_a", "m_a", "m_b", "started_at"):
        done = Message(queue_name="callbackQueue", actor_name="send_callback", args=(),
                       kwargs={**CALLBACK, "merchant_id": merchant_id}, options={})
        counters.after_process_message(actors.broker, MessageProxy(done))
    # When status runs for m_a
    code, out, _ = cli(capsys, "status", "--merchant", "m_a", "--queue", "callbackQueue", "--json")
    # Then it counts m_a's messages and outcomes only; the queue's own counters count everyone
    assert code == 0
    document = json.loads(out)
    assert document["merchant_id"] == "m_a"
    counts = document["queues"]["callbackQueue"]
    assert (counts["waiting"], counts["dead_lettered"], counts["completed"], counts["failed"]) == (2, 1, 2, 0)
    stats = redis_client.hgetall(keys.outcome_counters(NAMESPACE, "callbackQueue"))
    assert stats[b"completed"] == b"4" and stats[b"started_at"] == b"1780000000"  # "started_at" as a merchant: no harm
    code, text, _ = cli(capsys, "status", "--merchant", "m_b")
    assert code == 0 and text.startswith("Merchant m_b:") and "callbackQueue" in text


def test_secret_prints_a_merchants_secret_and_ed25519_keys(monkeypatch, capsys) -> None:
    import settings

    # Given a deployment master secret and an ed25519 signing key
    signing_key, public_key = ed25519.new_key_pair()
    monkeypatch.setattr(settings, "get_settings", lambda: load_settings(webhook_secret=f"{MASTER} {OLD_MASTER}",
                                                                         webhook_signing_key=signing_key))
    # Then --merchant prints exactly one line, the derived secret from the newest master
    assert cli(capsys, "secret", "--merchant", "m_42") == (0, merchant_secret(MASTER, "m_42") + "\n", "")
    _, out, _ = cli(capsys, "secret", "--merchant", "m_42", "--key-version", "2")
    assert out == merchant_secret(MASTER, "m_42", 2) + "\n"
    # And --public prints the configured key's whpk_, --ed25519 a new pair, plain `secret` a new whsec_
    assert cli(capsys, "secret", "--public") == (0, public_key + "\n", "")
    code, pair, _ = cli(capsys, "secret", "--ed25519")
    secret, public = pair.splitlines()
    assert code == 0 and ed25519.encode_public_key(ed25519.parse_secret_key(secret)) == public
    assert cli(capsys, "secret")[1].startswith("whsec_")
    # And mistakes are one line on stderr with status 2, never printing a key
    code, out, err = cli(capsys, "secret", "--merchant", "m 42")
    assert (code, out) == (2, "") and "merchant_id must be 1-64" in err
    assert cli(capsys, "secret", "--key-version", "2")[0] == 2
    with pytest.raises(SystemExit):
        cli(capsys, "secret", "--merchant", "m", "--key-version", "0")
    monkeypatch.setattr(settings, "get_settings", lambda: load_settings(webhook_secret=None))
    code, out, err = cli(capsys, "secret", "--merchant", "m_42")
    assert (code, out) == (2, "") and "WHISKYPAY_WEBHOOK_SECRET is not set" in err
    assert "WHISKYPAY_WEBHOOK_SIGNING_KEY is not set" in cli(capsys, "secret", "--public")[2]


def test_a_dead_lettered_merchants_message_is_tagged_with_its_merchant_in_sentry(sentry) -> None:
    from dramatiq import Message
    from dramatiq.broker import MessageProxy

    from middleware.sentry import SentryReporting
    from whiskypay.errors import HttpStatusError

    # Given sentry-sdk reporting to the fake Sentry, and a callback of m_42 that failed for good
    with sentry.reporting_here():
        reporting = SentryReporting(dsn=sentry.dsn, environment="test", release="t")
        message = MessageProxy(Message(queue_name="callbackQueue", actor_name="send_callback", args=(),
                                       kwargs={**CALLBACK, "merchant_id": "m_42"}, options={"retries": 4}))
        message._exception = HttpStatusError("HTTP 503 from m.example", host="m.example", http_status=503)  # type: ignore[attr-defined]
        # When it is nacked into the dead-letter queue
        reporting.before_nack(None, message)  # type: ignore[arg-type]
    # Then its one event carries the merchant as a tag
    [event] = sentry.items("event")
    assert event["tags"]["merchant_id"] == "m_42" and event["tags"]["callback_host"] == "m.example"


def test_the_broker_factory_wires_the_merchant_settings() -> None:
    from middleware.signing import WebhookSigning
    from whiskypay.broker import build_broker, middleware_of

    # Given settings that require merchant ids and sign with ed25519 only
    signing_key, _ = ed25519.new_key_pair()
    settings = load_settings(require_merchant_id=True, webhook_signing_key=signing_key, webhook_signatures="v1a")
    broker = build_broker(settings)
    try:
        # Then send() requires merchant_id on callbacks, and webhooks carry only the v1a signature
        assert middleware_of(broker, PayloadValidation).required_at_send == {"send_callback": ("merchant_id",)}
        signing = middleware_of(broker, WebhookSigning)
        assert signing.signatures == "v1a" and signing.signing_key is not None
        assert signing.headers("evt_1", BODY, merchant_id="m_42")["webhook-signature"].startswith("v1a,")
    finally:
        broker.close()
