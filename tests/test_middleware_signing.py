"""Tier 2: WebhookSigning alone on a StubBroker: a stable webhook-id per event, signed headers, start-up refusal."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from standardwebhooks.webhooks import Webhook

from middleware.signing import WebhookSigning, WorkerStartRefused
from whiskypay.signing import signature, verify

KEY = bytes(range(32))
OLD_KEY = bytes(range(50, 82))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
NOW = 1_790_000_000.75
BODY = b'{"plan":"Pro"}'


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    """A StubBroker with only WebhookSigning, and throwaway actors on callbackQueue and emailQueue."""
    broker = StubBroker(middleware=[WebhookSigning(keys=(KEY,), clock=lambda: NOW)])
    yield broker
    broker.close()


def queued(broker: StubBroker, queue: str) -> list[dramatiq.Message[Any]]:
    return [dramatiq.Message.decode(encoded) for encoded in list(broker.queues[queue].queue)]


def signing(broker: StubBroker) -> WebhookSigning:
    return next(m for m in broker.middleware if isinstance(m, WebhookSigning))


def test_a_callback_with_an_event_id_uses_it_as_its_webhook_id(stub_broker: StubBroker) -> None:
    # Given a callback actor, when a message with event_id is sent
    actor = dramatiq.actor(lambda **kw: None, broker=stub_broker, actor_name="cb", queue_name="callbackQueue")
    actor.send(event_id="evt_42", plan="Pro")
    # Then its webhook_id option is the event id
    [message] = queued(stub_broker, "callbackQueue")
    assert message.options["webhook_id"] == "evt_42"


@pytest.mark.parametrize("kwargs", [{}, {"event_id": None}, {"event_id": ""}], ids=["absent", "none", "empty"])
def test_a_callback_without_an_event_id_gets_msg_and_its_message_id(
    stub_broker: StubBroker, kwargs: dict[str, Any]
) -> None:
    # Given a callback sent without a usable event_id
    actor = dramatiq.actor(lambda **kw: None, broker=stub_broker, actor_name="cb", queue_name="callbackQueue")
    sent = actor.send(**kwargs)
    # Then its webhook_id is "msg_" and the message id
    [message] = queued(stub_broker, "callbackQueue")
    assert message.options["webhook_id"] == f"msg_{sent.message_id}"


def test_a_requeued_callback_keeps_its_webhook_id(stub_broker: StubBroker) -> None:
    # Given a callback that already has a webhook_id (a retry, or a re-drive from the dead-letter queue)
    actor = dramatiq.actor(lambda **kw: None, broker=stub_broker, actor_name="cb", queue_name="callbackQueue")
    message = actor.message_with_options(kwargs={"event_id": "evt_new"}, webhook_id="evt_original")
    # When it is enqueued again, with and without a delay
    stub_broker.enqueue(message)
    stub_broker.enqueue(message, delay=60_000)
    # Then the id is unchanged both times
    ids = [
        m.options["webhook_id"] for m in queued(stub_broker, "callbackQueue") + queued(stub_broker, "callbackQueue.DQ")
    ]
    assert ids == ["evt_original", "evt_original"]


def test_a_message_on_another_queue_gets_no_webhook_id(stub_broker: StubBroker) -> None:
    # Given an email actor, when a message with an event_id is sent, then no webhook_id is added
    actor = dramatiq.actor(lambda **kw: None, broker=stub_broker, actor_name="mail", queue_name="emailQueue")
    actor.send(event_id="evt_42")
    [message] = queued(stub_broker, "emailQueue")
    assert "webhook_id" not in message.options


def test_headers_are_signed_at_the_injected_clocks_time(stub_broker: StubBroker) -> None:
    # Given the middleware with a fixed clock
    # When an attempt's headers are built
    headers = signing(stub_broker).headers("evt_42", BODY)
    # Then the timestamp is the clock's whole seconds and the signature matches it
    assert headers == {
        "webhook-id": "evt_42",
        "webhook-timestamp": "1790000000",
        "webhook-signature": signature(KEY, "evt_42", 1_790_000_000, BODY),
    }
    verify(BODY, headers, SECRET, now=NOW)


def test_each_attempt_is_signed_with_a_fresh_timestamp() -> None:
    # Given a clock that moves an hour between two attempts
    times = iter([1_790_000_000.0, 1_790_003_600.0])
    middleware = WebhookSigning(keys=(KEY,), clock=lambda: next(times))
    # When two attempts of one event are signed
    first, second = middleware.headers("evt_42", BODY), middleware.headers("evt_42", BODY)
    # Then the id is the same and the timestamps and signatures differ
    assert first["webhook-id"] == second["webhook-id"] == "evt_42"
    assert (first["webhook-timestamp"], second["webhook-timestamp"]) == ("1790000000", "1790003600")
    assert first["webhook-signature"] != second["webhook-signature"]


def test_headers_signed_with_the_real_clock_pass_the_reference_verifier() -> None:
    # Given the middleware with two keys and the default clock
    middleware = WebhookSigning(keys=(KEY, OLD_KEY))
    # When headers are built, then the reference library accepts them with either secret
    headers = middleware.headers("evt_42", BODY)
    Webhook(SECRET).verify(BODY, headers)
    Webhook("whsec_" + base64.b64encode(OLD_KEY).decode()).verify(BODY, headers)


@pytest.mark.parametrize(
    "queues",
    [{"callbackQueue"}, {"callbackQueue", "emailQueue"}, None],
    ids=["callbacks-only", "both", "all-queues"],
)
def test_a_callback_worker_without_a_key_refuses_to_start(queues: set[str] | None) -> None:
    # Given no webhook key, and a worker that consumes callbackQueue (explicitly or by consuming every queue)
    broker = StubBroker(middleware=[WebhookSigning(keys=())])
    worker = Worker(broker, queues=queues)
    # When the worker boots, then it is refused with a text naming the setting
    with pytest.raises(WorkerStartRefused, match="WHISKYPAY_WEBHOOK_SECRET is not set"):
        broker.emit_before("worker_boot", worker)
    broker.close()


def test_an_email_only_worker_starts_without_a_key() -> None:
    # Given no webhook key, and a worker that only consumes emailQueue
    broker = StubBroker(middleware=[WebhookSigning(keys=())])
    worker = Worker(broker, queues={"emailQueue"})
    # When it boots, then nothing is refused
    broker.emit_before("worker_boot", worker)
    broker.close()


def test_a_callback_worker_with_a_key_starts() -> None:
    # Given a key, when a callback worker boots (the hook only reads consumer_whitelist), then nothing is refused
    WebhookSigning(keys=(KEY,)).before_worker_boot(StubBroker(middleware=[]), SimpleNamespace(consumer_whitelist=None))  # type: ignore[arg-type]


def test_the_refusal_stops_a_real_worker_start() -> None:
    # Given no key and a real worker on callbackQueue
    broker = StubBroker(middleware=[WebhookSigning(keys=())])
    worker = Worker(broker, queues={"callbackQueue"}, worker_timeout=20)
    # When it is started, then start() raises (the error is a MiddlewareError, which emit_before re-raises)
    try:
        with pytest.raises(WorkerStartRefused):
            worker.start()
    finally:
        worker.stop()
        broker.close()

