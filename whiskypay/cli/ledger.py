"""The delivery ledger's commands: `event`, `events`, `resend`, `reconcile`, `forget` (whiskypay/ledger.py).

Exit statuses, the same for each: 0 found (nothing missing), 1 not found (something missing, an ambiguous
id), 2 Redis unreachable or a bad argument. `--since` takes 30m, 1h, 2d or an ISO-8601 time everywhere.
Addresses are shown masked; URLs are cut to their host.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from whiskypay import keys
from whiskypay.cli.ops import SINCE_HELP, _connect, _reports_errors, format_table, format_time, shorten, since_arg
from whiskypay.dead_letters import encode_message, iter_dead_letters
from whiskypay.ledger import (
    DELIVERY_OPTION,
    ERASED,
    STATES,
    LedgerConfig,
    LedgerWriter,
    MessageView,
    Payment,
    erase_in_message,
    forget_address,
    holds_address,
    iter_payments,
    load_payments,
    pending_op,
    resolve,
)
from whiskypay.queues import Queue
from whiskypay.redaction import mask_address

if TYPE_CHECKING:
    import redis

#: `whiskypay events` shows this many payments unless --limit says otherwise.
DEFAULT_EVENTS_LIMIT = 50

#: The options a resend drops: the message starts over with a fresh attempt count and no stale failure.
RESEND_DROPPED_OPTIONS = frozenset(
    {"retries", "traceback", "failure_class", "failed_at", "requeue_timestamp", "eta", "redis_message_id"}
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def ledger_config(namespace: str) -> LedgerConfig:
    """Return the ledger settings (retention, cap) for namespace."""
    from settings import get_settings

    settings = get_settings()
    return LedgerConfig(namespace=namespace, retention_s=settings.ledger_retention_s,
                        max_payments=settings.ledger_max_payments)


# --------------------------------------------------------------------------------------------------------------------
# pure formatting
# --------------------------------------------------------------------------------------------------------------------


def _code(attempt: dict[str, Any]) -> object:
    return attempt.get("http_status", attempt.get("smtp_code"))


def attempt_table(attempts: list[dict[str, Any]], *, code_title: str, deliveries: bool = False) -> str:
    """Return one job's attempts as an indented table."""
    headers = (("DELIVERY",) if deliveries else ()) + ("ATTEMPT", "AT", "OUTCOME", code_title, "DURATION", "ERROR")
    rows: list[tuple[object, ...]] = []
    for attempt in attempts:
        duration = attempt.get("duration_ms")
        rows.append(
            ((attempt.get("delivery"),) if deliveries else ())
            + (attempt.get("attempt"), (attempt.get("at") or "-").replace("T", " "), attempt.get("outcome"),
               _code(attempt), f"{duration} ms" if duration is not None else None,
               shorten(attempt.get("error") or "-", 70))
        )
    right = (0, 1, 4, 5) if deliveries else (0, 3, 4)
    return "\n".join("  " + line for line in format_table(headers, rows, right=right).splitlines())


def describe_payment(payment: Payment) -> str:
    """Return the text `whiskypay event` prints for one payment."""
    data = payment.to_json()
    lines = [f"PAYMENT {payment.label}  merchant {payment.merchant_id or '-'}  "
             f"first seen {format_time(payment.created_ms)}"]
    webhook = data["webhook"]
    if webhook is not None:
        lines.append(f"WEBHOOK {webhook['webhook_id']}  {webhook['state']}  host {webhook['host'] or '-'}  "
                     f"message {webhook['message_id']}  deliveries {webhook['deliveries']}")
        if webhook["attempts"]:
            lines.append(attempt_table(webhook["attempts"], code_title="HTTP", deliveries=True))
            last = webhook["attempts"][-1].get("response")
            if last:
                lines.append(f"  last response: {shorten(last, 200)}")
    for email in data["emails"] or []:
        lines.append(f"EMAIL {email['role']:<8}  {email['to'] or '-'}  {email['state']}")
        if email["attempts"]:
            lines.append(attempt_table(email["attempts"], code_title="SMTP"))
    return "\n".join(lines)


def _emails_cell(payment: Payment) -> str:
    if not payment.has_emails:
        return "-"
    return "/".join(str(payment.email_state(role)) for role in ("buyer", "merchant"))


