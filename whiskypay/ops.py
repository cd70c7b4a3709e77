"""Operations commands: `whiskypay status`, `whiskypay failed` and `whiskypay retry` (see docs/operations-cli.md).

They read Dramatiq's Redis keys directly and never import `actors`, so they work without any worker
configuration (no webhook secret, no SMTP). The pure helpers (decoding dead letters, building the
re-driven message, formatting tables) take plain values and are tested without a command line.

Exit statuses: 0 done; 1 done, but something asked for was not found or was skipped; 2 Redis or the
configuration could not be used (one line on stderr naming the setting, with the password redacted).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast

from whiskypay.queues import Queue
from whiskypay.redaction import redact_url, url_host, url_password

if TYPE_CHECKING:
    import redis

#: Options a re-drive drops so the message starts over with a fresh attempt count and no stale failure.
#: `message_id` and the `webhook_id` option are kept: the merchant sees the same webhook-id as before.
REDRIVE_DROPPED_OPTIONS = frozenset(
    {"retries", "traceback", "failure_class", "failed_at", "requeue_timestamp", "eta", "redis_message_id"}
)

#: How many dead letters are read from Redis per round trip.
BATCH_SIZE = 500

#: `whiskypay failed` shows this many dead letters unless --limit says otherwise.
DEFAULT_FAILED_LIMIT = 50

#: The longest last-error text shown in a table cell, in characters (--json has it whole).
ERROR_COLUMN_CHARS = 70

#: Move one dead letter back onto its queue, atomically: a message is re-driven once, or not at all.
#: It mirrors Dramatiq's dispatch.lua "enqueue" (HSET into `<queue>.msgs`, RPUSH the id onto `<queue>`),
#: so workers pick it up as any other message. KEYS: XQ, XQ.msgs, <queue>.msgs, <queue>;
#: ARGV: dead redis id, the data read earlier, new redis id, new data. Returns 1 moved, 0 no longer
#: dead-lettered (re-driven by someone else, or expired), -1 changed since it was read (left alone).
REDRIVE_LUA = """
if not redis.call("zscore", KEYS[1], ARGV[1]) then
    return 0
end
if redis.call("hget", KEYS[2], ARGV[1]) ~= ARGV[2] then
    return -1
