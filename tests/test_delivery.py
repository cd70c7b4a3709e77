"""Tier 1: one webhook attempt against a real HTTP server on 127.0.0.1, and how each failure is classified."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from whiskypay.delivery import Attempt, post_webhook
from whiskypay.errors import DeliveryError, EndpointGone, HttpStatusError, RefusedHost
from whiskypay.netguard import GuardedAdapter

BODY = b'{"email":"buyer@example.com","plan":"Pro","price":10}'
SIGNED = {"webhook-id": "msg_1", "webhook-timestamp": "1790000000", "webhook-signature": "v1,abc="}
#: A secret in the query string and a path that must never reach an error text.
TAIL = "/secret-path-XYZ/hook?token=SECRET123"
BIG_BODY_BYTES = 50 * 1024 * 1024


@dataclass
class Receiver:
    """What the local merchant server saw."""

    port: int
    hits: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: The client port of each request: one TCP connection per distinct port.
    client_ports: list[int] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    big_body_completed: bool = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler_for(receiver: Receiver) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0].removeprefix("/secret-path-XYZ")
            receiver.hits.append(path)
            receiver.client_ports.append(self.client_address[1])
            receiver.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            receiver.headers.append({name.lower(): value for name, value in self.headers.items()})
            if path in ("/ok", "/hook"):
                self._answer(200, body=b"thanks")
            elif path == "/no-content":
                self._answer(204)
            elif path == "/unavailable":
                self._answer(503, {"Retry-After": "7"})
            elif path == "/unavailable-garbage-retry-after":
                self._answer(503, {"Retry-After": "9" * 5_000})
            elif path == "/error":
                self._answer(500)
            elif path == "/gone":
                self._answer(410)
            elif path == "/redirect":
                self._answer(302, {"Location": receiver.url("/redirect-target")})
            elif path == "/slow":
                receiver.release.wait(5)
                self._answer(200)
            elif path in ("/slow-body", "/slow-body-503", "/cut-body"):
                self.send_response(503 if path == "/slow-body-503" else 200)
                self.send_header("Content-Length", "10")
                self.end_headers()
                self.wfile.flush()
                if path == "/cut-body":
                    self.wfile.write(b"ok")  # 2 of the 10 bytes, then the connection closes
                    self.close_connection = True
                    return
                receiver.release.wait(5)
            elif path == "/big":
                self._big_body()
            else:
                self._answer(200)

        def _big_body(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_BODY_BYTES))
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(BIG_BODY_BYTES // len(chunk)):
                    self.wfile.write(chunk)
                receiver.big_body_completed = True
            except OSError:
                pass  # the client hung up: what we want

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A merchant server on 127.0.0.1 whose behaviour is chosen by the request path."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    state = Receiver(port=server.server_address[1])
    server.RequestHandlerClass = _handler_for(state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    """A session like the worker's, with private addresses allowed so it can reach 127.0.0.1."""
    with requests.Session() as s:
        s.trust_env = False
        s.mount("http://", GuardedAdapter(allow_private=True))
        yield s


def post(session: requests.Session, url: str, *, read_timeout_s: float = 5.0, max_bytes: int = 65536) -> Attempt:
    return post_webhook(
        session,
        url,
        BODY,
        dict(SIGNED),
        connect_timeout_s=2.0,
        read_timeout_s=read_timeout_s,
        max_response_bytes=max_bytes,
    )


def assert_safe_text(exc: BaseException) -> None:
    """The error text names the host but carries neither the path nor the query string."""
    text = str(exc)
    assert "127.0.0.1" in text
    assert "SECRET123" not in text
    assert "secret-path-XYZ" not in text


