"""The operator console (issue 13), called as a WSGI app in-process on the test Redis: the fast tier.

Auth on every route, the CSRF check on every POST, each page and its JSON twin, the dead-letter actions (atomic
re-drive, delete with confirmation), the merchants' table from counters and breakers, scrubbing, and the pages that
say the ledger is missing. The browser walks are in tests/test_dashboard.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.helpers import NAMESPACE, TEST_SECRET
from whiskypay import keys

USER = "ops"
PASSWORD = "correct horse battery staple"
BUYER = "buyer.secret-person@example.com"

#: Every GET route of the console (and of the mounted dashboard and the static files).
GET_ROUTES = ["/", "/?format=json", "/merchants", "/merchants?format=json", "/merchants/m-1", "/events",
              "/events?format=json", "/events/evt_1", "/events/evt_1?format=json", "/dead-letters",
              "/dead-letters?format=json", "/static/console.css", "/dramatiq/", "/dramatiq/queues/callbackQueue/failed"]
#: Every POST route.
POST_ROUTES = ["/dead-letters/redrive", "/dead-letters/redrive-all", "/dead-letters/delete", "/events/evt_1/resend",
               "/dramatiq/requeue-message", "/dramatiq/delete-message"]


class Answer:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = int(status.split()[0])
        self.headers = {name.title(): value for name, value in headers}
        self.text = body.decode()

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """Calls the WSGI app in-process, like a browser: basic auth, the form's CSRF token."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def call(self, method: str, path: str, *, form: dict[str, Any] | None = None, auth: tuple[str, str] | None = (
             USER, PASSWORD), headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
        route, _, query = path.partition("?")
        body = urllib.parse.urlencode(form or {}, doseq=True).encode()
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method, "PATH_INFO": urllib.parse.unquote(route), "QUERY_STRING": query,
            "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "console.test",
            "SERVER_NAME": "console.test", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
        }  # fmt: skip
        if auth is not None:
            environ["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        captured: list[Any] = []
        chunks = self.app(environ, lambda status, headers, exc_info=None: captured.extend([status, headers]))
        return Answer(captured[0], captured[1], b"".join(chunks))

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, form: dict[str, Any], **kwargs: Any) -> Answer:
        return self.call("POST", path, form=form, **kwargs)

    def token(self, path: str = "/dead-letters") -> str:
        match = re.search(r'name="csrf_token" value="([^"]+)"', self.get(path).text)
        assert match, "no CSRF token on the page"
        return match.group(1)


@pytest.fixture(scope="module")
def app() -> Any:
    import actors
    from settings import get_settings
    from whiskypay.broker import secrets_of
    from whiskypay.dashboard import build_app

    return build_app(actors.broker, username=USER, password=PASSWORD, secrets=secrets_of(get_settings()))


@pytest.fixture
def client(app: Any, redis_client: redis.Redis) -> Iterator[Client]:
    yield Client(app)


def put_dead_letter(client: redis.Redis, *, merchant_id: str | None = "m-1", queue: str = "callbackQueue",
                    error: str = "HttpStatusError: HTTP 503 from merchant.example") -> tuple[str, str]:  # fmt: skip
    """Store one dead-lettered callback the way Dramatiq does; return (message id, redis id)."""
    from dramatiq import Message

    kwargs = {"callback_url": "https://merchant.example/hook?token=T0KEN", "email": BUYER, "plan": "pro", "price": 1,
              "timestamp": "2026-11-27T21:00:00Z", **({"merchant_id": merchant_id} if merchant_id else {})}
    message = Message(queue_name=queue, actor_name="send_callback", args=(), kwargs=kwargs, options={})
    redis_id = f"dead-{message.message_id}"
    message = message.copy(options={"redis_message_id": redis_id, "retries": 2, "traceback": error})
    client.hset(keys.dead_letter_messages(NAMESPACE, queue), redis_id, message.encode())
    client.zadd(keys.dead_letters(NAMESPACE, queue), {redis_id: int(time.time() * 1000)})
    return message.message_id, redis_id


def queue_state(client: redis.Redis, queue: str = "callbackQueue") -> tuple[int, int]:
    """Return (waiting: in the queue or its replay lane, dead letters) of queue."""
    waiting = int(client.llen(keys.queue(NAMESPACE, queue))) + int(client.zcard(keys.replay_lane(NAMESPACE, queue)))
    return waiting, int(client.zcard(keys.dead_letters(NAMESPACE, queue)))


