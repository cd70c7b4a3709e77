"""The dashboard's WSGI app: the operator console and dramatiq-dashboard, behind basic auth, CSRF-checked, scrubbed.

`whiskypay dashboard` (whiskypay/cli/dashboard.py) serves it with waitress. The operator console
(whiskypay/console/: overview, merchants, events, dead letters) answers every path but /dramatiq/, where
dramatiq-dashboard is mounted for raw queue inspection. dramatiq-dashboard 0.4.0 declares
`dramatiq<2` and `redis<5`; it is installed with `pip install --no-deps` next to our Dramatiq 2 and redis-py
(docs/dashboard.md says why and what was checked). It lists only the queues declared in its own process, so the
command imports `actors` (which builds the broker from settings and declares both queues) before `build_app`.

The WSGI stack, outermost first:

    BasicAuth       401 + WWW-Authenticate unless the request carries the configured credentials
    ScrubPages      masks email addresses, redacts secrets and query strings in every page and JSON answer; forbids
                    framing and caching
    CsrfCheck       403 for a POST without the console's token (form field `csrf_token` or header X-CSRF-Token), or
                    from another origin; every state-changing request is a POST
    Mount           /dramatiq/... to dramatiq-dashboard (our token added to its forms), everything else to the console
    Console         whiskypay.console.app
    DashboardApp    dramatiq-dashboard itself (its own CSRF token also guards requeue and delete), with three changes
                    (`dashboard_app_class`): every message it shows has its address fields masked by their structure
                    and its URLs cut before the query string, and Requeue re-drives a dead letter with the same
                    atomic script as `whiskypay retry` (two clicks re-drive it once; a Redis error changes nothing)
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import html
import io
import ipaddress
import re
import secrets as random_tokens
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from whiskypay.redaction import known_addresses, mask_arguments, mask_email, masked_sample, scrub

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from dramatiq.brokers.redis import RedisBroker

#: The dramatiq-dashboard release this module was written and tested against.
DASHBOARD_VERSION = "0.4.0"

#: The realm browsers show in their login prompt.
REALM = "WhiskyPay dashboard"

#: Headers added to every response: no framing (the pages carry requeue/delete buttons), no caching, no referrer.
SECURITY_HEADERS = (
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
)

# An http(s) URL in a page up to its query string or fragment. Its path may hold HTML entities (the page escapes
# & and ' to &amp; and &#39;): they are part of the path, not its end.
_URL_QUERY = re.compile(r"(?i)(https?://(?:&#?\w+;|[^\s'\"<>?#])+)[?#][^\s'\"<>]*")
# What may follow the cut query string and is kept: the quote that closed the URL's string, and punctuation.
_QUOTE_TAIL = re.compile(r"(?:&#39;|&#x27;|&#34;|&quot;|&#x22;)[,:;)\]}]*$")


def _cut_query(match: re.Match[str]) -> str:
    # The query runs to the next space, tag or raw quote, so an escaped quote inside it cannot end it early;
    # an escaped quote at its very end (the string's closing quote) is put back.
    tail = _QUOTE_TAIL.search(match.group(0)[len(match.group(1)) :])
    return match.group(1) + "?…" + (tail.group(0) if tail else "")



def run_buffered(
    app: WSGIApplication, environ: WSGIEnvironment
) -> tuple[str, list[tuple[str, str]], Any, bytes]:
    """Run a WSGI app and return its status, headers, exc_info and whole body (closing its iterable)."""
    captured: list[Any] = []
    chunks: list[bytes] = []

    def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured[:] = [status, headers, exc_info]
        return chunks.append

    result = app(environ, capture)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers, exc_info = captured
    return status, headers, exc_info, b"".join(chunks)

class BasicAuth:
    """WSGI middleware that answers 401 unless the request carries the right HTTP basic credentials.

    Both the username and the password are compared with `hmac.compare_digest`, and both comparisons always run,
    so the time taken does not reveal which one was wrong or how much of it matched.

    Parameters:
        app: the WSGI application to protect.
        username: the expected username.
        password: the expected password.
        realm: the realm named in the WWW-Authenticate challenge.
    """

    def __init__(self, app: WSGIApplication, *, username: str, password: str, realm: str = REALM) -> None:
        if not username or not password:
            raise ValueError("BasicAuth needs a non-empty username and password")
        self.app = app
        self._username = username.encode()
        self._password = password.encode()
        self._challenge = f'Basic realm="{realm}", charset="UTF-8"'

    def authorized(self, header: str) -> bool:
        """Return True if an Authorization header value carries the expected credentials.

        Parameters:
            header: the raw Authorization header ("Basic <base64 of user:password>"), or "".
        """
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        username, colon, password = decoded.partition(b":")
        user_ok = hmac.compare_digest(username, self._username)
        password_ok = hmac.compare_digest(password, self._password)
        return bool(colon) and user_ok and password_ok

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.authorized(environ.get("HTTP_AUTHORIZATION", "")):
            return self.app(environ, start_response)
        body = b"Authentication required.\n"
        start_response("401 Unauthorized", [
            ("WWW-Authenticate", self._challenge),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *SECURITY_HEADERS,
        ])  # fmt: skip
        return [body]


def scrub_page(text: str, secrets: Iterable[str] = ()) -> str:
    """Return an HTML or text page with secrets redacted, emails masked and URL query strings cut.

    Parameters:
        text: the page as the dashboard rendered it (HTML-escaped).
        secrets: exact secret values; each is replaced, raw and HTML-escaped, by "[redacted]".
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "[redacted]").replace(html.escape(secret), "[redacted]")
    return _URL_QUERY.sub(_cut_query, mask_email(text))