@pytest.mark.parametrize(("path", "status"), [("/ok", 200), ("/no-content", 204)])
def test_a_2xx_answer_is_a_successful_attempt(
    receiver: Receiver, session: requests.Session, path: str, status: int
) -> None:
    # Given a merchant that accepts the webhook
    # When one attempt is made
    attempt = post(session, receiver.url(path))
    # Then it reports the status and a duration, and the merchant got the exact body and the signature headers
    assert attempt.status == status
    assert attempt.duration_ms > 0
    assert receiver.bodies == [BODY]
    assert receiver.headers[0]["content-type"] == "application/json"
    assert {name: receiver.headers[0][name] for name in SIGNED} == SIGNED


def test_a_503_with_retry_after_is_a_retryable_status_error_carrying_the_wait(
    receiver: Receiver, session: requests.Session
) -> None:
    # Given a merchant answering 503 with "Retry-After: 7"
    # When one attempt is made
    with pytest.raises(HttpStatusError) as caught:
        post(session, receiver.url(TAIL.replace("/hook", "/unavailable")))
    # Then the error is retryable, tagged with the status and host, and asks for 7 s
    error = caught.value
    assert isinstance(error, DeliveryError)
    assert error.tags == {"host": "127.0.0.1", "http_status": 503}
    assert error.retry_after_ms == 7_000
    assert_safe_text(error)


def test_a_500_without_retry_after_leaves_the_wait_to_the_policy(receiver: Receiver, session: requests.Session) -> None:
    # Given a merchant answering 500, when one attempt is made
    with pytest.raises(HttpStatusError) as caught:
        post(session, receiver.url("/error"))
    # Then no wait is imposed
    assert caught.value.tags["http_status"] == 500
    assert caught.value.retry_after_ms is None


def test_a_410_means_the_endpoint_is_gone_for_good(receiver: Receiver, session: requests.Session) -> None:
    # Given a merchant answering 410 Gone, when one attempt is made
    with pytest.raises(EndpointGone) as caught:
        post(session, receiver.url(TAIL.replace("/hook", "/gone")))
    # Then it is a permanent error (never a retryable DeliveryError), tagged and safe to log
    assert not isinstance(caught.value, DeliveryError)
    assert caught.value.tags == {"host": "127.0.0.1", "http_status": 410}
    assert_safe_text(caught.value)


def test_a_redirect_is_a_failure_and_is_not_followed(receiver: Receiver, session: requests.Session) -> None:
    # Given a merchant answering 302 to another path on the same server
    # When one attempt is made
    with pytest.raises(HttpStatusError) as caught:
        post(session, receiver.url(TAIL.replace("/hook", "/redirect")))
    # Then it fails with the 302, and the redirect target never received a request
    assert caught.value.tags["http_status"] == 302
    assert receiver.hits == ["/redirect"]
    assert_safe_text(caught.value)


def test_a_merchant_slower_than_the_read_timeout_fails_quickly(receiver: Receiver, session: requests.Session) -> None:
    # Given a merchant that takes seconds to answer, and a 0.3 s read timeout
    started = time.monotonic()
    # When one attempt is made
    with pytest.raises(DeliveryError) as caught:
        post(session, receiver.url(TAIL.replace("/hook", "/slow")), read_timeout_s=0.3)
    # Then it fails within about the timeout, with a safe text
    assert time.monotonic() - started < 2.0
    assert "timed out" in str(caught.value)
    assert_safe_text(caught.value)