# --------------------------------------------------------------------------------------------------------------------
# auth and CSRF
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, (USER, "wrong"), ("admin", PASSWORD)], ids=["none", "wrong pw", "wrong user"])
def test_every_route_answers_401_without_the_right_credentials(client: Client, auth: tuple[str, str] | None) -> None:
    for method, path in [("GET", path) for path in GET_ROUTES] + [("POST", path) for path in POST_ROUTES]:
        answer = client.call(method, path, form={"refs": "callbackQueue:x"}, auth=auth)
        assert answer.status == 401, (method, path)
        assert answer.headers["Www-Authenticate"].startswith('Basic realm="WhiskyPay dashboard"')
        assert "csrf" not in answer.text.lower()


def send_payment(event_id: str = "evt_1", merchant_id: str = "m-1") -> Any:
    """Send one callback through the real enqueue path (no worker runs): the ledger records it as pending."""
    from actors import send_callback

    return send_callback.send(callback_url="https://merchant.example/hook?token=T0KEN", email=BUYER, plan="pro",
                              price=19.99, event_id=event_id, merchant_id=merchant_id)  # fmt: skip


def test_every_get_route_answers_with_credentials_and_forbids_framing(client: Client) -> None:
    send_payment()
    for path in GET_ROUTES:
        answer = client.get(path)
        assert answer.status == 200, (path, answer.text[:300])
        assert answer.headers["X-Frame-Options"] == "DENY" and answer.headers["Cache-Control"] == "no-store"


def test_a_post_without_the_csrf_token_or_from_another_site_is_refused_and_changes_nothing(
    client: Client, redis_client: redis.Redis
) -> None:
    # Given a dead letter
    _, redis_id = put_dead_letter(redis_client)
    ref = f"callbackQueue:{redis_id}"
    token = client.token()
    # When every POST route is called without the token, with a wrong one, or with the token from another origin
    for path in POST_ROUTES:
        for form, headers in [({"refs": ref}, {}), ({"refs": ref, "csrf_token": "x" + token}, {}),
                              ({"refs": ref, "csrf_token": token, "confirm": "yes"}, {"Origin": "https://evil.example"})]:
            form = {**form, "queue": "callbackQueue.XQ", "id": redis_id}
            answer = client.post(path, form, headers=headers)
            # Then each is refused with 403 and the dead letter is untouched
            assert answer.status == 403, (path, form, headers)
            assert "CSRF" in answer.text
    assert queue_state(redis_client) == (0, 1)
    # And with the page's token the same re-drive goes through
    moved = client.post("/dead-letters/redrive", {"refs": ref, "csrf_token": token, "back": "/dead-letters"})
    assert moved.status == 303 and "re-driven" in urllib.parse.unquote_plus(moved.headers["Location"])
    assert queue_state(redis_client) == (1, 0)


def test_the_mounted_dramatiq_dashboard_carries_our_token_and_its_delete_needs_it(
    client: Client, redis_client: redis.Redis
) -> None:
    # Given a dead letter shown on dramatiq-dashboard's failed tab
    _, redis_id = put_dead_letter(redis_client)
    page = client.get("/dramatiq/queues/callbackQueue/failed")
    assert page.status == 200 and redis_id in page.text
    ours = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    theirs = re.search(r'name="__dd_csrf" value="([0-9a-f]+)"', page.text)
    assert ours and theirs and 'href="/dramatiq/queues/callbackQueue' in page.text
    form = {"queue": "callbackQueue.XQ", "id": redis_id, "__dd_csrf": theirs.group(1)}
    cookie = {"Cookie": f"__dd_csrf={theirs.group(1)}"}
    # When its Delete is posted with only its own token, then ours refuses it
    assert client.post("/dramatiq/delete-message", form, headers=cookie).status == 403
    assert queue_state(redis_client) == (0, 1)
    # When with both, then the dead letter is deleted (check-and-delete script) and the page goes back to the tab
    done = client.post("/dramatiq/delete-message", {**form, "csrf_token": ours.group(1)}, headers=cookie)
    assert done.status == 302 and done.headers["Location"] == "/dramatiq/queues/callbackQueue/failed"
    assert queue_state(redis_client) == (0, 0)


