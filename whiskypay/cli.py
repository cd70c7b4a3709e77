"""The `whiskypay` command: dev stack, demo, payments by hand, and operations (see `whiskypay --help`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from whiskypay import devcmd


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="whiskypay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    devcmd.register(commands)
    try:
        from whiskypay import ops
    except ImportError:  # pragma: no cover  operations commands not installed
        pass
    else:
        ops.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