def test_a_merchant_that_stalls_mid_body_fails_quickly(receiver: Receiver, session: requests.Session) -> None:
    # Given a merchant that sends a 503's headers and then stalls
    started = time.monotonic()
    # When one attempt is made with a 0.3 s read timeout, then it fails within about the timeout
    with pytest.raises(DeliveryError) as caught:
        post(session, receiver.url(TAIL.replace("/hook", "/slow-body-503")), read_timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    assert_safe_text(caught.value)


def test_a_merchant_that_stalls_mid_body_is_reported_as_a_timeout(
    receiver: Receiver, session: requests.Session
) -> None:
    # Given a merchant that sends a 503's headers and then stalls, when one attempt is made
    with pytest.raises(DeliveryError) as caught:
        post(session, receiver.url("/slow-body-503"), read_timeout_s=0.3)
    # Then the text says it timed out (it did connect)
    assert "timed out" in str(caught.value)


@pytest.mark.parametrize("path", ["/slow-body", "/cut-body"])
def test_a_2xx_whose_body_stalls_or_breaks_off_is_delivered_not_sent_again(
    receiver: Receiver, session: requests.Session, path: str
) -> None:
    # Given a merchant that answers 200 and then stalls its body, or closes the connection in the middle of it
    started = time.monotonic()
    # When one attempt is made with a 0.3 s read timeout
    attempt = post(session, receiver.url(path), read_timeout_s=0.3)
    # Then it is delivered (the merchant accepted it: a retry would deliver it twice), within about the timeout
    assert attempt.status == 200
    assert time.monotonic() - started < 2.0
    assert receiver.hits == [path]


def test_a_refused_connection_is_a_retryable_delivery_error(session: requests.Session) -> None:
    # Given a port nobody listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # When one attempt is made
    with pytest.raises(DeliveryError) as caught:
        post(session, f"http://127.0.0.1:{port}{TAIL}")
    # Then it is a retryable error naming the host only
    assert not isinstance(caught.value, HttpStatusError)
    assert caught.value.tags == {"host": "127.0.0.1"}
    assert "could not connect" in str(caught.value)
    assert_safe_text(caught.value)


def test_a_response_body_over_the_limit_is_not_read_to_the_end(receiver: Receiver, session: requests.Session) -> None:
    # Given a merchant that answers 200 with a 50 MiB body
    started = time.monotonic()
    # When one attempt is made with a 1 KiB read limit
    attempt = post(session, receiver.url("/big"), max_bytes=1024)
    # Then it succeeds quickly and the server could not send the whole body
    assert attempt.status == 200
    assert time.monotonic() - started < 2.0
    assert receiver.big_body_completed is False


def test_a_private_address_refused_by_the_guard_propagates_as_refused_host(receiver: Receiver) -> None:
    # Given the production session, which refuses private peers
    with requests.Session() as guarded:
        guarded.trust_env = False
        guarded.mount("http://", GuardedAdapter(allow_private=False))
        # When one attempt targets the loopback server, then RefusedHost (permanent) escapes unchanged
        with pytest.raises(RefusedHost):
            post(guarded, receiver.url("/ok"))
    # And the server never saw the request
    assert receiver.hits == []


def test_an_unreadable_retry_after_is_ignored(receiver: Receiver, session: requests.Session) -> None:
    # Given a merchant answering 503 with an absurd Retry-After
    # When one attempt is made, then it is an ordinary 503 with no imposed wait
    with pytest.raises(HttpStatusError) as caught:
        post(session, receiver.url("/unavailable-garbage-retry-after"))
    assert caught.value.retry_after_ms is None


def test_attempts_reuse_one_connection_send_the_sessions_headers_and_ignore_proxies_from_the_environment(
    receiver: Receiver, session: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given proxy variables pointing at a port nobody listens on
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # When two attempts are made on one session
    post(session, receiver.url("/ok"))
    post(session, receiver.url("/ok"))
    # Then both went straight to the merchant over one kept-alive connection, with the session's User-Agent
    assert receiver.hits == ["/ok", "/ok"]
    assert len(set(receiver.client_ports)) == 1
    assert receiver.headers[0]["user-agent"] == session.headers["User-Agent"]


def test_a_connection_whose_answer_was_cut_at_the_size_cap_is_not_reused(
    receiver: Receiver, session: requests.Session
) -> None:
    # Given an attempt whose 50 MiB answer was cut at 1 KiB
    post(session, receiver.url("/big"), max_bytes=1024)
    # When the next attempt is made on the same session
    post(session, receiver.url("/ok"))
    # Then it opened a new connection (the unread rest of the body is never taken for the next answer)
    assert len(set(receiver.client_ports)) == 2