# --------------------------------------------------------------------------------------------------------------------
# dead letters
# --------------------------------------------------------------------------------------------------------------------


def test_the_dead_letters_page_shows_each_reason_masked_and_filters_by_merchant(
    client: Client, redis_client: redis.Redis
) -> None:
    # Given dead letters of two merchants
    mine, _ = put_dead_letter(redis_client, merchant_id="m-1")
    other, _ = put_dead_letter(redis_client, merchant_id="m-2", error="HttpStatusError: HTTP 410 from other.example")
    # When the operator opens the page, then both show with their reason, the buyer masked, no URL query
    page = client.get("/dead-letters")
    assert mine in page.text and other in page.text and "HTTP 410 from other.example" in page.text
    assert BUYER not in page.text and "b***@example.com" in page.text and "T0KEN" not in page.text
    # When filtered by merchant, then only that merchant's; the JSON twin has the same objects as `failed --json`
    filtered = client.get("/dead-letters?merchant=m-2&format=json").json()
    [row] = filtered["dead_letters"]
    assert row["message_id"] == other and row["merchant_id"] == "m-2" and filtered["totals"]["callbackQueue"] == 2
    assert filtered["total"] == 2
    assert {"failed_at", "attempts", "last_error", "callback_host", "buyer", "webhook_id"} <= set(row)
    assert row["buyer"] == "b***@example.com" and row["attempts"] == 3


def test_re_drive_selected_moves_each_once_and_a_second_click_finds_it_gone(
    client: Client, redis_client: redis.Redis
) -> None:
    # Given two dead letters
    refs = [f"callbackQueue:{put_dead_letter(redis_client)[1]}" for _ in range(2)]
    form = {"refs": refs, "csrf_token": client.token(), "back": "/dead-letters"}
    # When both are re-driven, and the same form is posted again (a double click)
    first = client.post("/dead-letters/redrive", form)
    second = client.post("/dead-letters/redrive", form)
    # Then they moved once: two waiting, none dead, and the second answer says gone
    assert queue_state(redis_client) == (2, 0)
    assert "re-driven 2" in urllib.parse.unquote_plus(first.headers["Location"])
    assert "gone 2" in urllib.parse.unquote_plus(second.headers["Location"])
    # And the re-driven messages start over: no retries, no traceback
    for raw in redis_client.hvals(keys.replay_lane_messages(NAMESPACE, "callbackQueue")):
        options = json.loads(raw)["options"]
        assert "retries" not in options and "traceback" not in options


def test_re_drive_all_of_a_merchant_leaves_the_others(client: Client, redis_client: redis.Redis) -> None:
    for merchant in ("m-1", "m-1", "m-2"):
        put_dead_letter(redis_client, merchant_id=merchant)
    answer = client.post("/dead-letters/redrive-all", {"queue": "callbackQueue", "merchant": "m-1",
                                                        "csrf_token": client.token(), "back": "/merchants/m-1"})
    assert answer.status == 303 and answer.headers["Location"].startswith("/merchants/m-1?notice=")
    assert queue_state(redis_client) == (2, 1)
    left = client.get("/dead-letters?format=json").json()["dead_letters"]
    assert [row["merchant_id"] for row in left] == ["m-2"]


def test_delete_asks_for_confirmation_first_and_then_deletes(client: Client, redis_client: redis.Redis) -> None:
    _, redis_id = put_dead_letter(redis_client)
    token = client.token()
    ref = f"callbackQueue:{redis_id}"
    # When Delete is pressed, then a confirmation page answers and nothing is deleted yet
    asked = client.post("/dead-letters/delete", {"refs": ref, "csrf_token": token, "back": "/dead-letters"})
    assert asked.status == 200 and "Yes, delete them" in asked.text and ref in asked.text
    assert queue_state(redis_client) == (0, 1)
    # When confirmed, then it is gone, and was not re-driven
    done = client.post("/dead-letters/delete", {"refs": ref, "csrf_token": token, "confirm": "yes",
                                                "back": "//evil.example/"})  # fmt: skip
    assert done.status == 303 and done.headers["Location"].startswith("/dead-letters?")  # never off-site
    assert queue_state(redis_client) == (0, 0)


