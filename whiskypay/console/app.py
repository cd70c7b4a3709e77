"""The operator console's WSGI app: server-rendered pages (Jinja2), their JSON twins, and the POST actions.

Routes (GET unless said; `?format=json` gives a page's data as JSON, the objects of the CLI's `--json`):

    /                         overview: per queue waiting, delayed, in flight, parked, dead-lettered, oldest wait;
                              delivered / failed per minute over the last hour; delivery latency p50 / p95
    /merchants                every merchant with counters or a breaker (?sort=merchant|deliveries|failure_rate|...)
    /merchants/<merchant>     its breaker, recent payments and dead letters; re-drive all, resend
    /events                   search (?q= event id / webhook-id / message id, ?merchant=, ?state=, ?cursor=)
    /events/<id>              one payment: the webhook's attempts as a timeline, both emails, Resend / Re-drive
    /dead-letters             ?queue=, ?merchant=, ?cursor=; re-drive selected / all, delete with confirmation
    POST /dead-letters/redrive       refs=queue:redis_id ...  (each re-driven atomically, like `whiskypay retry`)
    POST /dead-letters/redrive-all   queue=, merchant=
    POST /dead-letters/delete        refs=...; without confirm=yes it answers the confirmation page
    POST /events/<id>/resend         the ledger's resend (issue 11), where it is installed
    /static/<file>            the console's CSS (shipped in the package)
    /dramatiq/...             dramatiq-dashboard (mounted by whiskypay.dashboard.build_app)

Every POST has passed `CsrfCheck` (whiskypay.dashboard) before it gets here.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from whiskypay.console import data

if TYPE_CHECKING:
    import redis
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

#: The console's templates and static files, shipped inside the package.
HERE = Path(__file__).resolve().parent
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}

#: The ledger states /events filters by.
STATES = ("pending", "retrying", "delivered", "sent", "failed", "parked")

#: The environ key CsrfCheck leaves the parsed form under.
FORM_KEY = "whiskypay.form"


def _time(ms: object) -> str:
    if not isinstance(ms, int | float) or not ms:
        return "–"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(ms: object) -> str:
    if not isinstance(ms, int | float):
        return "–"
    if ms < 1000:
        return f"{int(ms)} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.0f} min"
    return f"{ms / 3_600_000:.1f} h"


def _percent(value: object) -> str:
    return f"{value * 100:.1f} %" if isinstance(value, int | float) else "–"


def environment() -> jinja2.Environment:
    """Return the console's template environment (autoescaped, undefined names are errors)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)  # fmt: skip
    env.filters.update(time=_time, duration=_duration, percent=_percent, q=urllib.parse.quote)
    return env


class Response:
    """One answer: status, headers, body."""

    def __init__(self, body: bytes | str, *, status: str = "200 OK", content_type: str = "text/html; charset=utf-8",
                 headers: Iterable[tuple[str, str]] = ()) -> None:  # fmt: skip
        self.body = body.encode() if isinstance(body, str) else body
        self.status = status
        self.headers = [("Content-Type", content_type), ("Content-Length", str(len(self.body))), *headers]


def redirect(location: str) -> Response:
    """303 See Other to a local path (after a POST)."""
    return Response(b"", status="303 See Other", content_type="text/plain", headers=[("Location", location)])


def local_path(value: str, default: str) -> str:
    """Return value if it is a path on this site ("/..." but not "//host"), else default."""
    return value if value.startswith("/") and not value.startswith("//") and "\\" not in value else default


def with_notice(path: str, notice: str) -> str:
    """Return path with `notice=` set (shown once by the page it leads to)."""
    parts = urllib.parse.urlsplit(path)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "notice"] + [("notice", notice)]
    return urllib.parse.urlunsplit(("", "", parts.path, urllib.parse.urlencode(query), ""))


def counts_text(counts: dict[str, int], verb: str) -> str:
    """Return "Re-driven 3; gone 1." for a result count."""
    if not counts:
        return f"Nothing to {verb}."
    return "; ".join(f"{name} {count}" for name, count in sorted(counts.items())) + "."


