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

        self.send_callback = dramatiq.actor(send_callback, broker=self.broker, queue_name=QUEUE)
        self.unchecked = dramatiq.actor(unchecked, broker=self.broker, queue_name=QUEUE)

    def queued(self) -> list[dramatiq.Message[Any]]:
        return [dramatiq.Message.decode(encoded) for encoded in list(self.broker.queues[QUEUE].queue)]


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
    # Given a bad message put on the queue directly (a "retries" option makes before_enqueue skip it)
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
