"""Standard Webhooks asymmetric signatures (`v1a`, ed25519), over the `cryptography` library.

Only the modules that sign or verify `v1a` import this one (lazily), so `cryptography` is loaded only where
ed25519 is used. Key encodings (the spec's prefixes):

  whsk_<base64>  the secret key: base64 of the 32-byte ed25519 seed (RFC 8032's private key). The 64-byte
                 form of libsodium/NaCl (seed followed by the public key) is accepted too.
  whpk_<base64>  the public key: base64 of the raw 32-byte public key.

A `v1a` signature is `v1a,` + base64 of the 64-byte ed25519 signature of `{webhook-id}.{webhook-timestamp}.{body}`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

#: The prefix of a secret (signing) key.
SECRET_KEY_PREFIX = "whsk_"

#: The prefix of a public (verifying) key.
PUBLIC_KEY_PREFIX = "whpk_"

#: The version tag of an ed25519 signature in the webhook-signature header.
VERSION = "v1a"


def _decode(token: str, prefix: str, what: str) -> bytes:
    if not token.startswith(prefix):
        raise ValueError(f"the {what} does not start with {prefix!r}")
    try:
        return base64.b64decode(token[len(prefix) :], validate=True)
    except binascii.Error:
        raise ValueError(f"the {what} is not valid base64 after {prefix!r}") from None


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def parse_secret_key(text: str) -> Ed25519PrivateKey:
    """Decode a `whsk_` secret key; ValueError (never quoting the key) when it is not one."""
    raw = _decode(text.strip(), SECRET_KEY_PREFIX, "signing key")
    if len(raw) not in (32, 64):
        raise ValueError(f"the signing key decodes to {len(raw)} bytes; an ed25519 whsk_ key has 32 (or 64)")
    key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if len(raw) == 64 and raw[32:] != _public_bytes(key.public_key()):
        raise ValueError("the signing key's last 32 bytes are not its public key; use the 32-byte seed form")
    return key


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Decode a `whpk_` public key; ValueError when it is not one."""
    raw = _decode(text.strip(), PUBLIC_KEY_PREFIX, "public key")
    if len(raw) != 32:
        raise ValueError(f"the public key decodes to {len(raw)} bytes; an ed25519 whpk_ key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def encode_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Return the `whpk_` text of key's public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return PUBLIC_KEY_PREFIX + base64.b64encode(_public_bytes(public)).decode()


def new_key_pair() -> tuple[str, str]:
    """Return a fresh (`whsk_` secret key, `whpk_` public key) pair."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return SECRET_KEY_PREFIX + base64.b64encode(seed).decode(), encode_public_key(key)


def _content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sign(key: Ed25519PrivateKey, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `v1a,<base64>` signature of body for this id and timestamp."""
    return f"{VERSION}," + base64.b64encode(key.sign(_content(msg_id, timestamp, body))).decode()


def matches(key: Ed25519PublicKey, content: bytes, offered: Iterable[str]) -> bool:
    """Return True when one offered `v1a,<base64>` signature is key's signature of content.

    Signatures of other versions, and malformed ones, just do not match (never an exception).
    """
    for candidate in offered:
        version, _, encoded = candidate.partition(",")
        if version != VERSION:
            continue
        try:
            key.verify(base64.b64decode(encoded, validate=True), content)
        except (InvalidSignature, ValueError):  # binascii.Error is a ValueError; so is non-ASCII text
            continue
        return True
    return False


def verify_any(public_keys: Iterable[str], msg_id: str, timestamp: int, body: bytes, offered: Iterable[str]) -> bool:
    """Return True when one offered `v1a,...` signature verifies with one of the `whpk_` public keys.

    Signatures of other versions are skipped; a malformed key raises ValueError (a receiver's configuration
    error), a malformed signature just does not verify.
    """
    keys = [parse_public_key(text) for text in public_keys]
    content = _content(msg_id, timestamp, body)
    offered = list(offered)
    return any(matches(key, content, offered) for key in keys)
