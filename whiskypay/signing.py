"""Standard Webhooks signatures (https://www.standardwebhooks.com), pure functions.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}` over the exact bytes sent, HMAC-SHA256 with
each key, base64, prefixed `v1,`; several keys (secret rotation) give several space-separated signatures.
Signing happens at attempt time, so a retry an hour later carries a fresh timestamp and the same id.

Secrets, signing side (WHISKYPAY_WEBHOOK_SECRET, `parse_webhook_secrets`): `whsec_<base64>` of 24 to 64 random
bytes, the spec's range; padding optional; a malformed one stops the worker at start with a ValueError naming
its position. `new_secret` makes one.

Verifying side (`verify`, for merchants and our tests): whatever the reference `standardwebhooks` library
accepts, decoded the same way (the `whsec_` prefix optional, padding optional, characters outside base64
skipped, any non-empty length: 16-byte secrets verify); each secret is parsed by `parse_verifier` into a
function that checks offered signatures. Every bad input, a malformed secret included, raises
`WebhookVerificationError` and nothing else. One place is stricter than the reference: webhook-timestamp must
be ASCII digits (the spec's integer seconds; the reference also takes "1.7e9" or Arabic-Indic digits).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from whiskypay.errors import WebhookVerificationError

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "MAX_KEY_VERSION",
    "MERCHANT_ID",
    "MERCHANT_KEY_LABEL",
    "Verifier",
    "WebhookVerificationError",
    "merchant_key",
    "merchant_secret",
    "merchant_signing_keys",
    "new_secret",
    "parse_verifier",
    "parse_webhook_secrets",
    "signature",
    "signature_headers",
    "signed_content",
    "verify",
    "webhook_id",
]

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: How far a webhook-timestamp may be from the receiver's clock, in seconds (the spec's 5 minutes).
DEFAULT_TOLERANCE_S = 300

#: The prefix of a Standard Webhooks secret.
SECRET_PREFIX = "whsec_"

#: The prefix of a Standard Webhooks ed25519 public key (whiskypay.ed25519.PUBLIC_KEY_PREFIX).
PUBLIC_KEY_PREFIX = "whpk_"

#: How many random bytes `new_secret` draws (the spec asks for 24 to 64).
SECRET_BYTES = 32


def parse_webhook_secrets(text: str) -> tuple[bytes, ...]:
    """Decode space-separated `whsec_<base64>` secrets into HMAC keys, for signing; the first one is the newest.

    Each must start with `whsec_`, be base64 (padding optional) and decode to 24 to 64 bytes. Errors
    (ValueError) name the position of the bad secret, never its text.
    """
    keys = []
    for position, token in enumerate(text.split(), start=1):
        if not token.startswith(SECRET_PREFIX):
            raise ValueError(f"secret #{position} does not start with 'whsec_'; use the Standard Webhooks format")
        encoded = token[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:
            raise ValueError(f"secret #{position} is not valid base64 after 'whsec_'") from None
        if not 24 <= len(key) <= 64:
            raise ValueError(
                f"secret #{position} decodes to {len(key)} bytes; the Standard Webhooks spec asks for 24 to 64 "
                "random bytes (`whiskypay secret` prints a new one)"
            )
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


def signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    """Return the bytes a signature covers: `{webhook-id}.{webhook-timestamp}.{body}`."""
    return f"{msg_id}.{timestamp}.".encode() + body


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return one `v1,<base64>` signature of body for this id and timestamp."""
    mac = hmac.new(key, signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_headers(
    keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes, *, signing_key: Ed25519PrivateKey | None = None
) -> dict[str, str]:
    """Return the three Standard Webhooks headers for one attempt.

    Parameters:
      keys: HMAC keys, one `v1` signature each (rotation; a merchant's keys from `merchant_signing_keys`).
      msg_id: The webhook-id, the same on every attempt of one event.
      timestamp: This attempt's time, in unix seconds.
      body: The exact bytes that will be sent.
      signing_key: An ed25519 key (`whiskypay.ed25519.parse_secret_key`): adds one `v1a` signature, last.
    """
    signatures = [signature(key, msg_id, timestamp, body) for key in keys]
    if signing_key is not None:
        from whiskypay import ed25519

        signatures.append(ed25519.sign(signing_key, msg_id, timestamp, body))
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


#: A parsed verification key: (signed content, offered signatures) -> does one of them match?
Verifier = Callable[[bytes, Sequence[str]], bool]

#: webhook-timestamp as the spec has it: integer unix seconds, ASCII digits only (20 is already absurd).
_TIMESTAMP = re.compile(r"[0-9]{1,20}")


def parse_verifier(token: str, position: int = 1) -> Verifier:
    """Parse one secret into a Verifier; raise `WebhookVerificationError` (naming position, never the text).

    A `whsec_` secret (the prefix optional) is decoded as the reference library decodes it: base64 with the
    padding optional and characters outside the alphabet skipped, any non-empty length. Its verifier accepts
    a `v1,<base64 HMAC-SHA256>` signature. A `whpk_` ed25519 public key's verifier accepts a `v1a` signature.
    Other signatures (another version, undecodable) never match. A new key kind is one more branch here.
    """
    if token.startswith(PUBLIC_KEY_PREFIX):
        return _ed25519_verifier(token, position)
    encoded = token[len(SECRET_PREFIX) :] if token.startswith(SECRET_PREFIX) else token
    try:
        key = base64.b64decode(encoded + "==")  # the reference's decoding (extra padding is ignored)
    except ValueError:
        raise WebhookVerificationError(f"secret #{position} is not base64 (after an optional 'whsec_')") from None
    if not key:
        raise WebhookVerificationError(f"secret #{position} is empty")

    def matches(content: bytes, offered: Sequence[str]) -> bool:
        expected = hmac.new(key, content, hashlib.sha256).digest()
        return any(hmac.compare_digest(expected, mac) for mac in _macs(offered, "v1"))

    return matches


def _ed25519_verifier(token: str, position: int) -> Verifier:
    """Parse a `whpk_` public key into a Verifier of `v1a` signatures (`cryptography` is loaded only here)."""
    from whiskypay import ed25519

    try:
        public_key = ed25519.parse_public_key(token)
    except ValueError as exc:  # its text names the problem, never the key
        raise WebhookVerificationError(f"secret #{position}: {exc}") from None

    def matches(content: bytes, offered: Sequence[str]) -> bool:
        return ed25519.matches(public_key, content, offered)

    return matches


def _macs(offered: Sequence[str], version: str) -> Iterator[bytes]:
    """Yield the decoded MACs of the offered `version,<base64>` signatures; malformed ones are skipped."""
    for item in offered:
        found, _, encoded = item.partition(",")
        if found != version or not encoded.isascii():
            continue
        try:
            yield base64.b64decode(encoded + "==")
        except ValueError:
            continue


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    *,
    now: float,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> None:
    """Check a received webhook; raise `WebhookVerificationError` unless one signature matches one secret.

    Any bad input (a missing or malformed header, a stale timestamp, a malformed secret) raises
    `WebhookVerificationError` and nothing else; the error names the problem, never a secret.

    Parameters:
      body: The raw request body, exactly as received (before any JSON parsing); text is taken as UTF-8.
      headers: The request headers; names are matched case-insensitively.
      secret: The merchant's `whsec_...` secret, or several separated by spaces during a rotation (any secret the
        reference library accepts); `whpk_...` ed25519 public keys (`v1a` signatures) may be given among them.
      now: The receiver's clock, in unix seconds (`time.time()`).
      tolerance_s: The largest accepted distance between webhook-timestamp and now, in seconds.
    """
    if not isinstance(secret, str) or not secret.split():
        raise WebhookVerificationError("no secret given")
    verifiers = [parse_verifier(token, position) for position, token in enumerate(secret.split(), start=1)]
    lowered = {name.lower(): value for name, value in headers.items() if isinstance(name, str)}
    values = [lowered.get(name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature")]
    if not all(isinstance(value, str) and value for value in values):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    msg_id, raw_ts, sigs = cast("list[str]", values)
    if not _TIMESTAMP.fullmatch(raw_ts):
        raise WebhookVerificationError("webhook-timestamp is not an integer (unix seconds in ASCII digits)")
    timestamp = int(raw_ts)  # signed as the integer, as the reference does ("0017..." signs "17...")
    if abs(now - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s} s away from now")
    try:
        content = signed_content(msg_id, timestamp, body.encode() if isinstance(body, str) else body)
    except (UnicodeEncodeError, TypeError):
        raise WebhookVerificationError("webhook-id or body is not encodable text") from None
    offered = sigs.split()
    if any(matches(content, offered) for matches in verifiers):
        return
    raise WebhookVerificationError("no signature matches the secret")


# --------------------------------------------------------------------------------------------------------------------
# One key per merchant, derived from the master secret (README, "Merchants")
# --------------------------------------------------------------------------------------------------------------------

#: The domain-separation label of the merchant key derivation. Changing it changes every merchant's key.
MERCHANT_KEY_LABEL = b"whiskypay/merchant-webhook-key/v1"

#: What a merchant_id may be: 1 to 64 characters of A-Z a-z 0-9 _ . : -
MERCHANT_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")

#: The largest key_version (it is encoded in 4 bytes).
MAX_KEY_VERSION = 2**32 - 1


def merchant_key(master_key: bytes, merchant_id: str, key_version: int = 1) -> bytes:
    """Return merchant_id's HMAC key of generation key_version, derived from one master key (32 bytes).

    `HMAC-SHA256(master_key, LABEL || 0x00 || len(merchant_id) as 2 bytes big-endian || merchant_id (ASCII) ||
    key_version as 4 bytes big-endian)`, LABEL being `MERCHANT_KEY_LABEL`. The length prefix and the fixed-width
    version make the input unambiguous: ("a:b", 1) and ("a", ...) can never give the same bytes.

    Parameters:
      master_key: One decoded master key (a `parse_webhook_secrets` item).
      merchant_id: The merchant's id (`MERCHANT_ID`).
      key_version: The merchant's key generation, 1 to MAX_KEY_VERSION.
    """
    if not MERCHANT_ID.fullmatch(merchant_id):
        raise ValueError("merchant_id must be 1-64 characters of letters, digits and _ . : -")
    if isinstance(key_version, bool) or not 1 <= key_version <= MAX_KEY_VERSION:
        raise ValueError(f"key_version must be an integer from 1 to {MAX_KEY_VERSION}")
    encoded = merchant_id.encode("ascii")
    data = MERCHANT_KEY_LABEL + b"\x00" + len(encoded).to_bytes(2, "big") + encoded + key_version.to_bytes(4, "big")
    return hmac.new(master_key, data, hashlib.sha256).digest()


def merchant_secret(master_secret: str, merchant_id: str, key_version: int = 1) -> str:
    """Return the `whsec_...` secret to give merchant_id for generation key_version (its settings page).

    It is derived from the newest (first) of the space-separated master secrets, so after a master rotation
    merchants are shown their new secret while webhooks still carry a signature their old one verifies.

    Parameters:
      master_secret: WHISKYPAY_WEBHOOK_SECRET: one or more space-separated `whsec_` secrets, newest first.
      merchant_id: The merchant's id.
      key_version: The merchant's key generation (1 unless rotated).
    """
    newest = parse_webhook_secrets(master_secret)[0]
    return SECRET_PREFIX + base64.b64encode(merchant_key(newest, merchant_id, key_version)).decode()


def merchant_signing_keys(
    master_keys: Sequence[bytes], merchant_id: str | None, key_version: int = 1
) -> tuple[bytes, ...]:
    """Return the HMAC keys one webhook is signed with, one `v1` signature each.

    Without a merchant: the master keys themselves (single-merchant mode). With one: for each master key, newest
    first, the merchant's key of key_version and, during the merchant's rotation, of key_version - 1.
    """
    if merchant_id is None:
        return tuple(master_keys)
    versions = (key_version, key_version - 1) if key_version > 1 else (key_version,)
    return tuple(merchant_key(master, merchant_id, version) for master in master_keys for version in versions)