class ScrubPages:
    """WSGI middleware that passes every text page through `scrub_page` and adds `SECURITY_HEADERS`.

    dramatiq-dashboard renders message arguments and options as they are stored: the buyer's email address and the
    callback URL are arguments of `send_callback`. Our messages carry no secrets by design; the secret values are
    redacted here as a second line of defence.

    Parameters:
        app: the WSGI application whose responses are scrubbed.
        secrets: exact secret values never to show (Redis password, webhook secret, SMTP password, ...).
    """

    def __init__(self, app: WSGIApplication, *, secrets: Iterable[str] = ()) -> None:
        self.app = app
        self.secrets = tuple(s for s in secrets if s)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        status, headers, exc_info, body = run_buffered(self.app, environ)
        content_type = next((value for name, value in headers if name.lower() == "content-type"), "")
        if content_type.startswith(("text/", "application/json")):
            body = scrub_page(body.decode("utf-8", errors="replace"), self.secrets).encode()
        kept = [(name, value) for name, value in headers if name.lower() != "content-length"]
        start_response(status, [*kept, ("Content-Length", str(len(body))), *SECURITY_HEADERS], exc_info)
        return [body]


#: The largest form body CsrfCheck reads, in bytes (a re-drive of a full page of selected dead letters is ~10 KiB).
MAX_FORM_BYTES = 1024 * 1024

#: The form field (or header X-CSRF-Token) that carries the console's token.
CSRF_FIELD = "csrf_token"


def _plain(status: str, text: str) -> tuple[str, list[tuple[str, str]], list[bytes]]:
    body = text.encode()
    return status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))], [body]


class CsrfCheck:
    """WSGI middleware that refuses (403) every POST without the right CSRF token, or sent from another origin.

    The token is random per app instance, compared with `hmac.compare_digest`, and carried by every form of the
    console (and added to dramatiq-dashboard's by `Mount`); a page from another site cannot read it. A POST's form
    body (at most MAX_FORM_BYTES) is parsed here and left in environ["whiskypay.form"], and put back in wsgi.input.

    Parameters:
        app: the WSGI application to protect.
        token: the token; a fresh random one by default.
    """

    def __init__(self, app: WSGIApplication, *, token: str | None = None) -> None:
        self.app = app
        self.token = token or random_tokens.token_urlsafe(32)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_FORM_BYTES:
            status, headers, body = _plain("413 Content Too Large", "The form is too large.\n")
            start_response(status, headers)
            return body
        raw = environ["wsgi.input"].read(length) if length else b""
        form = urllib.parse.parse_qs(raw.decode("utf-8", errors="replace"), keep_blank_values=True)
        given = environ.get("HTTP_X_CSRF_TOKEN") or (form.get(CSRF_FIELD) or [""])[0]
        # Under Referrer-Policy: no-referrer browsers send "Origin: null" with a form: only a named origin is checked.
        origin = environ.get("HTTP_ORIGIN") or "null"
        same_origin = origin == "null" or urllib.parse.urlsplit(origin).netloc == environ.get("HTTP_HOST")
        if not (hmac.compare_digest(given.encode(), self.token.encode()) and same_origin):
            status, headers, body = _plain("403 Forbidden", "Refused: this POST lacks the page's CSRF token (or came "
                                           "from another site). Reload the page and submit its form again.\n")
            start_response(status, headers)
            return body
        environ = {**environ, "wsgi.input": io.BytesIO(raw), "whiskypay.form": form}
        return self.app(environ, start_response)


#: A POST form's opening tag in a dramatiq-dashboard page.
_POST_FORM = re.compile(r'(<form\b[^>]*\bmethod="POST"[^>]*>)', re.IGNORECASE)


