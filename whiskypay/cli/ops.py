"""`whiskypay status`, `whiskypay failed` and `whiskypay retry`: print queues and dead letters, re-drive them.

See docs/operations-cli.md. The dead letters themselves (decoding, listing, the atomic re-drive) live in
`whiskypay.dead_letters`; this module reads the settings, connects, and prints. Like the domain below it, it never
imports `actors`, so it works without any worker configuration (no webhook secret, no SMTP).

Exit statuses: 0 done; 1 done, but something asked for was not found or was skipped; 2 Redis or the
configuration could not be used (one line on stderr naming the setting, with the password redacted).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from whiskypay import keys
from whiskypay.breakers import BreakerStore
from whiskypay.dead_letters import (
    DeadLetter,
    dead_letter_count,
    encode_message,
    iter_dead_letters,
    redrive_paced,
)
from whiskypay.errors import OpsError
from whiskypay.queue_stats import merchant_counts, queue_counts
from whiskypay.queues import Queue
from whiskypay.redaction import redact_url, url_password

if TYPE_CHECKING:
    import redis

#: `whiskypay failed` shows this many dead letters unless --limit says otherwise.
DEFAULT_FAILED_LIMIT = 50

#: The longest last-error text shown in a table cell, in characters (--json has it whole).
ERROR_COLUMN_CHARS = 70


def format_time(ms: int | None) -> str:
    """Return "2026-11-28 00:30:12 UTC" for a unix time in milliseconds, or "-" for None."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[int] = ()) -> str:
    """Return rows as an aligned text table under headers (two spaces between columns, no trailing blanks).

    Parameters:
      headers: Column titles.
      rows: One sequence of cells per row; cells are shown with str(), None as "-".
      right: Indexes of the columns to right-align (numbers).
    """
    cells = [[str(header) for header in headers]]
    cells += [["-" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max(len(row[index]) for row in cells) for index in range(len(headers))]
    right_aligned = set(right)
    lines = []
    for row in cells:
        padded = [
            cell.rjust(width) if index in right_aligned else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def shorten(text: str, limit: int) -> str:
    """Return text on one line, cut to limit characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class QueueStatus:
    """A queue's counts at one moment.

    Parameters:
      queue: The queue name.
      waiting: Messages in the queue's list, ready for a worker.
      delayed: Scheduled retries not yet due, in the delay queue or already prefetched by a worker.
      in_flight: Messages a worker fetched from the queue and has not acknowledged yet.
      dead_lettered: Messages in the dead-letter set.
      parked: Callbacks parked because their merchant's breaker is open (`whiskypay merchants`).
      completed, failed: Messages that succeeded / failed for good since counting_since_ms.
      counting_since_ms: When the counters started, unix milliseconds; None before the first count.
    """

    queue: str
    waiting: int
    delayed: int
    in_flight: int
    dead_lettered: int
    completed: int
    failed: int
    counting_since_ms: int | None
    parked: int = 0

    def summary(self) -> dict[str, Any]:
        """Return the counts as a JSON-ready dict."""
        return {
            "waiting": self.waiting,
            "delayed": self.delayed,
            "in_flight": self.in_flight,
            "dead_lettered": self.dead_lettered,
            "completed": self.completed,
            "failed": self.failed,
            "parked": self.parked,
            "counting_since": keys.iso_ms(self.counting_since_ms),
        }


def queue_status(
    client: redis.Redis, namespace: str, queue: str, merchant_id: str | None = None, *, parked: int = 0
) -> QueueStatus:
    """Read queue's counts (`whiskypay.queue_stats.queue_counts`) and its outcome counters from Redis.

    With merchant_id, only that merchant's messages and outcomes (`merchant_counts`, a scan of the queue's
    messages); counting_since stays the queue's.

    Parameters:
      parked: The queue's parked callbacks (`parked_by_queue`).
    """
    counters = keys.outcome_counters(namespace, queue)
    completed, failed, started_at = client.hmget(counters, ["completed", "failed", "started_at"])
    if merchant_id is None:
        counts = queue_counts(client, namespace, queue)
    else:
        counts = merchant_counts(client, namespace, queue, merchant_id)
        fields = [keys.merchant_outcome_field(outcome, merchant_id) for outcome in ("completed", "failed")]
        completed, failed = client.hmget(keys.merchant_outcome_counters(namespace, queue), fields)
    return QueueStatus(
        queue=queue,
        waiting=counts.waiting,
        delayed=counts.delayed,
        in_flight=counts.in_flight,
        dead_lettered=counts.dead_letters,
        completed=int(completed or 0),
        failed=int(failed or 0),
        counting_since_ms=int(started_at) * 1000 if started_at else None,
        parked=parked,
    )


def parked_by_queue(client: redis.Redis, namespace: str, merchant: str | None = None) -> dict[str, int]:
    """Return how many callbacks are parked per queue (every merchant's breaker, or merchant's; one script call)."""
    counts: dict[str, int] = {}
    for breaker in BreakerStore(client, namespace).snapshot().values():
        if merchant is not None and breaker.merchant != merchant:
            continue
        queue = breaker.queue or str(Queue.CALLBACKS)
        counts[queue] = counts.get(queue, 0) + breaker.parked
    return counts


# --------------------------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------------------------


def _connect() -> tuple[redis.Redis, str]:
    """Return a Redis client built like the broker's, checked with PING, and the broker namespace."""
    import redis

    from settings import ConfigurationError, get_settings
    from whiskypay.broker import redis_client

    try:
        settings = get_settings()
    except ConfigurationError as exc:
        raise OpsError(" ".join(str(exc).split())) from None
    url = settings.redis_url.get_secret_value()
    client = redis_client(settings)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise OpsError(_redis_problem(url, exc)) from None
    return client, settings.namespace


def _redis_problem(url: str, exc: BaseException) -> str:
    """Return the one-line fix-it text for a Redis error, with the URL's password redacted."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    password = url_password(url)
    if password:
        detail = detail.replace(password, "***")
    return (
        f"cannot use Redis at {redact_url(url)} ({type(exc).__name__}: {detail}); "
        "check that Redis runs and that WHISKYPAY_REDIS_URL points at it."
    )


Handler = Callable[[argparse.Namespace], int]


def _reports_errors(handler: Handler) -> Handler:
    """Turn OpsError and Redis errors into one line on stderr and exit status 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        import redis

        try:
            return handler(args)
        except OpsError as exc:
            print(f"whiskypay {args.command}: {exc}", file=sys.stderr)
        except redis.RedisError as exc:
            from settings import get_settings

            problem = _redis_problem(get_settings().redis_url.get_secret_value(), exc)
            print(f"whiskypay {args.command}: {problem}", file=sys.stderr)
        return 2

    return run


def _queues(args: argparse.Namespace) -> list[str]:
    return [args.queue] if getattr(args, "queue", None) else [str(queue) for queue in Queue]


@_reports_errors
def status_command(args: argparse.Namespace) -> int:
    """Print each queue's waiting, delayed, in-flight and dead-lettered messages and its outcome counters."""
    from whiskypay.replay import lane_size

    client, namespace = _connect()
    with client:
        parked = parked_by_queue(client, namespace, args.merchant)
        statuses = [queue_status(client, namespace, queue, args.merchant, parked=parked.get(queue, 0))
                    for queue in _queues(args)]
        replays = {queue: lane_size(client, namespace, queue) for queue in _queues(args)}
    if args.json:
        document: dict[str, Any] = {"namespace": namespace}
        if args.merchant:
            document["merchant_id"] = args.merchant
        document["queues"] = {s.queue: s.summary() for s in statuses}
        document["replays_waiting"] = replays  # resends and re-drives in each queue's replay lane
        print(json.dumps(document, indent=2))
        return 0
    if args.merchant:
        print(f"Merchant {args.merchant}:")
    headers = ("QUEUE", "WAITING", "DELAYED", "IN FLIGHT", "DEAD-LETTERED", "COMPLETED", "FAILED", "PARKED",
               "COUNTING SINCE")
    rows = [
        (s.queue, s.waiting, s.delayed, s.in_flight, s.dead_lettered, s.completed, s.failed, s.parked,
         format_time(s.counting_since_ms) if s.counting_since_ms else "not started")
        for s in statuses
    ]
    print(format_table(headers, rows, right=range(1, 8)))
    waiting = ", ".join(f"{queue} {count:,}" for queue, count in replays.items() if count)
    if waiting:
        print(f"Replays waiting (resend, retry; taken after fresh work, at most WHISKYPAY_REPLAY_RATE/s): {waiting}")
    return 0


def failed_rows(letters: Iterable[DeadLetter]) -> list[tuple[object, ...]]:
    """Return the `whiskypay failed` table rows of letters (error text shortened to ERROR_COLUMN_CHARS)."""
    return [
        (letter.message_id, letter.actor, letter.queue, format_time(letter.failed_at_ms), letter.attempts,
         letter.merchant_id, letter.callback_host, letter.buyer, shorten(letter.error or "-", ERROR_COLUMN_CHARS))
        for letter in letters
    ]


@_reports_errors
def failed_command(args: argparse.Namespace) -> int:
    """Print the dead letters, newest first: id, actor, queue, time, attempts, merchant, host, buyer, last error.

    With --merchant, only that merchant's (every dead letter of the queues is read to find them).
    """
    client, namespace = _connect()
    with client:
        letters: list[DeadLetter] = []
        total = 0
        for queue in _queues(args):
            if args.merchant is None:
                total += dead_letter_count(client, namespace, queue)
                letters += iter_dead_letters(client, namespace, queue, limit=args.limit)
                continue
            every = iter_dead_letters(client, namespace, queue)
            mine = [letter for letter in every if letter.merchant_id == args.merchant]
            total += len(mine)
            letters += mine
    letters.sort(key=lambda letter: letter.failed_at_ms, reverse=True)
    letters = letters[: args.limit]
    if args.json:
        print(json.dumps({"total": total, "dead_letters": [letter.summary() for letter in letters]}, indent=2))
        return 0
    if not letters:
        print("No dead letters.")
        return 0
    headers = ("MESSAGE ID", "ACTOR", "QUEUE", "FAILED AT", "ATTEMPTS", "MERCHANT", "HOST", "BUYER", "LAST ERROR")
    print(format_table(headers, failed_rows(letters), right=(4,)))
    if total > len(letters):
        print(f"({len(letters)} of {total} shown, newest first; use --limit to see more)")
    return 0


@_reports_errors
def retry_command(args: argparse.Namespace) -> int:
    """Re-drive dead letters of one queue through its paced replay lane, with a fresh attempt count.

    Which: --id (those), --all (every one) or --merchant (every one of that merchant), each --since T.
    """
    from whiskypay.cli.ledger import ledger_config
    from whiskypay.ledger import LedgerWriter
    from whiskypay.replay import lane_order

    client, namespace = _connect()
    config = ledger_config(namespace)
    writer = LedgerWriter(client)
    requested = frozenset(args.id or ())
    found: set[str] = set()
    rows: list[tuple[object, ...]] = []
    counts: dict[str, int] = {}
    now_ms = int(time.time() * 1000)
    try:
        with client:
            for letter in iter_dead_letters(client, namespace, args.queue, newest_first=False):
                if args.merchant is not None and letter.merchant_id != args.merchant:
                    continue
                if requested:
                    matches = requested & {letter.message_id, letter.redis_id}
                    if not matches:
                        continue
                    found |= matches
                if args.since is not None and letter.failed_at_ms < args.since:
                    continue
                if args.dry_run and letter.message is not None and not letter.erased:
                    result = "would re-drive"
                else:
                    result = redrive_one(client, namespace, letter, writer=writer, config=config,
                                         order=lane_order(now_ms, len(rows)), now_ms=now_ms)  # fmt: skip
                counts[result] = counts.get(result, 0) + 1
                rows.append((RESULT_TEXT.get(result, result), letter.message_id, letter.actor, letter.attempts,
                             letter.options.get("webhook_id")))
    finally:  # interrupted or not, say what has moved (each move is whole: the rest stays dead-lettered)
        if rows:
            print(format_table(("RESULT", "MESSAGE ID", "ACTOR", "ATTEMPTS", "WEBHOOK ID"), rows, right=(3,)))
    missing_ids = sorted(requested - found)
    for missing in missing_ids:
        print(f"not found: {missing} is not dead-lettered in {args.queue}")
    verb = "Would re-drive" if args.dry_run else "Re-drove"
    moved = counts.get("would re-drive" if args.dry_run else "re-driven", 0)
    whose = f" of merchant {args.merchant}" if args.merchant else ""
    dry = " (dry run: nothing moved)." if args.dry_run else "."
    print(f"{verb} {moved} dead letter(s){whose} onto {args.queue}{dry}")
    if moved and not args.dry_run:
        print("They wait in its replay lane: workers take them after fresh work, at most WHISKYPAY_REPLAY_RATE "
              "per second.")
    if counts.get("unreadable"):
        print(f"Skipped {counts['unreadable']} unreadable dead letter(s); they stay in the dead-letter queue.")
    if counts.get("erased"):
        print(f"Skipped {counts['erased']} dead letter(s) whose address `whiskypay forget` erased; they cannot run.")
    return 1 if missing_ids or counts.get("unreadable") or counts.get("changed") else 0


def redrive_one(client: redis.Redis, namespace: str, letter: DeadLetter, *, writer: Any, config: Any, order: int,
                now_ms: int) -> str:  # fmt: skip
    """Re-drive one dead letter as `whiskypay retry` does: through the paced replay lane (atomic), entered in the
    ledger; return "re-driven", "gone", "changed", "unreadable" or "erased" (the dashboard's buttons call it too).

    Parameters:
      writer, config: the ledger's LedgerWriter and LedgerConfig.
      order: its place in the lane (`whiskypay.replay.lane_order`).
    """
    if letter.message is None:
        return "unreadable"
    if letter.erased:
        return "erased"
    result, message = redrive_paced(client, namespace, letter, order=order)
    if result == "re-driven":
        _record_redrive(writer, config, message, now_ms)
    return result


def _record_redrive(writer: Any, config: Any, message: dict[str, Any], now_ms: int) -> None:
    """Enter a re-driven message in the delivery ledger as pending (its new delivery); a failure only warns."""
    import redis

    from whiskypay.ledger import MessageView, pending_op

    op = pending_op(config, MessageView(message), now_ms=now_ms, replay=True)
    if op is None:
        return
    try:
        writer.write(op, data=encode_message(message))
    except redis.RedisError as exc:
        print(f"warning: {message.get('message_id')} was re-driven but not recorded in the ledger "
              f"({type(exc).__name__})", file=sys.stderr)


#: How retry_command names each result in its table.
RESULT_TEXT = {
    "re-driven": "re-driven",
    "would re-drive": "would re-drive",
    "gone": "gone (moved by another run, or expired)",
    "changed": "skipped (changed while read)",
    "unreadable": "skipped (unreadable JSON, left in place)",
    "erased": "skipped (address erased by forget)",
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the status, failed and retry subcommands."""
    queues = [str(queue) for queue in Queue]

    status = commands.add_parser("status", help="queue depths, dead letters and completed/failed counters")
    status.add_argument("--queue", choices=queues, help="only this queue (default: all)")
    status.add_argument("--merchant", type=merchant_id_argument, metavar="MERCHANT_ID",
                        help="only this merchant's messages and counters (scans the queues' messages)")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(handler=status_command)

    failed = commands.add_parser("failed", help="list dead-lettered messages, newest first")
    failed.add_argument("--queue", choices=queues, help="only this queue (default: all)")
    failed.add_argument("--limit", type=_positive, default=DEFAULT_FAILED_LIMIT,
                        help=f"show at most this many (default: {DEFAULT_FAILED_LIMIT})")
    failed.add_argument("--merchant", type=merchant_id_argument, metavar="MERCHANT_ID",
                        help="only this merchant's dead letters")
    failed.add_argument("--json", action="store_true", help="print JSON for scripts")
    failed.set_defaults(handler=failed_command)

    retry = commands.add_parser(
        "retry", help="re-drive dead letters (paced, after fresh work) with a fresh attempt count"
    )
    retry.add_argument("--queue", choices=queues, required=True, help="the queue whose dead letters to re-drive")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="extend", nargs="+", metavar="ID", help="message ids from `whiskypay failed`")
    which.add_argument("--all", action="store_true", help="every dead letter of the queue")
    which.add_argument("--merchant", type=merchant_id_argument, metavar="MERCHANT_ID",
                       help="every dead letter of this merchant on the queue")
    retry.add_argument("--since", type=since_arg, help=f"only those failed since then: {SINCE_HELP}")
    retry.add_argument("--dry-run", action="store_true", help="show what would move; move nothing")
    retry.set_defaults(handler=retry_command)


#: What `--since` takes, the same in every command.
SINCE_HELP = "30m, 1h, 2d or an ISO-8601 time (UTC unless it says otherwise)"


def since_arg(text: str) -> int:
    """Parse a `--since` argument into unix ms (whiskypay.ledger.parse_since); argparse exits 2 on a bad one."""
    from whiskypay.ledger import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def merchant_id_argument(text: str) -> str:
    """Check a --merchant value: a merchant id as the contract has it (1-64 of A-Z a-z 0-9 _ . : -)."""
    from whiskypay.signing import MERCHANT_ID

    if not MERCHANT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a merchant id (1-64 characters of letters, digits and _ . : -)"
        )
    return text