def test_a_dead_letter_that_changed_since_it_was_read_is_not_deleted(redis_client: redis.Redis) -> None:
    from whiskypay.dead_letters import decode_dead_letter, delete_dead_letter

    _, redis_id = put_dead_letter(redis_client)
    raw = redis_client.hget(keys.dead_letter_messages(NAMESPACE, "callbackQueue"), redis_id)
    letter = decode_dead_letter("callbackQueue", redis_id, raw + b" ", 0)  # what a stale page read
    assert delete_dead_letter(redis_client, NAMESPACE, letter) == "changed"
    assert queue_state(redis_client) == (0, 1)
    fresh = decode_dead_letter("callbackQueue", redis_id, raw, 0)
    assert delete_dead_letter(redis_client, NAMESPACE, fresh) == "deleted"
    assert delete_dead_letter(redis_client, NAMESPACE, fresh) == "gone"


# --------------------------------------------------------------------------------------------------------------------
# overview and merchants
# --------------------------------------------------------------------------------------------------------------------


def test_the_overview_counts_each_queue_and_charts_the_minute_counters(
    client: Client, redis_client: redis.Redis
) -> None:
    # Given one dead letter, one waiting message, and this minute's counters
    put_dead_letter(redis_client)
    redis_client.rpush(keys.queue(NAMESPACE, "emailQueue"), "waiting-1")
    minute = int(time.time()) // 60
    redis_client.hset(keys.minute_outcomes(NAMESPACE, "callbackQueue", minute), mapping={"delivered": 7, "failed": 2})
    redis_client.hset(keys.minute_outcomes(NAMESPACE, "callbackQueue", minute - 61), mapping={"delivered": 99})
    # When the overview's JSON twin is read
    view = client.get("/?format=json").json()
    rows = {row["queue"]: row for row in view["queues"]}
    # Then the counts are per queue, the chart has 60 minutes ending now, and the minute out of range is left out
    assert rows["callbackQueue"]["dead_lettered"] == 1 and rows["emailQueue"]["waiting"] == 1
    assert len(view["chart"]) == 60 and view["chart"][-1]["delivered"] == 7 and view["chart"][-1]["failed"] == 2
    assert sum(point["delivered"] for point in view["chart"]) == 7
    # And the page draws it with a text equivalent
    page = client.get("/")
    assert "7 delivered and 2 failed attempts in the last hour" in page.text


def test_the_merchants_table_joins_counters_and_breakers_and_sorts(client: Client, redis_client: redis.Redis) -> None:
    from whiskypay.breakers import BreakerStore

    # Given counters of two merchants and an open breaker for a third
    counters = keys.merchant_outcome_counters(NAMESPACE, "callbackQueue")
    redis_client.hset(counters, mapping={"completed:m-ok": 9, "failed:m-ok": 1, "completed:m-bad": 1,
                                         "failed:m-bad": 3})  # fmt: skip
    BreakerStore(redis_client, NAMESPACE).operate("m-held", "open", queue="callbackQueue")
    # When the table is read sorted by failure rate, and by default (open breakers first)
    by_rate = client.get("/merchants?sort=failure_rate&format=json").json()["merchants"]
    default = client.get("/merchants?format=json").json()["merchants"]
    # Then each merchant has its deliveries, failure rate and breaker state
    assert [row["merchant"] for row in by_rate] == ["m-bad", "m-ok", "m-held"]
    assert by_rate[0]["failure_rate"] == 0.75 and by_rate[1]["deliveries"] == 10
    assert default[0]["merchant"] == "m-held" and default[0]["state"] == "open" and default[0]["held"]
    assert default[0]["since"].endswith("Z")  # as `whiskypay merchants --json` gives it
    page = client.get("/merchants")
    assert "75.0 %" in page.text and 'href="/merchants/m-held"' in page.text


def test_a_merchant_page_lists_its_dead_letters_with_re_drive_all(client: Client, redis_client: redis.Redis) -> None:
    mine, _ = put_dead_letter(redis_client, merchant_id="m-1")
    other, _ = put_dead_letter(redis_client, merchant_id="m-2")
    page = client.get("/merchants/m-1")
    assert mine in page.text and other not in page.text
    assert "Re-drive all of m-1" in page.text and 'action="/dead-letters/redrive-all"' in page.text