def events_rows(payments: Iterable[Payment]) -> list[tuple[object, ...]]:
    """Return the `whiskypay events` table rows: one line per payment."""
    rows: list[tuple[object, ...]] = []
    for payment in payments:
        last = payment.last_row()
        status = (last.get("c") or last.get("o")) if last else None
        rows.append((payment.label, payment.merchant_id, payment.webhook_state or "-", _emails_cell(payment),
                     len(payment.rows), status, format_time(payment.created_ms)))
    return rows


EVENTS_HEADERS = ("EVENT", "MERCHANT", "WEBHOOK", "EMAILS (BUYER/MERCHANT)", "ATTEMPTS", "LAST STATUS", "WHEN")


# --------------------------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------------------------


def _find(client: redis.Redis, namespace: str, ident: str, merchant: str | None) -> list[Payment]:
    payments = load_payments(client, namespace, resolve(client, namespace, ident, merchant))
    if merchant is not None:
        payments = [payment for payment in payments if payment.merchant_id == (merchant or None)]
    return payments


def _ambiguous(ident: str, payments: list[Payment]) -> None:
    print(f"{ident!r} names {len(payments)} payments; give --merchant to pick one:")
    print(format_table(EVENTS_HEADERS, events_rows(payments), right=(4,)))


@_reports_errors
def event_command(args: argparse.Namespace) -> int:
    """Print one payment or job: its ids, each job's state and every attempt."""
    client, namespace = _connect()
    with client:
        payments = _find(client, namespace, args.id, args.merchant)
    if not payments:
        if args.json:
            print("null")
        print(f"not found: no payment, webhook-id or message id {args.id!r} in the ledger"
              + (f" for merchant {args.merchant!r}" if args.merchant is not None else ""),
              file=sys.stderr)
        return 1
    if len(payments) > 1:
        if args.json:
            print(json.dumps([payment.to_json() for payment in payments], indent=2))
        else:
            _ambiguous(args.id, payments)
        return 1
    payment = payments[0]
    print(json.dumps(payment.to_json(), indent=2) if args.json else describe_payment(payment))
    return 0


@_reports_errors
def events_command(args: argparse.Namespace) -> int:
    """Print payments newest first, one line each."""
    client, namespace = _connect()
    found: list[Payment] = []
    with client:
        for payment in iter_payments(client, namespace, since_ms=args.since):
            if args.merchant is not None and payment.merchant_id != args.merchant:
                continue
            if args.state is not None and args.state not in payment.states():
                continue
            found.append(payment)
            if len(found) >= args.limit:
                break
    if args.json:
        print(json.dumps([payment.to_json() for payment in found], indent=2))
    elif found:
        print(format_table(EVENTS_HEADERS, events_rows(found), right=(4,)))
    else:
        print("No payments in the ledger match.")
    return 0 if found else 1


@_reports_errors
def reconcile_command(args: argparse.Namespace) -> int:
    """Print every payment since T whose webhook was not delivered or whose emails were not both sent."""
    client, namespace = _connect()
    with client:
        incomplete = [(payment, payment.missing()) for payment in iter_payments(client, namespace, since_ms=args.since)]
    incomplete = [(payment, missing) for payment, missing in incomplete if missing]
    if args.json:
        print(json.dumps([{**payment.to_json(), "missing": missing} for payment, missing in incomplete], indent=2))
    elif incomplete:
        rows = []
        for payment, missing in incomplete:
            last = payment.last_row()
            rows.append((payment.label, payment.merchant_id, ", ".join(missing), len(payment.rows),
                         shorten((last or {}).get("err") or "-", 60), format_time(payment.created_ms)))
        print(format_table(("EVENT", "MERCHANT", "MISSING", "ATTEMPTS", "LAST ERROR", "WHEN"), rows, right=(3,)))
        print(f"{len(incomplete)} payment(s) since {format_time(args.since)} are not complete.")
    else:
        print(f"Every payment since {format_time(args.since)} is complete.")
    return 1 if incomplete else 0