class Mount:
    """WSGI dispatcher: /dramatiq/... to dramatiq-dashboard (prefix stripped, our CSRF token added to its POST
    forms), every other path to the console.

    Parameters:
        console: the console's WSGI app.
        dramatiq: dramatiq-dashboard's app (built with prefix), or None where it is not installed.
        token: the CSRF token to add to its forms.
        prefix: where it is mounted.
    """

    def __init__(self, console: WSGIApplication, dramatiq: WSGIApplication | None, *, token: str,
                 prefix: str = "/dramatiq") -> None:  # fmt: skip
        self.console = console
        self.dramatiq = dramatiq
        self.field = f'<input type="hidden" name="{CSRF_FIELD}" value="{html.escape(token)}">'
        self.prefix = prefix

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            return self.console(environ, start_response)
        if self.dramatiq is None:
            missing = _plain("404 Not Found", "dramatiq-dashboard is not installed (docs/dashboard.md).\n")
            start_response(missing[0], missing[1])
            return missing[2]
        inner = {**environ, "PATH_INFO": path[len(self.prefix) :] or "/"}
        status, headers, exc_info, page = run_buffered(self.dramatiq, inner)
        if any(name.lower() == "content-type" and value.startswith("text/html") for name, value in headers):
            page = _POST_FORM.sub(lambda m: m.group(1) + self.field, page.decode("utf-8", "replace")).encode()
        kept = [(name, value) for name, value in headers if name.lower() != "content-length"]
        start_response(status, [*kept, ("Content-Length", str(len(page)))], exc_info)
        return [page]


def masked_message(message: Any, secrets: tuple[str, ...] = ()) -> Any:
    """Return a copy of a Dramatiq message safe to show: address fields masked by their structure, URL fields cut
    before their query string, every other argument and option scrubbed, an undecodable message's raw sample masked.

    Parameters:
        message: a `dramatiq.Message` as read from Redis.
        secrets: exact values never to show.
    """
    kwargs = message.kwargs if isinstance(message.kwargs, dict) else {}
    addresses = known_addresses(kwargs)
    options: dict[str, Any] = {}
    for name, value in message.options.items():
        if name == "raw_base64" and isinstance(value, str):  # placeholders written before raw_sample existed
            try:
                options[name] = masked_sample(base64.b64decode(value), secrets)
            except (binascii.Error, ValueError):
                options[name] = "[unreadable]"
        elif name != "redis_message_id":
            options[name] = scrub(value, secrets, addresses)
    return message.copy(
        args=tuple(scrub(arg, secrets, addresses) for arg in message.args or ()),
        kwargs=mask_arguments(kwargs, secrets) if isinstance(message.kwargs, dict) else {},
        options=options,
    )