# --------------------------------------------------------------------------------------------------------------------
# scrubbing and the optional ledger
# --------------------------------------------------------------------------------------------------------------------


def test_no_page_or_json_twin_shows_a_secret_a_buyer_or_a_url_query(client: Client, redis_client: redis.Redis) -> None:
    send_payment()
    put_dead_letter(redis_client, error=f"HttpStatusError: HTTP 503 from merchant.example for {BUYER} {TEST_SECRET}")
    texts = [client.get(path).text for path in GET_ROUTES if not path.startswith("/static")]
    everything = "\n".join(texts)
    for leak in (BUYER, TEST_SECRET, PASSWORD, "T0KEN"):
        assert leak not in everything
    assert "b***@example.com" in everything


def test_pages_whose_source_is_missing_say_so(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from whiskypay.console import data

    # Given an install without the delivery ledger (issue 11), as before it landed
    monkeypatch.setattr(data, "ledger", lambda: None)
    for path in ("/events", "/events/evt_1", "/merchants/m-1", "/"):
        answer = client.get(path)
        assert answer.status == 200 and "delivery ledger (issue 11" in answer.text, path
    assert client.get("/events?format=json").json()["available"] is False
    refused = client.post("/events/evt_1/resend", {"csrf_token": client.token()})
    assert refused.status == 409


def test_events_are_searched_by_event_message_or_webhook_id_and_filtered_by_merchant_and_state(
    client: Client, redis_client: redis.Redis
) -> None:
    from whiskypay.console import data

    if data.ledger() is None:
        pytest.skip("the delivery ledger is not installed here")
    # Given three payments of two merchants, pending in the ledger
    first = send_payment("evt_a", "m-1")
    send_payment("evt_b", "m-1")
    send_payment("evt_c", "m-2")
    # Then the list is newest first; an event id, a message id and a webhook-id each find the one payment
    listed = client.get("/events?format=json").json()
    assert [row["event_id"] for row in listed["rows"]] == ["evt_c", "evt_b", "evt_a"]
    for ident in ("evt_a", first.message_id, f"msg_{first.message_id}"):
        found = client.get(f"/events?q={ident}&format=json").json()["rows"]
        assert [row["event_id"] for row in found] == ["evt_a"], ident
    assert [r["event_id"] for r in client.get("/events?merchant=m-2&format=json").json()["rows"]] == ["evt_c"]
    assert client.get("/events?state=delivered&format=json").json()["rows"] == []
    assert len(client.get("/events?state=pending&format=json").json()["rows"]) == 3
    # And the event's page shows its webhook pending, its buyer masked, and a Resend button
    page = client.get("/events/evt_a")
    assert 'id="webhook-state"' in page.text and "badge--pending" in page.text and "Resend webhook" in page.text
    assert BUYER not in page.text and "T0KEN" not in page.text
    assert client.get("/events/evt_a?format=json").json()["event"]["merchant_id"] == "m-1"
    assert client.get("/events/nope").status == 404 and client.get("/events/nope?format=json").status == 404


def test_resend_puts_the_webhook_in_the_replay_lane_with_its_next_delivery(
    client: Client, redis_client: redis.Redis
) -> None:
    from whiskypay.console import data

    if data.ledger() is None:
        pytest.skip("the delivery ledger is not installed here")
    message = send_payment("evt_r", "m-1")
    # When the operator presses Resend on the event's page
    answer = client.post("/events/evt_r/resend", {"csrf_token": client.token("/events/evt_r"), "merchant": "m-1",
                                                  "back": "/events/evt_r?merchant=m-1"})  # fmt: skip
    # (a merchant's page offers the same button on each of its payments)
    assert 'action="/events/evt_r/resend"' in client.get("/merchants/m-1").text
    # Then it is queued in the replay lane with the same message id and delivery 2, and the page says so
    assert answer.status == 303 and answer.headers["Location"].startswith("/events/evt_r?merchant=m-1&notice=Resent")
    [raw] = redis_client.hvals(keys.replay_lane_messages(NAMESPACE, "callbackQueue"))
    resent = json.loads(raw)
    assert resent["message_id"] == message.message_id and resent["options"]["ledger_delivery"] == 2
