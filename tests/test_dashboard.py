"""`whiskypay dashboard`: dramatiq-dashboard on our broker, behind basic auth, scrubbed, driven by a real browser.

Tiers: pure checks of the auth and scrubbing helpers; the real WSGI stack under waitress in a thread against the test
Redis with real dead letters from real workers; the real `whiskypay dashboard` process (a private Redis with a
password; Debian's chromium driven by Playwright).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.helpers import NAMESPACE, TEST_SECRET, dead_letters, wait_until
from whiskypay.dashboard import BasicAuth, is_loopback, scrub_page
from whiskypay.devstack import HttpReceiver, RedisServer, Response, free_port

USER = "ops"
PASSWORD = "correct horse battery staple"
SECRET = TEST_SECRET
BUYER = "buyer.secret-person@example.com"
QUEUES = ("callbackQueue", "emailQueue")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where the browser test leaves a copy of each page's screenshot, for the docs (WHISKYPAY_UPDATE_SCREENSHOTS=1).
DOCS = REPO_ROOT / "docs"


def basic(username: str, password: str) -> str:
    """Return an Authorization header value for username and password."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


# --------------------------------------------------------------------------------------------------------------------
# Tier 1: the helpers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic(USER, PASSWORD), True),
        ("basic " + basic(USER, PASSWORD).split()[1], True),
        (basic(USER, PASSWORD + "x"), False),
        (basic(USER, PASSWORD[:-1]), False),
        (basic("Ops", PASSWORD), False),
        (basic("", ""), False),
        ("Basic " + base64.b64encode(f"{USER}{PASSWORD}".encode()).decode(), False),  # no colon
        ("Basic !!!not-base64!!!", False),
        ("Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), False),
        ("", False),
    ],
)
def test_only_the_configured_credentials_are_authorized(header: str, expected: bool) -> None:
    auth = BasicAuth(lambda environ, start_response: [], username=USER, password=PASSWORD)
    assert auth.authorized(header) is expected


def test_basic_auth_cannot_be_built_without_a_password() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        BasicAuth(lambda environ, start_response: [], username=USER, password="")


def test_a_page_shows_no_secret_no_email_and_no_query_string() -> None:
    page = (
        "<pre>&#39;http://merchant.example/hook?token=abc&amp;x=1&#39;</pre> <td>buyer@example.com</td>"
        f"<td>{html.escape('p&ss<word')}</td><td>redis://:hunter2@db:6379/0</td>"
    )
    scrubbed = scrub_page(page, ["p&ss<word", "hunter2"])
    assert scrubbed == (
        "<pre>&#39;http://merchant.example/hook?…&#39;</pre> <td>b***@example.com</td>"
        "<td>[redacted]</td><td>redis://:[redacted]@db:6379/0</td>"
    )


@pytest.mark.parametrize(
    ("page", "leak"),
    [
        ("<pre>&#39;https://m.example/a&amp;b?token=LEAK1&#39;</pre>", "LEAK1"),
        ("<pre>&#34;https://m.example/it&#39;s?token=LEAK2&#34;</pre>", "LEAK2"),
        ("<pre>&#39;https://m.example/x&amp;y&#39;s/z?a=1&amp;token=LEAK3&#39;</pre>", "LEAK3"),
        ("<td>https://m.example/p?a=it&#39;s&amp;token=LEAK4</td>", "LEAK4"),
        ("<td>HTTPS://M.EXAMPLE/p#frag&amp;LEAK5</td>", "LEAK5"),
        ("callback_url='https://m.example/a&b?token=LEAK6'", "LEAK6"),
    ],
)
def test_every_query_string_is_cut_also_after_an_escaped_ampersand_or_apostrophe(page: str, leak: str) -> None:
    # Given a page showing a URL whose path holds & or ' (HTML-escaped to &amp; / &#39;) before its query
    scrubbed = scrub_page(page)
    # Then the query is cut, and the path up to it and the closing quote are kept
    assert leak not in scrubbed
    assert "?…" in scrubbed
    assert scrubbed.count("m.example") == 1 or scrubbed.count("M.EXAMPLE") == 1