class Console:
    """The console's WSGI application.

    Parameters:
        client: a Redis client on the broker's Redis.
        namespace: the broker namespace.
        queues: the declared queues (canonical names).
        csrf_token: the token every form carries (CsrfCheck checks it).
        resend: the ledger's resend, `resend(client, namespace, payment) -> str`, or None where not installed.
    """

    def __init__(self, client: redis.Redis, namespace: str, queues: Iterable[str], *, csrf_token: str,
                 resend: Callable[..., str] | None = None) -> None:  # fmt: skip
        self.client = client
        self.namespace = namespace
        self.queues = sorted(queues)
        self.csrf_token = csrf_token
        self.resend = resend
        self.env = environment()

    # ---------------------------------------------------------------------------------------------------- plumbing

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        form: dict[str, list[str]] = environ.get(FORM_KEY, {})
        try:
            response = self.route(method, path, query, form)
        except Exception as exc:  # a Redis error, a bug: say so, never a traceback (it may hold data)
            import redis

            if not isinstance(exc, redis.RedisError):
                raise
            response = self.page("error.html", {"error": f"Redis refused the request ({type(exc).__name__}); nothing "
                                                "was changed by this page. Try again once Redis answers."},
                                 status="503 Service Unavailable")  # fmt: skip
        start_response(response.status, response.headers)
        return [response.body]

    def page(self, template: str, context: dict[str, Any], *, status: str = "200 OK") -> Response:
        """Render template with the common context (nav, CSRF token, notice)."""
        here = {"overview.html": "overview", "merchants.html": "merchants", "merchant.html": "merchants",
                "events.html": "events", "event.html": "events"}.get(template, "dead-letters")
        context.setdefault("notice", "")
        body = self.env.get_template(template).render(csrf_token=self.csrf_token, queues=self.queues,
                                                      states=STATES, here=here, **context)  # fmt: skip
        return Response(body, status=status)

    def twin(self, query: dict[str, str], template: str, context: dict[str, Any], json_data: object) -> Response:
        """The page, or its JSON twin when `?format=json`."""
        if query.get("format") == "json":
            return Response(json.dumps(json_data, indent=2, default=str), content_type="application/json")
        return self.page(template, {"notice": query.get("notice", ""), **context})

    def route(self, method: str, path: str, query: dict[str, str], form: dict[str, list[str]]) -> Response:
        """Dispatch one request."""
        parts = [urllib.parse.unquote(part) for part in path.strip("/").split("/")] if path != "/" else []
        if parts[:1] == ["static"] and len(parts) == 2 and method == "GET":
            return self.static(parts[1])
        if method == "POST":
            return self.post(parts, form)
        if method not in ("GET", "HEAD"):
            return Response("Method not allowed.\n", status="405 Method Not Allowed", content_type="text/plain")
        if not parts:
            return self.overview(query)
        if parts == ["merchants"]:
            return self.merchants(query)
        if parts[0] == "merchants" and len(parts) == 2:
            return self.merchant(parts[1], query)
        if parts == ["events"]:
            return self.events(query)
        if parts[0] == "events" and len(parts) == 2:
            return self.event(parts[1], query)
        if parts == ["dead-letters"]:
            return self.dead_letters(query)
        return self.page("error.html", {"error": f"No page at {path}."}, status="404 Not Found")

    def static(self, name: str) -> Response:
        """Serve one of the console's own static files."""
        file = HERE / "static" / name
        if "/" in name or name.startswith(".") or file.suffix not in STATIC_TYPES or not file.is_file():
            return Response("Not found.\n", status="404 Not Found", content_type="text/plain")
        return Response(file.read_bytes(), content_type=STATIC_TYPES[file.suffix])

    # ---------------------------------------------------------------------------------------------------- pages

    def overview(self, query: dict[str, str]) -> Response:
        view = data.overview(self.client, self.namespace, self.queues)
        peak = max([1] + [point["delivered"] + point["failed"] for point in view["chart"]])
        return self.twin(query, "overview.html", {"view": view, "peak": peak, "no_ledger": data.NO_LEDGER}, view)

    def merchants(self, query: dict[str, str]) -> Response:
        sort = query.get("sort", "state")
        rows = data.merchants(self.client, self.namespace, self.queues, sort=sort)
        return self.twin(query, "merchants.html", {"rows": rows, "sort": sort, "sorts": data.MERCHANT_SORTS},
                         {"merchants": rows})  # fmt: skip

    def merchant(self, merchant: str, query: dict[str, str]) -> Response:
        rows = [row for row in data.merchants(self.client, self.namespace, self.queues) if row["merchant"] == merchant]
        payments = data.events(self.client, self.namespace, merchant=merchant)
        letters = data.dead_letters(self.client, self.namespace, self.queues, merchant=merchant,
                                    scan=data.MERCHANT_SCAN)  # fmt: skip
        view = {"merchant": merchant, "summary": rows[0] if rows else None, "payments": payments,
                "dead_letters": letters}  # fmt: skip
        return self.twin(query, "merchant.html", {**view, "no_ledger": data.NO_LEDGER,
                                                  "can_resend": self.resend is not None}, view)  # fmt: skip

    def events(self, query: dict[str, str]) -> Response:
        cursor = int(query["cursor"]) if query.get("cursor", "").isdigit() else 0
        filters = {name: query.get(name, "").strip() for name in ("q", "merchant", "state")}
        view = data.events(self.client, self.namespace, query=filters["q"], merchant=filters["merchant"],
                           state=filters["state"], cursor=cursor)  # fmt: skip
        return self.twin(query, "events.html", {"view": view, "filters": filters, "no_ledger": data.NO_LEDGER,
                                                "scan_limit": data.SCAN_LIMIT}, view)  # fmt: skip

    def event(self, ident: str, query: dict[str, str]) -> Response:
        merchant = query.get("merchant", "")
        found = data.event(self.client, self.namespace, ident, merchant)
        if found is None:
            letters = [data.letter_row(letter) for queue in self.queues
                       for letter in data.letters_of_message(self.client, self.namespace, queue, ident)]  # fmt: skip
            return self.twin(query, "event.html", {"ident": ident, "payment": None, "no_ledger": data.NO_LEDGER,
                                                   "letters": letters, "ledger": False, "others": []},
                             {"event": None, "dead_letters": letters})  # fmt: skip
        if not found:
            if query.get("format") == "json":
                return Response("null", status="404 Not Found", content_type="application/json")
            return self.page("error.html", {"error": f"No payment, webhook-id or message id {ident!r} in the ledger."},
                             status="404 Not Found")  # fmt: skip
        payment = found[0]
        letters = []
        if payment.has_webhook and payment.webhook_state == "failed":
            queue = payment.fields.get("w.q", "callbackQueue")
            letters = [data.letter_row(letter) for letter in
                       data.letters_of_message(self.client, self.namespace, queue, payment.fields.get("w.mid", ""))]
        view = {"event": payment.to_json(), "dead_letters": letters}
        return self.twin(query, "event.html", {"ident": ident, "payment": payment, "view": view["event"],
                                               "letters": letters, "ledger": True, "others": found[1:],
                                               "can_resend": self.resend is not None}, view)  # fmt: skip

    def dead_letters(self, query: dict[str, str]) -> Response:
        cursor = int(query["cursor"]) if query.get("cursor", "").isdigit() else 0
        queue = query.get("queue", "") if query.get("queue", "") in self.queues else ""
        merchant = query.get("merchant", "").strip()
        view = data.dead_letters(self.client, self.namespace, self.queues, queue=queue, merchant=merchant,
                                 cursor=cursor)  # fmt: skip
        # The twin carries `whiskypay failed --json`'s keys (total, dead_letters) and the page's (totals, next...).
        twin = {"total": sum(view["totals"].values()), "dead_letters": view["rows"],
                **{key: value for key, value in view.items() if key != "rows"}}  # fmt: skip
        return self.twin(query, "dead_letters.html", {"view": view, "queue": queue, "merchant": merchant,
                                                      "scan_limit": data.SCAN_LIMIT}, twin)  # fmt: skip

    # ---------------------------------------------------------------------------------------------------- actions

    def post(self, parts: list[str], form: dict[str, list[str]]) -> Response:
        """Run one action and redirect back (303) with a notice."""
        back = local_path((form.get("back") or [""])[0], "/dead-letters")
        refs = [ref for ref in form.get("refs", []) if ":" in ref]
        if parts == ["dead-letters", "redrive"]:
            counts = data.redrive_refs(self.client, self.namespace, refs, self.queues)
            return redirect(with_notice(back, counts_text(counts, "re-drive")))
        if parts == ["dead-letters", "redrive-all"]:
            queue = (form.get("queue") or [""])[0]
            if queue not in self.queues:
                return self.page("error.html", {"error": f"Choose a queue to re-drive (got {queue!r})."},
                                 status="400 Bad Request")  # fmt: skip
            counts = data.redrive_all(self.client, self.namespace, queue, merchant=(form.get("merchant") or [""])[0])
            return redirect(with_notice(back, counts_text(counts, "re-drive")))
        if parts == ["dead-letters", "delete"]:
            if (form.get("confirm") or [""])[0] != "yes":
                return self.page("confirm_delete.html", {"refs": refs, "back": back})
            counts = data.delete_refs(self.client, self.namespace, refs, self.queues)
            return redirect(with_notice(back, counts_text(counts, "delete")))
        if len(parts) == 3 and parts[0] == "events" and parts[2] == "resend":
            if self.resend is None:
                return self.page("error.html", {"error": data.NO_LEDGER}, status="409 Conflict")
            found = data.event(self.client, self.namespace, parts[1], (form.get("merchant") or [""])[0]) or []
            if len(found) != 1:
                return self.page("error.html", {"error": f"{parts[1]!r} names {len(found)} payments."},
                                 status="409 Conflict")  # fmt: skip
            notice = self.resend(self.client, self.namespace, found[0])
            return redirect(with_notice(local_path(back, f"/events/{urllib.parse.quote(parts[1])}"), notice))
        return Response("No such action.\n", status="404 Not Found", content_type="text/plain")


def now_ms() -> int:
    """The wall clock in unix milliseconds."""
    return int(time.time() * 1000)
