"""`whiskypay merchants` and `whiskypay breaker open|close M`: see and operate the merchant breakers.

The breakers themselves live in `whiskypay.breakers` (Redis) and `middleware/merchant_breakers.py` (the workers);
this module connects like the other operations commands (`whiskypay.cli.ops`), prints, and exits 0, 1 (the
merchant has no breaker to close) or 2 (Redis or the configuration cannot be used).
"""

from __future__ import annotations

import argparse
import json

from whiskypay.breakers import BreakerStore
from whiskypay.cli.ops import _connect, _reports_errors, format_table, format_time, shorten
from whiskypay.merchants import operator_name
from whiskypay.queues import Queue

#: The longest last-error text shown in the table, in characters (--json has it whole).
ERROR_COLUMN_CHARS = 50


@_reports_errors
def merchants_command(args: argparse.Namespace) -> int:
    """List the merchants whose breaker is not closed or who have parked callbacks."""
    client, namespace = _connect()
    with client:
        breakers = sorted(
            (breaker for breaker in BreakerStore(client, namespace).snapshot().values() if breaker.listed),
            key=lambda breaker: (breaker.state != "open", -breaker.parked, breaker.merchant),
        )
    if args.json:
        print(json.dumps({"merchants": [breaker.summary() for breaker in breakers]}, indent=2))
        return 0
    if not breakers:
        print("No merchant is tripped or has parked callbacks.")
        return 0
    headers = ("MERCHANT", "STATE", "PARKED", "FAILURES", "SINCE", "NEXT PROBE", "LAST ERROR")
    rows = [
        (b.merchant, f"{b.state} (held)" if b.held else b.state, b.parked, b.failures, format_time(b.since_ms),
         format_time(b.next_probe_at_ms) if b.next_probe_at_ms else ("held: no probe" if b.held else "-"),
         shorten(b.last_error or "-", ERROR_COLUMN_CHARS))
        for b in breakers
    ]
    print(format_table(headers, rows, right=(2, 3)))
    return 0


@_reports_errors
def breaker_command(args: argparse.Namespace) -> int:
    """Open (hold) or close one merchant's breaker."""
    client, namespace = _connect()
    with client:
        args.merchant = operator_name(args.merchant)  # `host=Shop.Example.` is `host=shop.example`
        store = BreakerStore(client, namespace)
        was = store.operate(args.merchant, args.action, queue=str(Queue.CALLBACKS))
        parked = store.snapshot().get(args.merchant)
    count = parked.parked if parked else 0
    if args.action == "open":
        print(f"Breaker of {args.merchant} is open and held (was {was}): its callbacks are parked, not probed, "
              f"until `whiskypay breaker close {args.merchant}`. {count} parked now.")
        return 0
    if was == "none":
        print(f"{args.merchant} has no breaker record: nothing to close (a merchant is named by its merchant_id; "
              "a callback host without one as host=<host>, e.g. host=shop.example; see `whiskypay merchants`).")
        return 1
    print(f"Breaker of {args.merchant} is closed (was {was}): its {count} parked callback(s) go back oldest first "
          "through the replay lane, at most WHISKYPAY_BREAKER_RELEASE_RATE per second.")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the merchants and breaker subcommands."""
    merchants = commands.add_parser("merchants", help="merchants with an open breaker or parked callbacks")
    merchants.add_argument("--json", action="store_true", help="print JSON for scripts")
    merchants.set_defaults(handler=merchants_command)

    breaker = commands.add_parser("breaker", help="open (hold) or close a merchant's breaker by hand")
    breaker.add_argument("action", choices=("open", "close"),
                         help="open: park the merchant's callbacks now, no probes; close: deliver them now")
    breaker.add_argument("merchant", help="the merchant: its merchant_id, or host=<callback host> for callbacks "
                         "sent without one (e.g. host=shop.example; \"=\" is never in a merchant_id)")
    breaker.set_defaults(handler=breaker_command)
