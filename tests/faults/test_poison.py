"""Fault: poison messages (garbage, foreign JSON, an unknown actor, an invalid payload) among good ones: each is
dead-lettered once with a reason, reported once, and the workers carry on."""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from typing import Any, cast

import pytest
import redis
from dramatiq import Message

from tests.faults.common import (
    Report,
    StartWorkers,
    assert_no_leaks,
    callback_kwargs,
    send_callbacks,
    sentry_env,
    text,
    webhook_ids,
)
from tests.helpers import FakeSentry, wait_until
from whiskypay.devstack import HttpReceiver
from whiskypay.redaction import masked_sample

pytestmark = pytest.mark.e2e


def push_raw(client: redis.Redis, data: bytes, redis_id: str | None = None) -> str:
    """Store data as a message of callbackQueue exactly as Dramatiq's enqueue does (HSET + RPUSH); return its id."""
    redis_id = redis_id or str(uuid.uuid4())
    client.hset("whiskypay:callbackQueue.msgs", redis_id, data)
    client.rpush("whiskypay:callbackQueue", redis_id)
    return redis_id


def encoded(actor_name: str, kwargs: dict[str, Any], redis_id: str) -> bytes:
    """Return a well-formed Dramatiq message for actor_name, as Dramatiq encodes it."""
    return Message(
        queue_name="callbackQueue",
        actor_name=actor_name,
        args=(),
        kwargs=kwargs,
        options={"redis_message_id": redis_id},
    ).encode()


def test_poison_messages_are_dead_lettered_with_a_reason_and_the_workers_carry_on(
    redis_client: redis.Redis,
    receiver: HttpReceiver,
    sentry: FakeSentry,
    start_workers: StartWorkers,
    env: dict[str, str],
    report: Report,
) -> None:
    # Given 20 good callbacks with five poison messages among them, pushed straight into Redis
    garbage = b"\xff\xfe" + random.Random(7).randbytes(62)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    poison = {
        ids[0]: (garbage, "DecodeError"),
        ids[1]: (b"[1,2]", "DecodeError"),
        ids[2]: (b'{"foo": 1}', "DecodeError"),
        ids[3]: (encoded("no_such_actor", {"x": 1}, ids[3]), "ActorNotFound"),
        ids[4]: (
            encoded("send_callback", {**callback_kwargs(receiver.url("/hook")), "email": "nope"}, ids[4]),
            "InvalidMessage",
        ),
    }
    expected: set[str] = set()
    pending = list(poison.items())
    for index in range(20):
        expected |= set(send_callbacks(receiver.url("/hook"), 1))
        if index % 4 == 1 and pending:
            redis_id, (data, _) = pending.pop(0)
            push_raw(redis_client, data, redis_id)
    assert not pending
    # When a worker (with Sentry on) takes them
    worker = start_workers(env={**env, **sentry_env(sentry)}, threads=4)
    # Then each poison message is dead-lettered once, with a reason that names its problem
    wait_until(lambda: redis_client.zcard("whiskypay:callbackQueue.XQ") >= 5, timeout_s=20, what="5 dead letters")
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= expected, timeout_s=20, what="the 20 good ones")
    raw_letters = cast(dict[bytes, bytes], redis_client.hgetall("whiskypay:callbackQueue.XQ.msgs"))
    stored = {text(key): json.loads(value) for key, value in raw_letters.items()}
    assert set(stored) == set(poison)
    reasons: dict[str, int] = {}
    for redis_id, (data, reason) in poison.items():
        options = stored[redis_id]["options"]
        assert options["traceback"].startswith(f"{reason}: "), (reason, options["traceback"])
        reasons[reason] = reasons.get(reason, 0) + 1
        if reason == "DecodeError":
            assert stored[redis_id]["actor_name"] == "undecodable-message"
            # its bytes are kept only as masked text, with their digest and size
            assert options["raw_sample"] == masked_sample(data) and "raw_base64" not in options
            assert options["raw_sha256"] == hashlib.sha256(data).hexdigest() and options["raw_size"] == len(data)
    # And one Sentry event each; the worker is alive and 5 more good callbacks go through
    wait_until(lambda: len(sentry.events()) >= 5, timeout_s=15, what="5 Sentry events")
    assert worker.running()
    more = set(send_callbacks(receiver.url("/hook"), 5))
    wait_until(lambda: set(webhook_ids(receiver.requests())) >= more, timeout_s=15, what="5 more good ones")
    time.sleep(0.5)
    assert len(sentry.events()) == 5
    assert set(webhook_ids(receiver.requests())) == expected | more
    assert redis_client.zcard("whiskypay:callbackQueue.XQ") == 5
    assert_no_leaks(
        [worker.log().encode(), *sentry.bodies()],
        signatures=[hit.headers["webhook-signature"] for hit in receiver.requests()],
    )
    report(
        f"poison: 5 dead-lettered with reasons {dict(sorted(reasons.items()))}, 5 Sentry events, "
        f"25/25 good callbacks delivered, worker alive"
    )