@functools.cache
def dashboard_app_class() -> type:
    """Return dramatiq-dashboard's DashboardApp with masked messages and an atomic Requeue (imported on first use).

    The app takes `(broker, prefix, secrets)`.
    """
    import redis
    from dramatiq.common import q_name, xq_name
    from dramatiq_dashboard import DashboardApp
    from dramatiq_dashboard.csrf import csrf_protect
    from dramatiq_dashboard.http import HTTP_405, HTTP_410, handler, redirect
    from dramatiq_dashboard.interface import Job, RedisInterface

    from whiskypay import keys
    from whiskypay.dead_letters import DeadLetter, decode_dead_letter, delete_dead_letter, redrive

    class MaskedInterface(RedisInterface):  # type: ignore[misc]
        def __init__(self, broker: RedisBroker, secrets: tuple[str, ...]) -> None:
            super().__init__(broker)
            self.secrets = secrets

        def _masked(self, job: Any) -> Any:
            return Job.from_message(masked_message(job.message, self.secrets))

        def get_jobs(self, queue_name: str, cursor: int = 0) -> tuple[int | None, list[Any]]:
            next_cursor, jobs = super().get_jobs(queue_name, cursor)
            return next_cursor, [self._masked(job) for job in jobs]

        def get_job(self, queue_name: str, message_id: str) -> Any:
            job = super().get_job(queue_name, message_id)
            return job and self._masked(job)

    class WhiskyPayDashboard(DashboardApp):  # type: ignore[misc]
        def __init__(self, broker: RedisBroker, prefix: str, secrets: tuple[str, ...] = ()) -> None:
            super().__init__(broker, prefix)
            self.iface = MaskedInterface(broker, secrets)

        def _posted_dead_letter(self, req: Any, verb: str) -> DeadLetter | tuple[str, str]:
            """Read the dead letter a POST names (its queue and id), or the error response; raises RedisError."""
            queue, redis_id = req.post_data.get("queue", ""), req.post_data.get("id", "")
            if queue != xq_name(queue) or not redis_id:
                return "409 Conflict", f"Only dead letters (a queue's Failed tab) can be {verb}."
            client, namespace = self.broker.client, self.broker.namespace
            raw = client.hget(keys.dead_letter_messages(namespace, q_name(queue)), redis_id)
            score = client.zscore(keys.dead_letters(namespace, q_name(queue)), redis_id)
            if raw is None or score is None:
                return HTTP_410, "This dead letter no longer exists: it was requeued or deleted already."
            return decode_dead_letter(q_name(queue), redis_id, raw, int(score))

        @handler  # type: ignore[untyped-decorator]
        @csrf_protect  # type: ignore[untyped-decorator]
        def requeue_message(self, req: Any) -> Any:
            # dramatiq-dashboard's own requeue reads the message, deletes it, then enqueues a copy: two clicks
            # enqueue it twice, and a failed enqueue after the delete loses it. This re-drives it with the one
            # Lua script `whiskypay retry` uses: moved once, or not at all.
            if req.method != "POST":
                return HTTP_405, "Expected a POST request."
            queue = req.post_data.get("queue", "")
            client, namespace = self.broker.client, self.broker.namespace
            try:
                letter = self._posted_dead_letter(req, "requeued")
                if not isinstance(letter, DeadLetter):
                    return letter
                if letter.message is None:
                    return "409 Conflict", f"This dead letter is unreadable ({letter.problem}); it stays where it is."
                if letter.erased:  # as `whiskypay retry` skips it: its job cannot run without the address
                    return "409 Conflict", ("`whiskypay forget` erased this dead letter's address, so it cannot "
                                            "run again; it stays listed as a record of the failure.")
                new_id = str(uuid.uuid4())
                result = redrive(client, namespace, letter, new_id=new_id)
            except redis.RedisError as exc:
                return (
                    "503 Service Unavailable",
                    f"Redis refused the requeue ({type(exc).__name__}); the dead letter is unchanged. "
                    "Try again once Redis accepts writes.",
                )
            if result == "gone":
                return HTTP_410, "This dead letter no longer exists: it was requeued or deleted already."
            if result == "changed":
                return "409 Conflict", "This dead letter changed while it was read; reload the page and try again."
            return redirect(self.make_uri("queues", q_name(queue), "standard", new_id))

        @handler  # type: ignore[untyped-decorator]
        @csrf_protect  # type: ignore[untyped-decorator]
        def delete_message(self, req: Any) -> Any:
            # Deletes only dead letters, with the same check-and-delete script as the console's Delete.
            if req.method != "POST":
                return HTTP_405, "Expected a POST request."
            queue = req.post_data.get("queue", "")
            try:
                letter = self._posted_dead_letter(req, "deleted here")
                if not isinstance(letter, DeadLetter):
                    return letter
                result = delete_dead_letter(self.broker.client, self.broker.namespace, letter)
            except redis.RedisError as exc:
                return "503 Service Unavailable", f"Redis refused the delete ({type(exc).__name__}); nothing changed."
            if result != "deleted":
                return "409 Conflict", "This dead letter changed or went away while it was read; reload the page."
            return redirect(self.make_uri("queues", q_name(queue), "failed"))

    return WhiskyPayDashboard


def build_app(
    broker: RedisBroker, *, username: str, password: str, secrets: Iterable[str] = (), with_dramatiq: bool = True
) -> WSGIApplication:
    """Return the dashboard's WSGI application for broker: console and dramatiq-dashboard, auth, CSRF, scrubbing.

    Parameters:
        broker: our RedisBroker, with its queues already declared (import `actors` first).
        username: the basic-auth username.
        password: the basic-auth password (also redacted from pages).
        secrets: further values never to show in a page.
        with_dramatiq: mount dramatiq-dashboard at /dramatiq/ (it must be installed).
    """
    from dramatiq.common import q_name

    from whiskypay.console.app import Console

    hidden = tuple(s for s in (*secrets, password) if s)
    token = random_tokens.token_urlsafe(32)
    queues = sorted({q_name(name) for name in broker.get_declared_queues()})
    console = Console(broker.client, broker.namespace, queues, csrf_token=token, resend=ledger_resend())
    dashboard: WSGIApplication | None = dashboard_app_class()(broker, "/dramatiq", hidden) if with_dramatiq else None
    app = CsrfCheck(Mount(console, dashboard, token=token), token=token)
    return BasicAuth(ScrubPages(app, secrets=hidden), username=username, password=password)


def ledger_resend() -> Any:
    """Return the ledger's resend of one payment, `resend(client, namespace, payment) -> str`, or None without it."""
    try:
        from whiskypay.cli import ledger  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    return getattr(ledger, "resend_payment", None)


def is_loopback(host: str) -> bool:
    """Return True if binding host only accepts connections from this machine.

    Parameters:
        host: an IP address or host name as given to --host.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