def test_a_shown_message_has_its_addresses_masked_by_structure_and_its_urls_cut() -> None:
    from dramatiq import Message

    from whiskypay.dashboard import masked_message

    # Given a stored callback whose buyer address has an apostrophe (a regular expression over text missed it)
    message = Message(queue_name="callbackQueue", actor_name="send_callback", args=("o'hara@example.com",),
                      kwargs={"email": "jane.doe'@example.com", "callback_url": "https://m.example/a&b?token=T0K",
                              "plan": "pro for jane.doe'@example.com"},
                      options={"traceback": "SmtpPermanentError: 550 <jane.doe'@example.com>",
                               "retries": 2})  # fmt: skip
    # When prepared for a page
    shown = masked_message(message, ("T0K",))
    # Then the address fields are masked by structure, the URL is cut, and the other strings scrubbed
    assert shown.kwargs == {"email": "j***@example.com", "callback_url": "https://m.example/a&b?…",
                            "plan": "pro for j***@example.com"}  # fmt: skip
    assert shown.args == ("o***@example.com",)
    assert shown.options["traceback"] == "SmtpPermanentError: 550 <j***@example.com>"
    assert shown.options["retries"] == 2 and shown.message_id == message.message_id
    assert "jane.doe" not in str(shown) and "T0K" not in str(shown)


