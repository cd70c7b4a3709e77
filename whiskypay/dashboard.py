"""The dashboard's WSGI app: dramatiq-dashboard for our broker, behind HTTP basic auth, every page scrubbed.

`whiskypay dashboard` (whiskypay/cli/dashboard.py) serves it with waitress. dramatiq-dashboard 0.4.0 declares
`dramatiq<2` and `redis<5`; it is installed with `pip install --no-deps` next to our Dramatiq 2 and redis-py
(docs/dashboard.md says why and what was checked). It lists only the queues declared in its own process, so the
command imports `actors` (which builds the broker from settings and declares both queues) before `build_app`.

The WSGI stack, outermost first:

    BasicAuth       401 + WWW-Authenticate unless the request carries the configured credentials
    ScrubPages      masks email addresses, redacts secrets and query strings in every page; forbids framing and caching
    DashboardApp    dramatiq-dashboard itself (its own CSRF token guards the requeue and delete forms)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import ipaddress
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from whiskypay.redaction import mask_email

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

# The query string or fragment of an http(s) URL in an HTML page, up to the closing quote (raw or escaped).
_URL_QUERY = re.compile(r"(https?://[^\s'\"<>?#&]+)[?#][^\s\"'<>]*?(?=&#39;|&#34;|&quot;|&lt;|&gt;|[\s'\"<>]|$)")


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
    return _URL_QUERY.sub(r"\1?…", mask_email(text))


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
        captured: list[Any] = []
        chunks: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured[:] = [status, headers, exc_info]
            return chunks.append

        result = self.app(environ, capture)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers, exc_info = captured
        body = b"".join(chunks)
        content_type = next((value for name, value in headers if name.lower() == "content-type"), "")
        if content_type.startswith("text/"):
            body = scrub_page(body.decode("utf-8", errors="replace"), self.secrets).encode()
        kept = [(name, value) for name, value in headers if name.lower() != "content-length"]
        start_response(status, [*kept, ("Content-Length", str(len(body))), *SECURITY_HEADERS], exc_info)
        return [body]


def build_app(broker: RedisBroker, *, username: str, password: str, secrets: Iterable[str] = ()) -> WSGIApplication:
    """Return the dashboard's WSGI application for broker, behind basic auth and page scrubbing.

    Parameters:
        broker: our RedisBroker, with both queues already declared (import `actors` first).
        username: the basic-auth username.
        password: the basic-auth password (also redacted from pages).
        secrets: further values never to show in a page.
    """
    from dramatiq_dashboard import DashboardApp

    dashboard: WSGIApplication = DashboardApp(broker=broker, prefix="")
    scrubbed = ScrubPages(dashboard, secrets=(*secrets, password))
    return BasicAuth(scrubbed, username=username, password=password)


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
