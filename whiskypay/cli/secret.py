"""`whiskypay secret`: print a new Standard Webhooks secret for WHISKYPAY_WEBHOOK_SECRET."""

from __future__ import annotations

import argparse
from typing import Any

from whiskypay.signing import new_secret


def secret(args: argparse.Namespace) -> int:
    """Print a new webhook secret (`whiskypay.signing.new_secret`)."""
    print(new_secret())
    return 0


def register(commands: Any) -> None:
    """Add `secret` to the `whiskypay` command."""
    p = commands.add_parser("secret", help="print a new whsec_ webhook secret")
    p.set_defaults(handler=secret)