def resend_message(payment: Payment, *, now_ms: int) -> dict[str, Any] | None:
    """Return the callback message that sends payment's webhook again, or None when it cannot be resent.

    The same message id (so the event's idempotency reservation lets it through) and webhook-id, the next
    delivery number, a fresh attempt count and timestamp; it is signed anew by the worker at each attempt.
    """
    stored = payment.stored_message
    if not stored or stored == ERASED:
        return None
    message = json.loads(stored)
    options = {key: value for key, value in message.get("options", {}).items() if key not in RESEND_DROPPED_OPTIONS}
    options["webhook_id"] = payment.fields.get("w.wid") or options.get("webhook_id")
    options[DELIVERY_OPTION] = int(payment.fields.get("w.n", "1")) + 1
    return {**message, "queue_name": payment.fields.get("w.q", str(Queue.CALLBACKS)), "options": options,
            "message_timestamp": now_ms}


def queue_resend(pipe: Any, writer: LedgerWriter, config: LedgerConfig, message: dict[str, Any], *, queue: str,
                 order: int, now_ms: int) -> None:  # fmt: skip
    """Queue on pipe the writes that resend message (`resend_message`): into queue's replay lane, ledger pending."""
    from whiskypay.replay import add_to_lane, replayed

    ready = replayed(message, queue=queue)
    data = encode_message(ready)
    add_to_lane(pipe, config.namespace, queue, ready, data, order)
    op = pending_op(config, MessageView(ready), now_ms=now_ms, replay=True)
    if op is not None:
        writer.queue(pipe, op, data=data)


def resend_payment(client: redis.Redis, namespace: str, payment: Payment) -> str:
    """Resend one payment's webhook like `whiskypay resend` (the paced replay lane); return what happened, as text.

    The dashboard's Resend button calls it.
    """
    from whiskypay.replay import lane_order

    now_ms = int(time.time() * 1000)
    message = resend_message(payment, now_ms=now_ms)
    if message is None:
        reason = ("its buyer's address was erased (whiskypay forget)" if payment.stored_message == ERASED
                  else "no webhook of it is recorded")  # fmt: skip
        return f"Cannot resend {payment.label}: {reason}."
    queue = message["queue_name"]
    pipe = client.pipeline(transaction=False)
    queue_resend(pipe, LedgerWriter(client), ledger_config(namespace), message, queue=queue,
                 order=lane_order(now_ms, 0), now_ms=now_ms)  # fmt: skip
    for reply in pipe.execute(raise_on_error=False):
        if isinstance(reply, Exception):
            raise reply
    return (f"Resent {payment.label} (webhook-id {message['options']['webhook_id']}, delivery "
            f"{message['options'][DELIVERY_OPTION]}) into the {queue} replay lane.")


@_reports_errors
def resend_command(args: argparse.Namespace) -> int:
    """Send payments' webhooks again through the paced replay lane; print when each goes out."""
    from whiskypay.replay import lane_order

    client, namespace = _connect()
    config = ledger_config(namespace)
    status = 0
    with client:
        chosen: list[tuple[Payment, dict[str, Any]]] = []
        now_ms = int(time.time() * 1000)
        for ident in args.id:
            payments = _find(client, namespace, ident, args.merchant)
            if len(payments) != 1:
                if payments:
                    _ambiguous(ident, payments)
                else:
                    print(f"not found: {ident!r} is not in the ledger")
                status = 1
                continue
            message = resend_message(payments[0], now_ms=now_ms)
            if message is None:
                reason = ("its buyer's address was erased (whiskypay forget)"
                          if payments[0].stored_message == ERASED else "no webhook of it is recorded")
                print(f"cannot resend {ident!r}: {reason}")
                status = 1
                continue
            chosen.append((payments[0], message))
        if args.dry_run:
            for payment, message in chosen:
                print(f"would resend {payment.label} (webhook-id {message['options']['webhook_id']}, "
                      f"delivery {message['options'][DELIVERY_OPTION]})")
            print(f"Would resend {len(chosen)} webhook(s) (dry run: nothing sent).")
            return status
        by_queue: dict[str, list[tuple[Payment, dict[str, Any]]]] = {}
        for payment, message in chosen:
            by_queue.setdefault(message["queue_name"], []).append((payment, message))
        writer = LedgerWriter(client)
        for queue, items in by_queue.items():
            pipe = client.pipeline(transaction=False)
            for index, (payment, message) in enumerate(items):
                queue_resend(pipe, writer, config, message, queue=queue, order=lane_order(now_ms, index),
                             now_ms=now_ms)  # fmt: skip
                print(f"resent {payment.label} (webhook-id {message['options']['webhook_id']}, delivery "
                      f"{message['options'][DELIVERY_OPTION]}) into the {queue} replay lane")
            replies = pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        print(f"Resent {len(chosen)} webhook(s): workers deliver them after fresh work, at most "
              "WHISKYPAY_REPLAY_RATE per second.")
    return status