def test_an_undecodable_message_placeholder_shows_no_raw_bytes_unmasked() -> None:
    from dramatiq import Message

    from whiskypay.dashboard import masked_message
    from whiskypay.redaction import masked_sample

    raw = b'{"kwargs": {"email": "jane.doe\'@example.com", "callback_url": "https://m.example/h?token=T0K"}, \xff'
    # Given a placeholder written before raw_sample existed (raw bytes in base64), and one written now
    old = Message(queue_name="callbackQueue", actor_name="undecodable-message", args=(), kwargs={},
                  options={"raw_base64": base64.b64encode(raw).decode(), "redis_message_id": "r1"})  # fmt: skip
    # Then neither shows the address or the token, in any encoding
    for shown in (str(masked_message(old).options), masked_sample(raw)):
        assert "jane.doe" not in shown and "T0K" not in shown
        assert base64.b64encode(raw).decode()[:40] not in shown
        assert "j***@example.com" in shown and "\\xff" in shown


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True), ("0.0.0.0", False),
     ("::", False), ("10.0.0.5", False), ("dashboard.internal", False)],
)  # fmt: skip
def test_only_loopback_addresses_count_as_local(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --------------------------------------------------------------------------------------------------------------------
# Tier 3: the real WSGI stack under waitress, on the test Redis, with real workers making dead letters
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard_url() -> Iterator[str]:
    """The dashboard's WSGI stack (auth, scrubbing, dramatiq-dashboard on our broker) served by waitress."""
    import waitress

    import actors
    from settings import get_settings
    from whiskypay.broker import secrets_of
    from whiskypay.dashboard import build_app

    app = build_app(actors.broker, username=USER, password=PASSWORD, secrets=secrets_of(get_settings()))
    server: Any = waitress.create_server(app, host="127.0.0.1", port=0, threads=2, asyncore_loop_timeout=0.1)
    thread = threading.Thread(target=server.run, name="dashboard-waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(5)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    """A requests session logged in with the right credentials."""
    with requests.Session() as s:
        s.auth = (USER, PASSWORD)
        yield s


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The shared worker environment with one attempt per callback (a failure dead-letters at once)."""
    return {**env, "WHISKYPAY_CALLBACK_ATTEMPTS": "1"}


def dead_letter_one(client: redis.Redis, receiver: HttpReceiver, send: Callable[..., Any]) -> dict[str, Any]:
    """Send one callback to a receiver answering 503 and return its dead letter (a worker must be running)."""
    receiver.respond("/hook", Response(status=503))
    message = send(callback_url=receiver.url("/hook"), email=BUYER, plan="pro", price=19.99)
    letters = wait_until(lambda: dead_letters(client, "callbackQueue"), what="dead letter")
    assert letters[0]["message_id"] == message.message_id
    return letters[0]


def redis_id(letter: dict[str, Any]) -> str:
    """Return the Redis id of a stored message: the key of its hash entry and of the dashboard's pages."""
    return str(letter["options"]["redis_message_id"])


def csrf_tokens(page: str) -> dict[str, str]:
    """Return the CSRF fields of the first form on a dramatiq-dashboard page: its own token and the console's."""
    theirs = re.search(r'name="__dd_csrf" value="([0-9a-f]+)"', page)
    ours = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert theirs and ours, "no CSRF tokens on the page"
    return {"__dd_csrf": theirs.group(1), "csrf_token": ours.group(1)}


@pytest.mark.parametrize(
    "auth",
    [None, (USER, "wrong password"), ("admin", PASSWORD), (USER, "")],
    ids=["no credentials", "wrong password", "wrong username", "empty password"],
)
def test_the_dashboard_refuses_requests_without_valid_credentials(
    dashboard_url: str, auth: tuple[str, str] | None
) -> None:
    for path in ("/", "/dramatiq/", "/dramatiq/queues/callbackQueue/failed", "/dramatiq/requeue-message",
                 "/dramatiq/delete-message", "/dead-letters/redrive", "/static/console.css"):
        # When a request arrives without the right credentials
        answer = requests.post(dashboard_url + path, auth=auth, data={"queue": "callbackQueue.XQ", "id": "x"})
        # Then it is refused with a challenge, and no dashboard content
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"] == 'Basic realm="WhiskyPay dashboard", charset="UTF-8"'
        assert "Queue" not in answer.text


def test_the_dashboard_lists_both_queues_with_the_right_credentials(
    redis_client: redis.Redis, dashboard_url: str, session: requests.Session
) -> None:
    # When an operator opens the dashboard
    answer = session.get(dashboard_url + "/")
    # Then both of our queues are listed, and the page may neither be framed nor cached
    assert answer.status_code == 200
    for queue in QUEUES:
        assert f'href="/dramatiq/queues/{queue}"' in answer.text
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("queue", QUEUES)
@pytest.mark.parametrize("tab", ["standard", "delayed", "failed"])
def test_every_tab_of_both_queues_answers(
    redis_client: redis.Redis, dashboard_url: str, session: requests.Session, queue: str, tab: str
) -> None:
    answer = session.get(f"{dashboard_url}/dramatiq/queues/{queue}/{tab}")
    assert answer.status_code == 200
    assert "No jobs" in answer.text or "table__empty" in answer.text


def test_a_failed_message_shows_its_error_and_can_be_requeued_and_delivered(
    redis_client: redis.Redis,
    dashboard_url: str,
    session: requests.Session,
    receiver: HttpReceiver,
    start_workers: Callable[..., Any],
    env: dict[str, str],
) -> None:
    from actors import send_callback

    # Given a callback dead-lettered by a real worker after its one attempt got a 503
    start_workers("--queues", "callbackQueue", env=env)
    letter = dead_letter_one(redis_client, receiver, send_callback.send)
    traceback = letter["options"]["traceback"]
    assert "503" in traceback
    # When an operator opens the failed tab and the message's page
    failed = session.get(f"{dashboard_url}/dramatiq/queues/callbackQueue/failed")
    page = session.get(f"{dashboard_url}/dramatiq/queues/callbackQueue/failed/{redis_id(letter)}")
    # Then the failed tab lists it, and its page shows the stored error, but neither the buyer's email nor a secret
    assert failed.status_code == 200 and redis_id(letter) in failed.text
    assert page.status_code == 200
    assert html.escape(traceback) in page.text
    assert BUYER not in page.text and "b***@example.com" in page.text
    assert SECRET not in page.text
    # When the receiver is fixed and the operator requeues the message with the form's CSRF token
    receiver.respond("/hook", Response(status=200))
    requeued = session.post(
        f"{dashboard_url}/dramatiq/requeue-message",
        data={**csrf_tokens(failed.text), "queue": "callbackQueue.XQ", "id": redis_id(letter)},
        allow_redirects=False,
    )
    # Then the dead letter is gone from Redis and the worker delivers it with the same webhook-id
    assert requeued.status_code == 302
    # (to the re-driven message's page on the standard tab, which shows the tab once a worker took it)
    assert requeued.headers["Location"].startswith("/dramatiq/queues/callbackQueue/standard/")
    assert dead_letters(redis_client, "callbackQueue") == []
    delivered = receiver.wait_for(2, path="/hook")[1]
    assert delivered.headers["webhook-id"] == f"msg_{letter['message_id']}"
    assert delivered.json()["email"] == BUYER


def test_a_failed_message_can_be_deleted(
    redis_client: redis.Redis,
    dashboard_url: str,
    session: requests.Session,
    receiver: HttpReceiver,
    start_workers: Callable[..., Any],
    env: dict[str, str],
) -> None:
    from actors import send_callback

    # Given a dead-lettered callback
    start_workers("--queues", "callbackQueue", env=env)
    letter = dead_letter_one(redis_client, receiver, send_callback.send)
    page = session.get(f"{dashboard_url}/dramatiq/queues/callbackQueue/failed/{redis_id(letter)}")
    # When a request without the CSRF token tries to delete it, then it is refused
    forged = session.post(f"{dashboard_url}/dramatiq/delete-message",
                          data={"queue": "callbackQueue.XQ", "id": redis_id(letter)})
    assert forged.status_code == 403
    assert len(dead_letters(redis_client, "callbackQueue")) == 1
    # When the operator deletes it with the page's form
    deleted = session.post(
        f"{dashboard_url}/dramatiq/delete-message",
        data={**csrf_tokens(page.text), "queue": "callbackQueue.XQ", "id": redis_id(letter)},
        allow_redirects=False,
    )
    # Then it is gone from the dead-letter set and hash, and was never delivered again
    assert deleted.status_code == 302
    assert deleted.headers["Location"] == "/dramatiq/queues/callbackQueue/failed"
    assert dead_letters(redis_client, "callbackQueue") == []
    assert redis_client.zcard(f"{NAMESPACE}:callbackQueue.XQ") == 0
    time.sleep(0.3)
    assert len(receiver.requests("/hook")) == 1


def put_dead_letter(client: redis.Redis, queue: str = "callbackQueue", namespace: str = NAMESPACE) -> tuple[str, str]:
    """Store one dead-lettered callback the way Dramatiq does (XQ set + XQ.msgs hash); return (message id, redis id)."""
    from dramatiq import Message

    message = Message(queue_name=queue, actor_name="send_callback", args=(),
                      kwargs={"callback_url": "https://merchant.example/hook", "email": BUYER, "plan": "pro",
                              "price": 1, "timestamp": "2026-11-27T21:00:00Z"}, options={})  # fmt: skip
    redis_id = f"dead-{message.message_id}"
    message = message.copy(options={"redis_message_id": redis_id, "retries": 4, "traceback": "HttpStatusError: 503"})
    client.hset(f"{namespace}:{queue}.XQ.msgs", redis_id, message.encode())
    client.zadd(f"{namespace}:{queue}.XQ", {redis_id: int(time.time() * 1000)})
    return message.message_id, redis_id


def queue_state(client: redis.Redis, queue: str = "callbackQueue", namespace: str = NAMESPACE) -> tuple[int, int, int]:
    """Return (ids in the queue's list, messages in its hash, dead letters) of queue."""
    base = f"{namespace}:{queue}"
    return int(client.llen(base)), int(client.hlen(f"{base}.msgs")), int(client.zcard(f"{base}.XQ"))


def requeue_form(url: str, redis_id: str) -> tuple[requests.Session, dict[str, str]]:
    """Open the failed tab in a new logged-in session; return it and the Requeue form's fields for redis_id."""
    s = requests.Session()
    s.auth = (USER, PASSWORD)
    page = s.get(f"{url}/dramatiq/queues/callbackQueue/failed")
    assert page.status_code == 200 and redis_id in page.text
    return s, {**csrf_tokens(page.text), "queue": "callbackQueue.XQ", "id": redis_id}


def test_two_simultaneous_requeue_clicks_redrive_a_dead_letter_once(
    redis_client: redis.Redis, dashboard_url: str
) -> None:
    # Given 20 trials, each: one dead letter, and two operators who opened the failed tab
    for _trial in range(20):
        redis_client.flushdb()
        message_id, redis_id = put_dead_letter(redis_client)
        forms = [requeue_form(dashboard_url, redis_id) for _ in range(2)]
        barrier = threading.Barrier(2)
        answers: list[int] = []

        def click(session: requests.Session, data: dict[str, str], barrier: threading.Barrier = barrier,
                  answers: list[int] = answers) -> None:
            barrier.wait()
            answers.append(session.post(f"{dashboard_url}/dramatiq/requeue-message", data=data, allow_redirects=False,
                                        timeout=10).status_code)  # fmt: skip

        # When both click Requeue at the same moment
        threads = [threading.Thread(target=click, args=form) for form in forms]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        for s, _ in forms:
            s.close()
        # Then one click re-drove it and the other was told it is gone: one message on the queue, no dead letter
        assert sorted(answers) == [302, 410]
        assert queue_state(redis_client) == (1, 1, 0)
        [data] = redis_client.hvals(f"{NAMESPACE}:callbackQueue.msgs")
        assert json.loads(data)["message_id"] == message_id and "retries" not in json.loads(data)["options"]


def test_a_dead_letter_whose_address_forget_erased_is_not_requeued_as_whiskypay_retry_skips_it(
    redis_client: redis.Redis, dashboard_url: str
) -> None:
    # Given a dead letter `whiskypay forget` erased the buyer's address from (its `erased_at` option set)
    _, redis_id = put_dead_letter(redis_client)
    key = f"{NAMESPACE}:callbackQueue.XQ.msgs"
    message = json.loads(redis_client.hget(key, redis_id))
    message["kwargs"]["email"] = "[erased]"
    message["options"]["erased_at"] = int(time.time() * 1000)
    redis_client.hset(key, redis_id, json.dumps(message))
    # When an operator clicks Requeue on it
    s, form = requeue_form(dashboard_url, redis_id)
    answer = s.post(f"{dashboard_url}/dramatiq/requeue-message", data=form, allow_redirects=False, timeout=10)
    s.close()
    # Then it is refused with the reason and stays dead-lettered: nothing goes onto the queue
    assert answer.status_code == 409 and "erased" in answer.text, answer.text
    assert queue_state(redis_client) == (0, 0, 1)


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """Serve a WSGI app with waitress on a free loopback port, in a thread; yield its base URL."""
    import waitress

    server: Any = waitress.create_server(app, host="127.0.0.1", port=0, threads=2, asyncore_loop_timeout=0.1)
    thread = threading.Thread(target=server.run, name="dashboard-waitress-private", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(5)


def test_a_requeue_keeps_the_dead_letter_when_redis_refuses_writes_or_is_out_of_memory_and_works_after(
    worker_env: dict[str, str],
) -> None:
    from settings import load_settings
    from whiskypay.broker import build_broker
    from whiskypay.dashboard import build_app

    # Given the dashboard on a private Redis holding one dead letter
    with RedisServer() as server:
        broker = build_broker(load_settings(redis_url=server.url, namespace=NAMESPACE))
        client = redis.Redis.from_url(server.url)
        try:
            _, redis_id = put_dead_letter(client)
            with served(build_app(broker, username=USER, password=PASSWORD)) as url:
                s, form = requeue_form(url, redis_id)
                # When Redis turns read-only (a replica of a master it cannot reach: it keeps its data) and the
                # operator clicks Requeue
                client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
                refused = s.post(f"{url}/dramatiq/requeue-message", data=form, allow_redirects=False, timeout=10)
                # Then the page says Redis refused and nothing changed: the dead letter is still there, whole
                assert refused.status_code == 503
                assert "the dead letter is unchanged" in refused.text and "ReadOnlyError" in refused.text
                assert queue_state(client) == (0, 0, 1)
                assert client.hexists(f"{NAMESPACE}:callbackQueue.XQ.msgs", redis_id)
                # When Redis accepts writes again but is out of memory (maxmemory 1, noeviction: Dramatiq's own
                # enqueue is refused there, which made dramatiq-dashboard's delete-then-enqueue lose the message)
                client.execute_command("REPLICAOF", "NO", "ONE")
                client.config_set("maxmemory-policy", "noeviction")
                client.config_set("maxmemory", 1)
                full = s.post(f"{url}/dramatiq/requeue-message", data=form, allow_redirects=False, timeout=10)
                # Then it is refused whole too: the move writes first and deletes last (REDRIVE_LUA), so Redis's
                # OOM check at the first write stops it before anything changed
                assert full.status_code == 503 and "the dead letter is unchanged" in full.text, full.text
                assert queue_state(client) == (0, 0, 1)
                # When memory is back, then the same click re-drives it
                client.config_set("maxmemory", 0)
                again = s.post(f"{url}/dramatiq/requeue-message", data=form, allow_redirects=False, timeout=10)
                assert again.status_code == 302, again.text
                assert queue_state(client) == (1, 1, 0)
                client.config_set("maxmemory", 0)
                s.close()
        finally:
            broker.close()
            client.close()


# --------------------------------------------------------------------------------------------------------------------
# Tier 3: the real `whiskypay dashboard` process
# --------------------------------------------------------------------------------------------------------------------


class DashboardProcess:
    """A `whiskypay dashboard` subprocess on a free port, stopped (and its group killed) by `stop()`.

    Parameters:
        env: its environment.
        log_path: file receiving its stdout and stderr.
        args: extra command-line arguments.
    """

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [str(Path(sys.executable).parent / "whiskypay"), "dashboard", "--port", str(self.port), *args]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20) -> DashboardProcess:
        """Start it and wait until it answers HTTP (with a 401: no credentials sent)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"dashboard exited:\n{self.log()}"
            try:
                return requests.get(self.url + "/", timeout=1).status_code == 401
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout_s=timeout_s, what="the dashboard to answer")
        return self

    def log(self) -> str:
        """Return everything it printed."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM it, SIGKILL its process group if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def start_dashboard(tmp_path: Path) -> Iterator[Callable[..., DashboardProcess]]:
    """Factory `start_dashboard(env, *args)` -> a started DashboardProcess, stopped at teardown."""
    started: list[DashboardProcess] = []

    def _start(env: dict[str, str], *args: str) -> DashboardProcess:
        process = DashboardProcess(env, tmp_path / f"dashboard-{len(started)}.log", *args)
        started.append(process)
        return process.start()

    yield _start
    for process in started:
        process.stop()


def dashboard_env(env: dict[str, str], **overrides: str) -> dict[str, str]:
    """Return env with the dashboard's credentials set, plus overrides."""
    return {**env, "WHISKYPAY_DASHBOARD_USERNAME": USER, "WHISKYPAY_DASHBOARD_PASSWORD": PASSWORD, **overrides}


@pytest.mark.parametrize("missing", ["WHISKYPAY_DASHBOARD_USERNAME", "WHISKYPAY_DASHBOARD_PASSWORD"])
def test_the_dashboard_refuses_to_start_without_both_credentials(worker_env: dict[str, str], missing: str) -> None:
    env = dashboard_env(worker_env)
    del env[missing]
    done = subprocess.run([str(Path(sys.executable).parent / "whiskypay"), "dashboard", "--port", str(free_port())],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "WHISKYPAY_DASHBOARD_USERNAME and WHISKYPAY_DASHBOARD_PASSWORD" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout


def test_the_dashboard_warns_loudly_when_bound_beyond_loopback(
    worker_env: dict[str, str], start_dashboard: Callable[..., DashboardProcess]
) -> None:
    process = start_dashboard(dashboard_env(worker_env), "--host", "0.0.0.0")
    assert "WARNING: whiskypay dashboard listens on 0.0.0.0" in process.log()


@pytest.fixture
def passworded_redis() -> Iterator[RedisServer]:
    """A private Redis that requires a random password (request it before the processes that use it)."""
    with RedisServer(password="r3dis-Pa55word-" + base64.b16encode(os.urandom(6)).decode()) as server:
        yield server


def test_no_page_shows_the_redis_password_a_secret_or_a_buyer_email(
    passworded_redis: RedisServer,
    receiver: HttpReceiver,
    start_workers: Callable[..., Any],
    start_dashboard: Callable[..., DashboardProcess],
    env: dict[str, str],
) -> None:
    import actors
    from settings import load_settings
    from whiskypay.broker import build_broker

    # Given a Redis with a password, holding a dead letter made by a real worker
    redis_password = str(passworded_redis.password)
    private_env = dashboard_env(env, WHISKYPAY_REDIS_URL=passworded_redis.url)
    start_workers("--queues", "callbackQueue", env=private_env)
    broker = build_broker(load_settings(redis_url=passworded_redis.url, webhook_secret=SECRET))
    try:
        send = actors.send_callback.message
        letter = dead_letter_one(broker.client, receiver, lambda **kwargs: broker.enqueue(send(**kwargs)))
        # When an operator walks every page of the real `whiskypay dashboard`
        process = start_dashboard(private_env)
        pages = [f"/dramatiq/queues/{queue}/{tab}" for queue in QUEUES for tab in ("standard", "delayed", "failed")]
        pages += ["/dramatiq/", f"/dramatiq/queues/callbackQueue/failed/{redis_id(letter)}", "/no-such-page"]
        pages += ["/", "/?format=json", "/merchants", "/events", "/dead-letters", "/dead-letters?format=json",
                  f"/events/{letter['message_id']}"]
        texts = []
        for path in pages:
            answer = requests.get(process.url + path, auth=(USER, PASSWORD), timeout=5)
            assert answer.status_code in (200, 404), path
            texts.append(answer.text + str(answer.headers))
        everything = "\n".join(texts) + process.log()
    finally:
        broker.close()
    # Then the message page showed the error, and no page (nor the log) any secret or the buyer's address
    assert html.escape(letter["options"]["traceback"]) in everything
    for secret in (redis_password, SECRET, SECRET.removeprefix("whsec_"), PASSWORD, BUYER):
        assert secret not in everything
    assert "b***@example.com" in everything


# --------------------------------------------------------------------------------------------------------------------
# Tier 3: a real headless browser
# --------------------------------------------------------------------------------------------------------------------


def _no_browser(reason: str) -> None:
    """Skip a browser test on a machine that cannot get chromium; fail in CI (CI=true), which must run it."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"the browser tests must run in CI, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's chromium, installed with apt-get when missing (root only); skip (fail in CI) without it."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.geteuid() != 0:
        _no_browser(f"{CHROMIUM} is missing and installing it needs root: run `apt-get install -y chromium`")
    if shutil.which("apt-get") is None:
        _no_browser(f"{CHROMIUM} is missing and this machine has no apt-get to install Debian's chromium")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command, timeout_s in (
        (["apt-get", "update", "-q"], 300),
        (["apt-get", "install", "-y", "-q", "chromium"], 900),
    ):
        try:
            subprocess.run(command, env=apt_env, capture_output=True, text=True, timeout=timeout_s, check=True)
        except subprocess.TimeoutExpired:
            _no_browser(f"`{' '.join(command)}` did not finish within {timeout_s} s, so no browser is available")
        except subprocess.CalledProcessError as exc:
            _no_browser(f"`{' '.join(command)}` failed (rc {exc.returncode}): {exc.stderr.strip()[-300:]}")
    if not os.access(CHROMIUM, os.X_OK):
        _no_browser(f"apt-get installed chromium but {CHROMIUM} is still missing")
    return CHROMIUM


def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    """Save the page's screenshot as tmp_path/console-<name>.png; copied to docs/ when WHISKYPAY_UPDATE_SCREENSHOTS."""
    path = tmp_path / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("WHISKYPAY_UPDATE_SCREENSHOTS"):  # refresh docs/console-*.png only when asked
        shutil.copyfile(path, DOCS / path.name)


def new_browser_page(browser: Any, *, logged_in: bool = True) -> Any:
    """A page of a fresh browser context (with the dashboard's credentials, unless logged_in is False)."""
    credentials = {"http_credentials": {"username": USER, "password": PASSWORD}} if logged_in else {}
    context = browser.new_context(viewport={"width": 1280, "height": 800}, **credentials)
    page = context.new_page()
    page.set_default_timeout(10_000)
    return page


@pytest.mark.e2e
def test_an_operator_re_drives_a_down_merchants_payment_in_a_real_browser(
    chromium: str,
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    start_workers: Callable[..., Any],
    start_dashboard: Callable[..., DashboardProcess],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from actors import send_callback
    from whiskypay import keys
    from whiskypay.ledger import load_payments, resolve

    def webhook_state() -> str | None:
        found = load_payments(redis_client, NAMESPACE, resolve(redis_client, NAMESPACE, "evt_down_1", "m-down"))
        return found[0].webhook_state if found else None

    # Given a merchant that is down (503) and a worker that dead-letters a callback after one attempt (its breaker,
    # tripping after WHISKYPAY_BREAKER_FAILURES=10 failures, stays closed)
    start_workers("--queues", "callbackQueue", env=env)
    receiver.respond("/hook", Response(status=503))
    message = send_callback.send(callback_url=receiver.url("/hook"), email=BUYER, plan="pro", price=19.99,
                                 event_id="evt_down_1", merchant_id="m-down")  # fmt: skip
    wait_until(lambda: dead_letters(redis_client, "callbackQueue"), what="the dead letter")
    counters = keys.merchant_outcome_counters(NAMESPACE, "callbackQueue")
    wait_until(lambda: redis_client.hget(counters, "failed:m-down") == b"1", what="the merchant's failure counted")
    wait_until(lambda: webhook_state() == "failed", what="the ledger's failed webhook")
    process = start_dashboard(dashboard_env(env))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = new_browser_page(browser)
            # When the operator opens the overview, then the callback queue shows one dead letter
            page.goto(process.url + "/")
            row = page.locator("#queues tr[data-queue='callbackQueue'] td")
            expect(row.nth(5)).to_have_text("1")
            screenshot(page, tmp_path, "overview")
            # When they open Merchants, then m-down shows its failure rate, and its page its dead letter
            page.get_by_role("link", name="Merchants", exact=True).click()
            merchant = page.locator("#merchants tr[data-merchant='m-down']")
            expect(merchant).to_contain_text("100.0 %")
            expect(merchant).to_contain_text("closed")
            screenshot(page, tmp_path, "merchants")
            merchant.get_by_role("link", name="m-down").click()
            expect(page.locator("h1")).to_have_text("m-down")
            expect(page.locator("form.letters")).to_contain_text("HTTP 503")
            screenshot(page, tmp_path, "merchant")
            # When they open the payment from its recent payments, then its failed attempt shows with its status
            page.get_by_role("link", name="evt_down_1").first.click()
            expect(page.locator("#webhook-state")).to_have_text("failed")
            attempts = page.locator("#attempts li")
            expect(attempts).to_have_count(1)
            expect(attempts.first).to_contain_text("HTTP 503")
            expect(attempts.first).to_contain_text("failed")
            assert BUYER not in page.content() and PASSWORD not in page.content()
            screenshot(page, tmp_path, "event-failed")
            # When the merchant is back and the operator selects the dead letter and presses Re-drive selected
            receiver.respond("/hook", Response(status=200))
            page.locator("form.letters input[type=checkbox]").check()
            page.get_by_role("button", name="Re-drive selected").click()
            expect(page.locator(".notice")).to_contain_text("re-driven 1")
            # Then the worker delivers it with the same webhook-id, and the page then shows it delivered
            delivered = receiver.wait_for(2, path="/hook")[1]
            assert delivered.headers["webhook-id"] == "evt_down_1"
            assert delivered.json()["email"] == BUYER
            wait_until(lambda: webhook_state() == "delivered", what="the ledger's delivered webhook")
            page.reload()
            expect(page.locator("#webhook-state")).to_have_text("delivered")
            expect(attempts).to_have_count(2)
            expect(attempts.nth(1)).to_contain_text("delivery 2, attempt 1")
            expect(attempts.nth(1)).to_contain_text("HTTP 200")
            screenshot(page, tmp_path, "event-delivered")
            assert dead_letters(redis_client, "callbackQueue") == []
            # And the other pages answer: events search, dead letters, the mounted dramatiq-dashboard
            page.goto(process.url + "/events?merchant=m-down")
            expect(page.locator("table.grid")).to_contain_text("evt_down_1")
            screenshot(page, tmp_path, "events")
            put_dead_letter(redis_client)
            page.goto(process.url + "/dead-letters")
            expect(page.locator("form.letters")).to_contain_text("b***@example.com")
            screenshot(page, tmp_path, "dead-letters")
            page.goto(process.url + "/dramatiq/")
            expect(page.locator("body")).to_contain_text("callbackQueue")
            screenshot(page, tmp_path, "dramatiq")
            assert message.message_id
        finally:
            browser.close()


@pytest.mark.e2e
def test_every_route_answers_401_without_credentials_and_a_post_without_the_csrf_token_is_refused_in_a_browser(
    chromium: str,
    redis_client: redis.Redis,
    start_dashboard: Callable[..., DashboardProcess],
    env: dict[str, str],
) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    # Given the real dashboard and one dead letter
    _, dead_id = put_dead_letter(redis_client)
    process = start_dashboard(dashboard_env(env))
    gets = ["/", "/merchants", "/merchants/m-1", "/events", "/events/evt_1", "/dead-letters", "/?format=json",
            "/static/console.css", "/dramatiq/", "/dramatiq/queues/callbackQueue/failed"]
    posts = ["/dead-letters/redrive", "/dead-letters/redrive-all", "/dead-letters/delete", "/events/evt_1/resend",
             "/dramatiq/requeue-message", "/dramatiq/delete-message"]
    post_js = "path => fetch(path, {method: 'POST', body: new URLSearchParams({refs: 'callbackQueue:x'})})" \
              ".then(r => r.status)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            # When a browser without credentials opens every page and posts to every action, then each answers 401
            # (Chromium ends such a navigation with ERR_INVALID_AUTH_CREDENTIALS; the response is still seen)
            anonymous = new_browser_page(browser, logged_in=False)

            def status_of(page: Any, url: str, action: Callable[[], Any]) -> int:
                with page.expect_response(lambda response: response.url == url) as seen:
                    with contextlib.suppress(PlaywrightError):
                        action()
                return int(seen.value.status)

            for path in gets:
                url = process.url + path
                assert status_of(anonymous, url, lambda url=url: anonymous.goto(url)) == 401, path
            for path in posts:  # a form on another page posting to the action, as a forged request would
                forger = anonymous.context.new_page()
                forger.set_content(f'<form method="post" action="{process.url}{path}">'
                                   '<input name="refs" value="callbackQueue:x"></form>')  # fmt: skip
                submit = functools.partial(forger.evaluate, "document.forms[0].submit()")
                assert status_of(forger, process.url + path, submit) == 401, path
                forger.close()
            assert queue_state(redis_client) == (0, 0, 1)
            # When a logged-in operator's form loses its CSRF token before Re-drive selected is pressed
            page = new_browser_page(browser)
            page.goto(process.url + "/dead-letters")
            page.locator("form.letters input[type=checkbox]").check()
            page.evaluate("document.querySelectorAll('input[name=csrf_token]').forEach(e => e.remove())")
            page.get_by_role("button", name="Re-drive selected").click()
            # Then the POST is refused and the dead letter stays
            expect(page.locator("body")).to_contain_text("lacks the page's CSRF token")
            assert [page.evaluate(post_js, path) for path in posts] == [403] * len(posts)
            assert queue_state(redis_client) == (0, 0, 1)
            assert redis_client.zscore(f"{NAMESPACE}:callbackQueue.XQ", dead_id) is not None
        finally:
            browser.close()
