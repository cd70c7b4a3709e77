"""Tier 2: PayloadValidation alone on a StubBroker: refused sends, filled timestamps, dead-lettered bad messages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

from middleware.validation import PayloadValidation
from whiskypay.schemas import CallbackArgs, EmailArgs, InvalidPayload

QUEUE = "callbackQueue"
EMAIL_QUEUE = "emailQueue"
EMAIL_GOOD: dict[str, Any] = {
    "buyer_email": "buyer@example.com",
    "merchant_email": "owner@merchant.example.com",
    "plan": "Pro",
    "saas_name": "Acme Analytics",
}
NOW_ISO = "2026-11-27T21:00:00Z"
GOOD: dict[str, Any] = {
    "callback_url": "https://merchant.example.com/hook",
    "email": "buyer@example.com",
    "plan": "Pro",
    "price": 10,
}


class Harness:
    """A StubBroker carrying only PayloadValidation, with a throwaway send_callback and an unchecked actor."""

    def __init__(self, *, https_only: bool = True) -> None:
        self.ran: list[dict[str, Any]] = []
        self.validation = PayloadValidation(
            schemas={"send_callback": CallbackArgs, "send_email": EmailArgs},
            https_only=https_only,
            now_iso=lambda: NOW_ISO,
        )
        self.broker = StubBroker(middleware=[self.validation])

        def send_callback(
            callback_url: str,
            email: str,
            plan: str,
            price: float,
            timestamp: str | None = None,
            event_id: str | None = None,
        ) -> None:
            self.ran.append({"callback_url": callback_url, "price": price, "timestamp": timestamp})

        def unchecked(*args: Any, **kwargs: Any) -> None:
            self.ran.append({"unchecked": True})

        def send_email(buyer_email: str, merchant_email: str, plan: str, saas_name: str,
                       logo_url: str | None = None) -> None:
            self.ran.append({"buyer_email": buyer_email})

        self.send_callback = dramatiq.actor(send_callback, broker=self.broker, queue_name=QUEUE)
        self.unchecked = dramatiq.actor(unchecked, broker=self.broker, queue_name=QUEUE)
        self.send_email = dramatiq.actor(send_email, broker=self.broker, queue_name=EMAIL_QUEUE)

    def queued(self, queue: str = QUEUE) -> list[dramatiq.Message[Any]]:
        return [dramatiq.Message.decode(encoded) for encoded in list(self.broker.queues[queue].queue)]


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.broker.close()


@pytest.fixture
def stub_worker(harness: Harness) -> Iterator[Worker]:
    worker = Worker(harness.broker, worker_timeout=20, worker_threads=1)
    worker.start()
    yield worker
    worker.stop()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("callback_url", "http://merchant.example.com/hook"),
        ("email", "not-an-address"),
        ("plan", "Pro\r\nBcc: x@example.com"),
        ("price", -1),
        ("timestamp", "2026-11-27T21:00:00"),
        ("event_id", "has spaces"),
    ],
)
def test_a_send_with_a_bad_argument_raises_naming_the_field_and_enqueues_nothing(
    harness: Harness, field: str, value: Any
) -> None:
    # Given a callback with one bad argument
    # When it is sent
    with pytest.raises(InvalidPayload) as caught:
        harness.send_callback.send(**{**GOOD, field: value})
    # Then the error names the actor and the field, and nothing reached the queue
    assert str(caught.value).startswith(f"send_callback: {field}: ")
    assert "Nothing was enqueued" in str(caught.value)
    assert harness.queued() == []


def test_missing_and_unknown_arguments_are_refused_at_send(harness: Harness) -> None:
    # Given a send without a price and with an unknown keyword
    arguments = {**GOOD, "amount": 5}
    del arguments["price"]
    # When sent, then both are named and nothing is enqueued
    with pytest.raises(InvalidPayload) as caught:
        harness.send_callback.send(**arguments)
    assert "price: is required" in str(caught.value)
    assert "amount: is not an argument of this actor" in str(caught.value)
    assert harness.queued() == []


def test_the_send_error_does_not_echo_the_bad_value(harness: Harness) -> None:
    # Given a distinctive bad address, when sent, then the error does not repeat it
    with pytest.raises(InvalidPayload) as caught:
        harness.send_callback.send(**{**GOOD, "email": "leak-me-please@@x"})
    assert "leak-me-please" not in str(caught.value)


def test_an_omitted_timestamp_is_filled_with_the_send_time(harness: Harness) -> None:
    # Given a valid callback without a timestamp, when sent
    harness.send_callback.send(**GOOD)
    # Then the queued message carries the injected clock's time
    [message] = harness.queued()
    assert message.kwargs == {**GOOD, "timestamp": NOW_ISO}


def test_a_given_timestamp_is_kept(harness: Harness) -> None:
    # Given a callback with its own timestamp, when sent, then it is not replaced
    harness.send_callback.send(**GOOD, timestamp="2025-01-01T00:00:00+01:00")
    [message] = harness.queued()
    assert message.kwargs["timestamp"] == "2025-01-01T00:00:00+01:00"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("https://merchant.example.com/hook", "buyer@example.com", "Pro", 10, NOW_ISO), {}),
        (("https://m.example.com/",), {k: v for k, v in GOOD.items() if k != "callback_url"}),
    ],
    ids=["all-positional", "mixed"],
)
def test_positional_arguments_are_refused_with_a_fix(harness: Harness, args: tuple[Any, ...],
                                                      kwargs: dict[str, Any]) -> None:
    # Given a send that passes arguments by position (middleware reading kwargs, like signing, would miss them)
    # When sent, then InvalidPayload says to pass them by keyword, and nothing is enqueued
    with pytest.raises(InvalidPayload, match="given by position; pass every argument by keyword"):
        harness.send_callback.send(*args, **kwargs)
    assert harness.queued() == []


def test_an_actor_without_a_schema_is_not_checked(harness: Harness) -> None:
    # Given an actor with no schema, when sent anything, then it is enqueued untouched
    harness.unchecked.send(1, x="anything")
    [message] = harness.queued()
    assert (message.args, message.kwargs) == ((1,), {"x": "anything"})


def test_a_message_that_bypassed_send_validation_is_dead_lettered_unrun(harness: Harness, stub_worker: Worker) -> None:
    # Given a bad message enqueued in a worker process (where before_enqueue does not check: it only carries
    # messages that were checked before they ran), as a foreign producer's message would arrive
    bad = dramatiq.Message(
        queue_name=QUEUE,
        actor_name="send_callback",
        args=(),
        kwargs={**GOOD, "callback_url": "ftp://merchant.example.com/", "price": -5},
        options={"retries": 0},
    )
    harness.broker.enqueue(bad)
    # When a worker drains the queue
    harness.broker.join(QUEUE, fail_fast=False, timeout=10_000)
    stub_worker.join()
    # Then the actor never ran and the message is dead, its reason stored
    assert harness.ran == []
    [dead] = harness.broker.dead_letters
    assert dead.message_id == bad.message_id
    assert dead.options["traceback"].startswith("InvalidMessage: ")
    assert "callback_url: " in dead.options["traceback"]
    assert "price: " in dead.options["traceback"]
    assert dead.options["failure_class"] == "InvalidMessage"


def test_a_valid_message_is_processed(harness: Harness, stub_worker: Worker) -> None:
    # Given a valid send, when the worker drains the queue, then the actor ran with the filled timestamp
    harness.send_callback.send(**GOOD)
    harness.broker.join(QUEUE, fail_fast=False, timeout=10_000)
    stub_worker.join()
    assert harness.ran == [{"callback_url": GOOD["callback_url"], "price": 10, "timestamp": NOW_ISO}]
    assert harness.broker.dead_letters == []


def test_a_price_too_big_for_a_float_is_refused_at_send(harness: Harness) -> None:
    # Given a price JSON can carry but a float cannot
    # When sent, then it is refused and nothing is enqueued
    with pytest.raises(InvalidPayload):
        harness.send_callback.send(**{**GOOD, "price": 10**400})
    assert harness.queued() == []


def test_a_queued_message_with_a_price_too_big_for_a_float_is_dead_lettered_unrun(
    harness: Harness, stub_worker: Worker
) -> None:
    # Given such a message put on the queue directly
    harness.broker.enqueue(
        dramatiq.Message(
            queue_name=QUEUE,
            actor_name="send_callback",
            args=(),
            kwargs={**GOOD, "price": 10**400},
            options={"retries": 0},
        )
    )
    # When a worker drains the queue, then the actor did not run
    harness.broker.join(QUEUE, fail_fast=False, timeout=10_000)
    stub_worker.join()
    assert harness.ran == []


# ----------------------------------------------------------------------------------------------------------------
# Issue 9 items 11-13: nothing the gateway can set skips the check
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"retries": 0}, {"retries": 3}, {"redis_message_id": "x"}, {"eta": 1}, {"max_retries": 0}],
    ids=["retries-0", "retries-3", "redis-id", "eta", "max-retries"],
)
def test_no_option_makes_send_skip_the_argument_check(harness: Harness, options: dict[str, Any]) -> None:
    # Given a callback with a bad price, sent with an option that used to make validation skip it
    # When it is sent, then it is refused and nothing is enqueued
    with pytest.raises(InvalidPayload, match="price: "):
        harness.send_callback.send_with_options(kwargs={**GOOD, "price": -1}, **options)
    assert harness.queued() == []


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"webhook_id": "evt_1\r\nX-Injected: 1"}, "options.webhook_id: "),
        ({"webhook_id": "evt 1"}, "options.webhook_id: "),
        ({"webhook_id": ""}, "options.webhook_id: "),
        ({"webhook_id": 7}, "options.webhook_id: "),
        ({"max_retries": -1}, "options.max_retries: "),
        ({"max_retries": True}, "options.max_retries: "),
        ({"min_backoff": 0}, "options.min_backoff: "),
        ({"max_backoff": 10**12}, "options.max_backoff: "),
        ({"retry_schedule": ["5s"]}, "options.retry_schedule"),
        ({"retries": -5}, "options.retries: "),
        ({"traceback": "x" * 5000}, "options.traceback: "),
        ({"failure_class": "Bad\nClass"}, "options.failure_class: "),
        ({"surprise": 1}, "options.surprise: is not an option this service knows"),
    ],
)
def test_a_bad_or_unknown_option_is_refused_at_send(harness: Harness, options: dict[str, Any], problem: str) -> None:
    # Given a valid callback sent with a bad or unknown option
    # When it is sent, then InvalidPayload names the option and nothing is enqueued
    with pytest.raises(InvalidPayload) as caught:
        harness.send_callback.send_with_options(kwargs=GOOD, **options)
    assert problem in str(caught.value)
    assert "\r" not in str(caught.value) and "Injected" not in str(caught.value)
    assert harness.queued() == []


def test_good_options_are_accepted_and_kept(harness: Harness) -> None:
    # Given a callback with a valid webhook id and retry options, when sent, then it is enqueued with them
    harness.send_callback.send_with_options(
        kwargs=GOOD, webhook_id="evt_2026.11:27-A", max_retries=2, min_backoff=100, retry_schedule=(1000, 5000)
    )
    [message] = harness.queued()
    assert message.options["webhook_id"] == "evt_2026.11:27-A"
    assert message.options["retry_schedule"] == [1000, 5000]


def test_a_queued_message_with_a_bad_webhook_id_is_dead_lettered_unrun(harness: Harness, stub_worker: Worker) -> None:
    # Given a message in the queue whose webhook_id would inject a header (as a foreign producer could put there)
    bad = dramatiq.Message(queue_name=QUEUE, actor_name="send_callback", args=(), kwargs={**GOOD, "timestamp": NOW_ISO},
                           options={"webhook_id": "a\r\nb", "unknown_but_harmless": 1})  # fmt: skip
    harness.broker.enqueue(bad)
    # When a worker drains the queue, then it did not run and is dead-lettered naming the option
    harness.broker.join(QUEUE, fail_fast=False, timeout=10_000)
    stub_worker.join()
    assert harness.ran == []
    [dead] = harness.broker.dead_letters
    assert "options.webhook_id: " in dead.options["traceback"]
    assert "unknown_but_harmless" not in dead.options["traceback"]


ENCODED_WORDS = ["=?utf-8?q?bob?=@example.com", "=?UTF-8?B?Ym9i?=@example.com", "bob=?utf-8?q?x?=@example.com"]


@pytest.mark.parametrize("address", ENCODED_WORDS)
@pytest.mark.parametrize(("actor", "field"), [("send_callback", "email"), ("send_email", "buyer_email"),
                                              ("send_email", "merchant_email")])  # fmt: skip
def test_an_address_with_an_rfc_2047_encoded_word_is_refused_at_send(
    harness: Harness, actor: str, field: str, address: str
) -> None:
    # Given an address the email library would decode into another one
    good, queue = (GOOD, QUEUE) if actor == "send_callback" else (EMAIL_GOOD, EMAIL_QUEUE)
    # When it is sent, then it is refused naming the field, and nothing is enqueued
    with pytest.raises(InvalidPayload, match=f"{field}: must not contain an RFC 2047 encoded word"):
        getattr(harness, actor).send(**{**good, field: address})
    assert harness.queued(queue) == []


def test_the_email_library_would_deliver_an_encoded_word_address_elsewhere() -> None:
    # Why item 12 matters: parsed as a header, the encoded word becomes another address
    from email.headerregistry import HeaderRegistry

    header = HeaderRegistry()("To", "=?utf-8?q?bob=40evil.example?=@example.com")
    assert header.addresses[0].addr_spec != "=?utf-8?q?bob=40evil.example?=@example.com"


BIDI_AND_INVISIBLE = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069",
                      "\u200e", "\u200f", "\u061c", "\u200b", "\u2060", "\ufeff", "\u00ad"]  # fmt: skip


@pytest.mark.parametrize("char", BIDI_AND_INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(
    ("actor", "field"),
    [("send_callback", "plan"), ("send_callback", "email"), ("send_callback", "callback_url"),
     ("send_email", "plan"), ("send_email", "saas_name"), ("send_email", "buyer_email"),
     ("send_email", "merchant_email"), ("send_email", "logo_url")],
)  # fmt: skip
def test_bidirectional_and_invisible_format_characters_are_refused(
    harness: Harness, actor: str, field: str, char: str
) -> None:
    # Given a field that reaches a header, the subject or a page, with a bidi control or invisible character in it
    good, queue = (GOOD, QUEUE) if actor == "send_callback" else (EMAIL_GOOD, EMAIL_QUEUE)
    value = {"email": "bu{}yer@example.com", "buyer_email": "bu{}yer@example.com",
             "merchant_email": "ow{}ner@example.com", "callback_url": "https://merchant.example.com/h{}ook",
             "logo_url": "https://merchant.example.com/lo{}go.png"}.get(field, "Pro {} Plan").format(char)  # fmt: skip
    # When it is sent, then it is refused naming the field, and nothing is enqueued
    with pytest.raises(InvalidPayload) as caught:
        getattr(harness, actor).send(**{**good, field: value})
    assert str(caught.value).startswith(f"{actor}: {field}: ")
    assert harness.queued(queue) == []


@pytest.mark.parametrize("name", ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with ZWNJ
                                  "\u0915\u094d\u200d\u0937",  # Devanagari, with ZWJ
                                  "\u05e9\u05dc\u05d5\u05dd Pro"])  # Hebrew (right-to-left, no controls)
def test_joiners_and_right_to_left_text_stay_allowed(harness: Harness, name: str) -> None:
    # Given a plan and SaaS name that need U+200C / U+200D or are written right to left
    # When sent, then they are accepted as they are
    harness.send_email.send(**{**EMAIL_GOOD, "plan": name, "saas_name": name})
    [message] = harness.queued(EMAIL_QUEUE)
    assert message.kwargs["plan"] == message.kwargs["saas_name"] == name