#: Replace one dead letter's stored message only if it is still the one read. KEYS: XQ.msgs; ARGV: id, old, new.
REPLACE_IF_SAME_LUA = """
if redis.call("hget", KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call("hset", KEYS[1], ARGV[1], ARGV[3])
return 1
"""


def forget_dead_letters(client: redis.Redis, namespace: str, address: str, *, dry_run: bool = False) -> int:
    """Erase address from every dead letter that holds it; return how many did.

    The address argument is replaced by ERASED and the `erased_at` option set: such a dead letter stays
    listed (the failure happened) but `whiskypay retry` skips it, since its job could not run without the
    address.
    """
    touched = 0
    for queue in Queue:
        for letter in list(iter_dead_letters(client, namespace, str(queue))):
            if letter.message is None or not holds_address(letter.message, address):
                continue
            touched += 1
            if dry_run:
                continue
            erased = erase_in_message(letter.message, address)
            erased["options"] = {**erased.get("options", {}), "erased_at": int(time.time() * 1000)}
            client.eval(REPLACE_IF_SAME_LUA, 1, keys.dead_letter_messages(namespace, str(queue)), letter.redis_id,
                        letter.raw, encode_message(erased))
    return touched


@_reports_errors
def forget_command(args: argparse.Namespace) -> int:
    """Erase a buyer's address from the ledger and the dead letters; say how many records it touched."""
    client, namespace = _connect()
    with client:
        records = forget_address(client, namespace, args.email, dry_run=args.dry_run)
        letters = forget_dead_letters(client, namespace, args.email, dry_run=args.dry_run)
    verb = "Would erase" if args.dry_run else "Erased"
    print(f"{verb} {mask_address(args.email)} from {records} ledger record(s) and {letters} dead letter(s)"
          + (" (dry run: nothing changed)." if args.dry_run else "."))
    return 0 if records or letters else 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the event, events, resend, reconcile and forget subcommands."""
    since_help = SINCE_HELP

    event = commands.add_parser("event", help="one payment or job from the delivery ledger, every attempt")
    event.add_argument("id", help="an event_id, a webhook-id or a message id")
    event.add_argument("--merchant", help="the merchant, when two merchants used the same event id")
    event.add_argument("--json", action="store_true", help="print JSON for scripts")
    event.set_defaults(handler=event_command)

    events = commands.add_parser("events", help="payments in the delivery ledger, newest first")
    events.add_argument("--merchant", help="only this merchant's")
    events.add_argument("--state", choices=STATES, help="only payments with a job in this state")
    events.add_argument("--since", type=since_arg, help=since_help)
    events.add_argument("--limit", type=_positive, default=DEFAULT_EVENTS_LIMIT,
                        help=f"show at most this many (default: {DEFAULT_EVENTS_LIMIT})")
    events.add_argument("--json", action="store_true", help="print JSON for scripts")
    events.set_defaults(handler=events_command)

    resend = commands.add_parser("resend", help="send payments' webhooks again (same webhook-id, signed anew)")
    resend.add_argument("id", nargs="+", help="event_ids, webhook-ids or message ids")
    resend.add_argument("--merchant", help="the merchant, when two merchants used the same event id")
    resend.add_argument("--dry-run", action="store_true", help="show what would be sent; send nothing")
    resend.set_defaults(handler=resend_command)

    reconcile = commands.add_parser("reconcile", help="payments since T not delivered or not fully emailed")
    reconcile.add_argument("--since", type=since_arg, required=True, help=since_help)
    reconcile.add_argument("--json", action="store_true", help="print JSON for scripts")
    reconcile.set_defaults(handler=reconcile_command)

    forget = commands.add_parser("forget", help="erase a buyer's address from the ledger and the dead letters")
    forget.add_argument("--email", required=True, help="the address to erase")
    forget.add_argument("--dry-run", action="store_true", help="count the records; change nothing")
    forget.set_defaults(handler=forget_command)
