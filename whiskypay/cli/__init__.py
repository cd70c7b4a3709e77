"""The `whiskypay` command: dev stack, demo, payments by hand, and operations (see `whiskypay --help`).

One module per command group, each with a `register(commands)` function:

    whiskypay/cli/dev.py        dev, demo, pay (the local stack, behind the `dev` extra)
    whiskypay/cli/secret.py     secret
    whiskypay/cli/ops.py        status, failed, retry
    whiskypay/cli/merchants.py  merchants, breaker
    whiskypay/cli/dashboard.py  dashboard
    whiskypay/cli/health.py     health (container healthchecks)
    whiskypay/cli/check.py      check (before going live)
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: Modules that add subcommands, in `--help` order. Each imports what its commands need only when they run,
#: so one command's dependencies (the dev stack's, the dashboard's) never break the others.
COMMAND_MODULES = ("whiskypay.cli.dev", "whiskypay.cli.secret", "whiskypay.cli.ops", "whiskypay.cli.ledger",
                   "whiskypay.cli.merchants",
                   "whiskypay.cli.dashboard", "whiskypay.cli.health", "whiskypay.cli.check")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="whiskypay", description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return status

