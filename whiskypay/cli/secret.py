"""`whiskypay secret`: print a new webhook secret, a merchant's derived secret, or an ed25519 key pair.

    whiskypay secret                                  a new whsec_ secret for WHISKYPAY_WEBHOOK_SECRET
    whiskypay secret --merchant M [--key-version N]   merchant M's whsec_ secret, derived from WHISKYPAY_WEBHOOK_SECRET
    whiskypay secret --ed25519                        a new key pair: the whsk_ secret key, then the whpk_ public key
    whiskypay secret --public                         the whpk_ public key of WHISKYPAY_WEBHOOK_SIGNING_KEY

Each prints only the key lines, so a gateway can read them; a problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from whiskypay.signing import MAX_KEY_VERSION, merchant_secret, new_secret


def _fail(problem: str) -> int:
    print(f"whiskypay secret: {problem}", file=sys.stderr)
    return 2


def secret(args: argparse.Namespace) -> int:
    """Print what the options ask for (see the module docstring)."""
    if args.key_version is not None and args.merchant is None:
        return _fail("--key-version needs --merchant")
    if args.ed25519:
        from whiskypay.ed25519 import new_key_pair

        print("\n".join(new_key_pair()))
        return 0
    if args.merchant is None and not args.public:
        print(new_secret())
        return 0
    from settings import ConfigurationError, get_settings

    try:
        settings = get_settings()
    except ConfigurationError as exc:
        return _fail(" ".join(str(exc).split()))
    if args.public:
        if settings.webhook_signing_key is None:
            return _fail("WHISKYPAY_WEBHOOK_SIGNING_KEY is not set (`whiskypay secret --ed25519` prints a key pair)")
        from whiskypay.ed25519 import encode_public_key, parse_secret_key

        print(encode_public_key(parse_secret_key(settings.webhook_signing_key.get_secret_value())))
        return 0
    if settings.webhook_secret is None:
        return _fail("WHISKYPAY_WEBHOOK_SECRET is not set: a merchant's secret is derived from it")
    try:
        print(merchant_secret(settings.webhook_secret.get_secret_value(), args.merchant, args.key_version or 1))
    except ValueError as exc:
        return _fail(str(exc))
    return 0


def _key_version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 1 <= value <= MAX_KEY_VERSION:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_KEY_VERSION}, got {value}")
    return value


def register(commands: Any) -> None:
    """Add `secret` to the `whiskypay` command."""
    p = commands.add_parser(
        "secret", help="print a new whsec_ secret, a merchant's derived secret (--merchant) or an ed25519 key pair"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--merchant", metavar="MERCHANT_ID", help="print this merchant's secret (one line)")
    which.add_argument("--ed25519", action="store_true", help="print a new whsk_ secret key and its whpk_ public key")
    which.add_argument("--public", action="store_true", help="print the whpk_ of WHISKYPAY_WEBHOOK_SIGNING_KEY")
    p.add_argument("--key-version", type=_key_version, metavar="N", help="the merchant's key generation (default 1)")
    p.set_defaults(handler=secret)