end
redis.call("zrem", KEYS[1], ARGV[1])
redis.call("hdel", KEYS[2], ARGV[1])
redis.call("hset", KEYS[3], ARGV[3], ARGV[4])
redis.call("rpush", KEYS[4], ARGV[3])
return 1
"""

RedriveResult = Literal["re-driven", "gone", "changed"]

#: Positional argument order of our actors, for messages sent with args instead of kwargs.
_POSITIONAL = {
    "send_callback": ("callback_url", "email"),
    "send_email": ("buyer_email", "merchant_email"),
}


class OpsError(Exception):
    """Redis or the configuration cannot be used; the text names the setting and the fix."""


# --------------------------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------------------------


def format_time(ms: int | None) -> str:
    """Return "2026-11-28 00:30:12 UTC" for a unix time in milliseconds, or "-" for None."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_time(ms: int | None) -> str | None:
    """Return "2026-11-28T00:30:12Z" for a unix time in milliseconds, or None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def encode_message(message: dict[str, Any]) -> bytes:
    """Encode a message dict the way Dramatiq's default JSONEncoder does (compact UTF-8 JSON)."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message as stored in `<queue>.XQ.msgs`, decoded when its JSON is readable.

    Parameters:
      queue: The queue whose dead-letter set holds it.
      redis_id: Its id in the XQ set and hash (Dramatiq's `redis_message_id`).
      raw: The stored bytes, exactly as read (the re-drive script checks them).
      dead_at_ms: Its score in the XQ set: when it was dead-lettered, unix milliseconds.
      message: The decoded message, or None when unreadable.
      problem: Why it is unreadable, or None.
    """

    queue: str
    redis_id: str
    raw: bytes
    dead_at_ms: int
    message: dict[str, Any] | None
    problem: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The message's options ({} when unreadable)."""
        options = (self.message or {}).get("options")
        return options if isinstance(options, dict) else {}

    @property
    def message_id(self) -> str:
        """Dramatiq's message id (stable across retries), or the Redis id when unreadable."""
        value = (self.message or {}).get("message_id")
        return value if isinstance(value, str) else self.redis_id

    @property
    def actor(self) -> str | None:
        """The actor name, or None when unreadable."""
        value = (self.message or {}).get("actor_name")
        return value if isinstance(value, str) else None

    @property
    def failed_at_ms(self) -> int:
        """When it failed: the `failed_at` option, else its XQ score; unix milliseconds."""
        value = self.options.get("failed_at")
        return value if isinstance(value, int) else self.dead_at_ms

    @property
    def attempts(self) -> int | None:
        """How many attempts were made (retries + 1), or None when unreadable."""
        if self.message is None:
            return None
        retries = self.options.get("retries", 0)
        return (retries if isinstance(retries, int) else 0) + 1

    @property
    def error(self) -> str | None:
        """The last error ("ErrorClass: text"), with addresses masked and URLs cut to their host."""
        from whiskypay.redaction import scrub_text

        if self.message is None:
            return f"unreadable: {self.problem}"
        value = self.options.get("traceback")
        return scrub_text(str(value)) if value else None

    def argument(self, name: str) -> object:
        """Return the actor argument called name, from kwargs or by its position in args."""
        message = self.message or {}
        kwargs = message.get("kwargs")
        if isinstance(kwargs, dict) and name in kwargs:
            return kwargs[name]
        args = message.get("args")
        order = _POSITIONAL.get(self.actor or "", ())
        if isinstance(args, list) and name in order and order.index(name) < len(args):
            return args[order.index(name)]
        return None

    @property
    def callback_host(self) -> str | None:
        """The callback URL's host (never the path or query), or None."""
        return url_host(self.argument("callback_url"))

    @property
    def buyer(self) -> str | None:
        """The buyer's email, masked ("b***@example.com"), or None."""
        from whiskypay.redaction import mask_email

        for name in ("email", "buyer_email"):
            value = self.argument(name)
            if isinstance(value, str):
                masked = mask_email(value)
                return masked if masked != value else "***"
        return None

    def summary(self) -> dict[str, Any]:
        """Return the fields safe to show (never the arguments), for tables and --json."""
        return {
            "message_id": self.message_id,
            "actor": self.actor,
            "queue": self.queue,
            "failed_at": iso_time(self.failed_at_ms),
            "failed_at_ms": self.failed_at_ms,
            "attempts": self.attempts,
            "last_error": self.error,
            "callback_host": self.callback_host,
            "buyer": self.buyer,
            "webhook_id": self.options.get("webhook_id"),
            "readable": self.message is not None,
        }


def decode_dead_letter(queue: str, redis_id: str, raw: bytes, dead_at_ms: int) -> DeadLetter:
    """Decode one stored dead letter; unreadable JSON gives a DeadLetter with `message=None` and the problem."""
    try:
        message = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return DeadLetter(queue, redis_id, raw, dead_at_ms, None, f"not JSON ({type(exc).__name__})")
    if not isinstance(message, dict) or not isinstance(message.get("actor_name"), str):
        return DeadLetter(queue, redis_id, raw, dead_at_ms, None, "not a Dramatiq message")
    return DeadLetter(queue, redis_id, raw, dead_at_ms, message)


def redriven(message: dict[str, Any], *, queue: str, redis_message_id: str) -> dict[str, Any]:
    """Return a copy of a dead-lettered message that starts over on queue with a fresh attempt count.

    The failure options (retries, traceback, failure_class, failed_at, requeue_timestamp, eta) are dropped;
    message_id and every other option, webhook_id included, are kept.

    Parameters:
      message: The decoded dead letter.
      queue: The queue to put it on (its canonical name, never a `.DQ`).
      redis_message_id: Its new id in Redis (Dramatiq gives each enqueue a fresh one).
    """
    options = {key: value for key, value in message.get("options", {}).items() if key not in REDRIVE_DROPPED_OPTIONS}
    options["redis_message_id"] = redis_message_id
    return {**message, "queue_name": queue, "options": options}


# --------------------------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class QueueStatus:
    """A queue's counts at one moment.

    Parameters:
      queue: The queue name.
      waiting: Messages in the queue's list, ready for a worker.
      delayed: Scheduled retries not yet due, in the delay queue or already prefetched by a worker.
      in_flight: Messages a worker fetched from the queue and has not acknowledged yet.
      dead_lettered: Messages in the dead-letter set.
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

    def summary(self) -> dict[str, Any]:
        """Return the counts as a JSON-ready dict."""
        return {
            "waiting": self.waiting,
            "delayed": self.delayed,
            "in_flight": self.in_flight,
            "dead_lettered": self.dead_lettered,
            "completed": self.completed,
            "failed": self.failed,
            "counting_since": iso_time(self.counting_since_ms),
        }


def queue_status(client: redis.Redis, namespace: str, queue: str) -> QueueStatus:
    """Read queue's counts (`whiskypay.queue_stats.queue_counts`) and its outcome counters from Redis."""
    from middleware.outcome_counters import stats_key
    from whiskypay.queue_stats import queue_counts

    counts = queue_counts(client, namespace, queue)
    completed, failed, started_at = client.hmget(stats_key(namespace, queue), ["completed", "failed", "started_at"])
    return QueueStatus(
        queue=queue,
        waiting=counts.waiting,
        delayed=counts.delayed,
        in_flight=counts.in_flight,
        dead_lettered=counts.dead_letters,
        completed=int(completed or 0),
        failed=int(failed or 0),
        counting_since_ms=int(started_at) * 1000 if started_at else None,
    )


def iter_dead_letters(
    client: redis.Redis, namespace: str, queue: str, *, newest_first: bool = True, limit: int | None = None
) -> Iterator[DeadLetter]:
    """Yield queue's dead letters in the order they were dead-lettered, reading BATCH_SIZE per round trip.

    Parameters:
      newest_first: Newest first (for reading) or oldest first (for re-driving in the original order).
      limit: The most to yield; None for all.
    """
    xq = f"{namespace}:{queue}.XQ"
    end = -1 if limit is None else limit - 1
    ids = cast(list[tuple[bytes, float]], client.zrange(xq, 0, end, desc=newest_first, withscores=True))
    for start in range(0, len(ids), BATCH_SIZE):
        batch = ids[start : start + BATCH_SIZE]
        raws = cast(list[bytes | None], client.hmget(f"{xq}.msgs", [redis_id for redis_id, _ in batch]))
        for (redis_id, score), raw in zip(batch, raws, strict=True):
            if raw is not None:  # re-driven or expired since the ZRANGE
                yield decode_dead_letter(queue, _text(redis_id), raw, int(score))


def redrive(client: redis.Redis, namespace: str, letter: DeadLetter, *, new_id: str | None = None) -> RedriveResult:
    """Move one readable dead letter back onto its queue atomically (REDRIVE_LUA); return what happened.

    Parameters:
      letter: A readable dead letter (`letter.message` is not None).
      new_id: Its new Redis id; a fresh uuid4 by default.
    """
    if letter.message is None:
        raise ValueError(f"dead letter {letter.redis_id} is unreadable ({letter.problem}); it cannot be re-driven")
    new_id = new_id or str(uuid.uuid4())
    data = encode_message(redriven(letter.message, queue=letter.queue, redis_message_id=new_id))
    base = f"{namespace}:{letter.queue}"
    script = client.register_script(REDRIVE_LUA)
    moved = int(script(keys=[f"{base}.XQ", f"{base}.XQ.msgs", f"{base}.msgs", base],
                       args=[letter.redis_id, letter.raw, new_id, data]))
    return {1: "re-driven", 0: "gone", -1: "changed"}[moved]  # type: ignore[return-value]


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
    client, namespace = _connect()
    with client:
        statuses = [queue_status(client, namespace, queue) for queue in _queues(args)]
    if args.json:
        print(json.dumps({"namespace": namespace, "queues": {s.queue: s.summary() for s in statuses}}, indent=2))
        return 0
    headers = ("QUEUE", "WAITING", "DELAYED", "IN FLIGHT", "DEAD-LETTERED", "COMPLETED", "FAILED", "COUNTING SINCE")
    rows = [
        (s.queue, s.waiting, s.delayed, s.in_flight, s.dead_lettered, s.completed, s.failed,
         format_time(s.counting_since_ms) if s.counting_since_ms else "not started")
        for s in statuses
    ]
    print(format_table(headers, rows, right=range(1, 7)))
    return 0


def failed_rows(letters: Iterable[DeadLetter]) -> list[tuple[object, ...]]:
    """Return the `whiskypay failed` table rows of letters (error text shortened to ERROR_COLUMN_CHARS)."""
    return [
        (letter.message_id, letter.actor, letter.queue, format_time(letter.failed_at_ms), letter.attempts,
         letter.callback_host, letter.buyer, shorten(letter.error or "-", ERROR_COLUMN_CHARS))
        for letter in letters
    ]


@_reports_errors
def failed_command(args: argparse.Namespace) -> int:
    """Print the dead letters, newest first: id, actor, queue, time, attempts, host, masked buyer, last error."""
    client, namespace = _connect()
    with client:
        letters: list[DeadLetter] = []
        total = 0
        for queue in _queues(args):
            total += int(client.zcard(f"{namespace}:{queue}.XQ"))
            letters += iter_dead_letters(client, namespace, queue, limit=args.limit)
    letters.sort(key=lambda letter: letter.failed_at_ms, reverse=True)
    letters = letters[: args.limit]
    if args.json:
        print(json.dumps({"total": total, "dead_letters": [letter.summary() for letter in letters]}, indent=2))
        return 0
    if not letters:
        print("No dead letters.")
        return 0
    headers = ("MESSAGE ID", "ACTOR", "QUEUE", "FAILED AT", "ATTEMPTS", "HOST", "BUYER", "LAST ERROR")
    print(format_table(headers, failed_rows(letters), right=(4,)))
    if total > len(letters):
        print(f"({len(letters)} of {total} shown, newest first; use --limit to see more)")
    return 0


@_reports_errors
def retry_command(args: argparse.Namespace) -> int:
    """Re-drive dead letters of one queue onto it with a fresh attempt count; print what moved."""
    client, namespace = _connect()
    requested = frozenset(args.id or ())
    found: set[str] = set()
    rows: list[tuple[object, ...]] = []
    counts: dict[str, int] = {}
    try:
        with client:
            for letter in iter_dead_letters(client, namespace, args.queue, newest_first=False):
                if requested:
                    matches = requested & {letter.message_id, letter.redis_id}
                    if not matches:
                        continue
                    found |= matches
                if letter.message is None:
                    result = "unreadable"
                elif args.dry_run:
                    result = "would re-drive"
                else:
                    result = redrive(client, namespace, letter)
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
    print(f"{verb} {moved} dead letter(s) onto {args.queue}" + (" (dry run: nothing moved)." if args.dry_run else "."))
    if counts.get("unreadable"):
        print(f"Skipped {counts['unreadable']} unreadable dead letter(s); they stay in the dead-letter queue.")
    return 1 if missing_ids or counts.get("unreadable") or counts.get("changed") else 0


#: How retry_command names each result in its table.
RESULT_TEXT = {
    "re-driven": "re-driven",
    "would re-drive": "would re-drive",
    "gone": "gone (moved by another run, or expired)",
    "changed": "skipped (changed while read)",
    "unreadable": "skipped (unreadable JSON, left in place)",
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the status, failed and retry subcommands."""
    queues = [str(queue) for queue in Queue]

    status = commands.add_parser("status", help="queue depths, dead letters and completed/failed counters")
    status.add_argument("--queue", choices=queues, help="only this queue (default: all)")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(handler=status_command)

    failed = commands.add_parser("failed", help="list dead-lettered messages, newest first")
    failed.add_argument("--queue", choices=queues, help="only this queue (default: all)")
    failed.add_argument("--limit", type=_positive, default=DEFAULT_FAILED_LIMIT,
                        help=f"show at most this many (default: {DEFAULT_FAILED_LIMIT})")
    failed.add_argument("--json", action="store_true", help="print JSON for scripts")
    failed.set_defaults(handler=failed_command)

    retry = commands.add_parser("retry", help="re-drive dead letters onto their queue with a fresh attempt count")
    retry.add_argument("--queue", choices=queues, required=True, help="the queue whose dead letters to re-drive")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="extend", nargs="+", metavar="ID", help="message ids from `whiskypay failed`")
    which.add_argument("--all", action="store_true", help="every dead letter of the queue")
    retry.add_argument("--dry-run", action="store_true", help="show what would move; move nothing")
    retry.set_defaults(handler=retry_command)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value
