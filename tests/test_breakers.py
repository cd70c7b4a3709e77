"""Merchant breakers: the pure rules (tier 1) and the Redis scripts against the test Redis (tier 3, no workers)."""

from __future__ import annotations

import json
import time

import pytest
import redis

from tests.helpers import NAMESPACE
from whiskypay import keys
from whiskypay.breakers import BreakerStore, BreakerView, dead_letter_data
from whiskypay.errors import DeliveryError, EndpointGone, HttpStatusError
from whiskypay.merchants import Breaker, is_outage, merchant_of, park_limit_reason

QUEUE = "callbackQueue"
M = "shop-1"


def message(n: int, *, timestamp: int | None = None) -> tuple[str, bytes, int]:
    """Return (redis id, encoded message, score) of a fake parked callback number n."""
    rid = f"rid-{n}"
    ts = timestamp if timestamp is not None else 1_700_000_000_000 + n
    data = {"queue_name": QUEUE, "actor_name": "send_callback", "args": [], "kwargs": {"callback_url": "http://h/x"},
            "options": {"redis_message_id": rid, "webhook_id": f"msg_{n}"}, "message_id": f"m-{n}",
            "message_timestamp": ts}
    return rid, json.dumps(data).encode(), ts


def fail(store: BreakerStore, n: int, *, threshold: int = 3, interval_ms: int = 60_000) -> object:
    rid, data, score = message(n)
    return store.fail(M, threshold=threshold, probe_interval_ms=interval_ms, error="HttpStatusError: HTTP 503 from h",
                      host="h", queue=QUEUE, redis_id=rid, data=data, score=score)


def park(store: BreakerStore, n: int, **kwargs: object) -> str:
    rid, data, score = message(n, **kwargs)  # type: ignore[arg-type]
    return store.park(M, redis_id=rid, data=data, score=score, host="h", queue=QUEUE)


@pytest.fixture
def store(redis_client: redis.Redis) -> BreakerStore:
    return BreakerStore(redis_client, NAMESPACE)


# ---------------------------------------------------------------------------------------------------------------------
# tier 1


@pytest.mark.parametrize(
    ("kwargs", "merchant"),
    [
        ({"merchant_id": "m_1", "callback_url": "https://shop.example/h?t=1"}, "m_1"),
        ({"callback_url": "https://Shop.Example.:8443/h?t=1"}, "host=shop.example"),
        ({"callback_url": "https://B\u00fccher.example/h"}, "host=xn--bcher-kva.example"),
        ({"merchant_id": "shop.example", "callback_url": "https://shop.example/h"}, "shop.example"),
        ({"merchant_id": None, "callback_url": "http://[::1]:80/h"}, "host=::1"),
        ({"callback_url": "http://[0:0:0:0:0:0:0:1]/h"}, "host=::1"),
        ({"callback_url": 3}, None),
        (None, None),
    ],
)
def test_a_callbacks_merchant_is_its_merchant_id_else_its_host(kwargs: object, merchant: str | None) -> None:
    assert merchant_of(kwargs) == merchant


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (HttpStatusError("HTTP 503", http_status=503), True),
        (HttpStatusError("HTTP 500", http_status=500), True),
        (HttpStatusError("HTTP 408", http_status=408), True),
        (HttpStatusError("HTTP 429", http_status=429), True),
        (HttpStatusError("HTTP 404", http_status=404), False),
        (HttpStatusError("HTTP 302", http_status=302), False),
        (DeliveryError("timed out waiting for h"), True),
        (DeliveryError("could not connect to h (ConnectionRefusedError)"), True),
        (EndpointGone("HTTP 410", http_status=410), False),
        (ValueError("bug"), False),
    ],
)
def test_only_5xx_408_429_timeouts_and_connection_errors_count_as_an_outage(error: Exception, outage: bool) -> None:
    assert is_outage(error) is outage


def test_the_park_limit_reason_says_since_when_the_merchant_was_unreachable() -> None:
    reason = park_limit_reason("shop-1", parked_at_ms=0, since_ms=1_000, limit_ms=3_600_000, now_ms=7_200_000)
    assert reason.startswith("merchant shop-1 unreachable since 1970-01-01T00:00:01.000Z: parked 2.0 h")
    assert "WHISKYPAY_PARK_MAX_MS (3600000 ms)" in reason


def test_the_local_view_follows_announcements() -> None:
    view = BreakerView()
    view.apply(b"suspect 8.merchant:6.shop-1", now_ms=1000, probe_interval_ms=500)
    assert view.get("shop-1") is not None and view.get("shop-1").failures == 1  # type: ignore[union-attr]
    view.apply(b"open 8.merchant:6.shop-1", now_ms=1000, probe_interval_ms=500)
    opened = view.get("shop-1")
    assert opened is not None and (opened.state, opened.next_probe_at_ms) == ("open", 1500)
    view.apply(b"closed 8.merchant:6.shop-1", now_ms=2000, probe_interval_ms=500)
    closed = view.get("shop-1")
    assert closed is not None and (closed.state, closed.failures) == ("closed", 0)
    view.apply(b"garbage", now_ms=0, probe_interval_ms=1)
    assert view.get("garbage") is None


def test_a_breaker_summary_has_the_documented_fields() -> None:
    breaker = Breaker.of("m", {"state": "open", "failures": "12", "since": "0", "next_probe_at": "60000",
                               "last_error": "HttpStatusError: HTTP 503 from h"}, parked=3)
    assert breaker.summary() == {
        "merchant": "m", "state": "open", "parked": 3, "failures": 12, "since": "1970-01-01T00:00:00.000Z",
        "last_error": "HttpStatusError: HTTP 503 from h", "next_probe_at": "1970-01-01T00:01:00.000Z", "held": False,
        "host": None,
    }


# ---------------------------------------------------------------------------------------------------------------------
# tier 3: the scripts


def test_failures_open_the_breaker_once_at_the_threshold_and_park_from_then_on(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.breaker_channel(NAMESPACE))
    results = [fail(store, n) for n in range(5)]
    assert [(r.opened, r.parked, r.failures) for r in results] == [  # type: ignore[attr-defined]
        (False, False, 1), (False, False, 2), (True, True, 3), (False, True, 4), (False, True, 5)
    ]
    assert park(store, 9) == "parked"
    assert redis_client.zrange(keys.parked(NAMESPACE, M), 0, -1) == [b"rid-2", b"rid-3", b"rid-4", b"rid-9"]
    heard = []
    for _ in range(20):
        got = pubsub.get_message(timeout=0.05)
        if got and got["type"] == "message":
            heard.append(got["data"])
    assert heard == [b"suspect 8.merchant:6.shop-1", b"open 8.merchant:6.shop-1"]
    breaker = store.snapshot()[M]
    assert (breaker.state, breaker.parked, breaker.failures, breaker.queue) == ("open", 4, 5, QUEUE)


def test_a_reply_resets_the_count_and_a_merchant_without_parked_callbacks_leaves_no_keys(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    fail(store, 1)
    fail(store, 2)
    assert store.succeed(M) == 1
    assert fail(store, 3).failures == 1  # type: ignore[attr-defined]
    assert store.succeed(M) == 1
    assert redis_client.keys(f"{NAMESPACE}:whiskypay.*") == []


def test_a_closed_merchants_callback_is_not_parked_unless_forced(store: BreakerStore) -> None:
    fail(store, 1)
    assert park(store, 2) == "closed"
    rid, data, score = message(3)
    assert store.park(M, redis_id=rid, data=data, score=score, host="h", queue=QUEUE, force=True) == "parked"


def test_parked_callbacks_keep_the_order_they_were_sent_in_and_a_redelivered_copy_is_parked_once(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    for n in range(3):
        fail(store, 100 + n)
    for n in (5, 1, 4, 1, 2):  # parked in any order, one of them twice
        park(store, n)
    assert redis_client.zrange(keys.parked(NAMESPACE, M), 0, -1) == [
        b"rid-1", b"rid-2", b"rid-4", b"rid-5", b"rid-102"
    ]


def test_exactly_one_probe_per_interval_across_workers_oldest_first_to_the_queue_head(
    store: BreakerStore, redis_client: redis.Redis, redis_url: str
) -> None:
    other = BreakerStore(redis.Redis.from_url(redis_url), NAMESPACE)  # another worker, its own connection
    for n in range(3):
        fail(store, 10 + n, interval_ms=300)
    redis_client.hset(keys.breaker(NAMESPACE, M), "next_probe_at", 0)  # due now
    redis_client.rpush(keys.queue(NAMESPACE, QUEUE), "other")
    takes = [s.take_probe(M, queue=QUEUE, probe_interval_ms=300)[0] for s in (store, other, store, other)]
    assert takes == [True, False, False, False]
    assert redis_client.lrange(keys.queue(NAMESPACE, QUEUE), 0, -1) == [b"rid-12", b"other"]
    assert redis_client.hget(keys.messages(NAMESPACE, QUEUE), "rid-12") is not None
    # The probe's message is recognised as the probe; a failed probe is parked again in its place.
    rid, data, score = message(12)
    assert store.park(M, redis_id=rid, data=data, score=score, host="h", queue=QUEUE) == "probe"
    assert fail(store, 12).parked  # type: ignore[attr-defined]
    assert redis_client.zrange(keys.parked(NAMESPACE, M), 0, 0) == [b"rid-12"]
    redis_client.hdel(keys.messages(NAMESPACE, QUEUE), "rid-12")  # the failed probe's ack
    time.sleep(0.35)
    assert [s.take_probe(M, queue=QUEUE, probe_interval_ms=300)[0] for s in (other, store)] == [True, False]


def test_a_held_merchant_is_never_probed_and_closing_it_releases_oldest_first_at_the_rate_into_the_lane(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    assert store.operate(M, "open", queue=QUEUE) == "none"
    for n in (3, 1, 2, 4, 5):
        assert park(store, n) == "parked"
    redis_client.hset(keys.breaker(NAMESPACE, M), "next_probe_at", 0)
    assert store.take_probe(M, queue=QUEUE, probe_interval_ms=1) == (False, 0)
    assert store.snapshot()[M].held
    assert store.release(M, queue=QUEUE, rate=20) == (0, -1)  # still open: nothing moves
    assert store.operate(M, "close", queue=QUEUE) == "open"
    assert store.release(M, queue=QUEUE, rate=20) == (2, 3)  # a batch is rate / 10
    assert store.release(M, queue=QUEUE, rate=20) == (0, 3)  # the next is 100 ms away, for every worker
    time.sleep(0.11)
    assert store.release(M, queue=QUEUE, rate=20) == (2, 1)
    time.sleep(0.11)
    assert store.release(M, queue=QUEUE, rate=20) == (1, 0)
    # Into the queue's replay lane (served after fresh work), in the order they were sent
    lane = keys.replay_lane(NAMESPACE, QUEUE)
    assert redis_client.zrange(lane, 0, -1) == [b"rid-1", b"rid-2", b"rid-3", b"rid-4", b"rid-5"]
    assert redis_client.hget(keys.replay_lane_messages(NAMESPACE, QUEUE), "rid-1") is not None
    assert [k for k in redis_client.keys(f"{NAMESPACE}:whiskypay.*") if b".replay:" not in k] == []


def test_a_callback_is_released_only_once_the_worker_that_parked_it_acked_it(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    from whiskypay.replay import LanePromoter

    # Given a callback a worker fetched (it is in the queue's hash, unacked) and parked, as a closed merchant's
    # forced park or an outage failure does, and another parked one after it
    store.operate(M, "open", queue=QUEUE)
    messages = keys.messages(NAMESPACE, QUEUE)
    for n in (1, 2):
        rid, data, _ = message(n)
        redis_client.hset(messages, rid, data)  # fetched by a worker
        park(store, n)
    redis_client.hdel(messages, "rid-2")  # callback 2's worker acked it already
    # When the merchant closes before the ack, then nothing is released, nor anything ahead of it (order holds)
    store.operate(M, "close", queue=QUEUE)
    assert store.release(M, queue=QUEUE, rate=1000, tick_s=1) == (0, 2)
    # When the worker acks it (Dramatiq's ack: SREM its acks, HDEL Q.msgs[rid]), then both go, in order
    redis_client.hdel(messages, "rid-1")
    assert store.release(M, queue=QUEUE, rate=1000, tick_s=1) == (2, 0)
    assert LanePromoter(redis_client, NAMESPACE).promote(QUEUE, 10, now_ms=int(time.time() * 1000))[0] == 2
    # And each is on the queue with its message
    assert redis_client.lrange(keys.queue(NAMESPACE, QUEUE), 0, -1) == [b"rid-1", b"rid-2"]
    assert redis_client.hget(messages, "rid-1") is not None and redis_client.hget(messages, "rid-2") is not None


def test_the_probe_is_taken_only_once_the_worker_that_parked_it_acked_it(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    # Given a merchant whose breaker opened, and its oldest callback parked by a worker that has not acked it yet
    for n in (10, 11, 12):
        fail(store, n)
    rid, data, _ = message(1)
    messages = keys.messages(NAMESPACE, QUEUE)
    redis_client.hset(messages, rid, data)  # fetched by a worker, still unacked
    assert park(store, 1) == "parked"
    redis_client.hset(keys.breaker(NAMESPACE, M), "next_probe_at", 0)  # a probe is due
    # When a probe is due before the ack, then none is taken (the ack would delete the probe's message)
    assert store.take_probe(M, queue=QUEUE, probe_interval_ms=60_000)[0] is False
    # When the worker acks it, then it is the probe, on the queue's head with its message
    redis_client.hdel(messages, rid)
    assert store.take_probe(M, queue=QUEUE, probe_interval_ms=60_000)[0] is True
    assert redis_client.lrange(keys.queue(NAMESPACE, QUEUE), 0, -1) == [b"rid-1"]
    assert redis_client.hget(messages, rid) == data


def test_a_release_waits_while_the_lane_holds_a_seconds_worth(store: BreakerStore, redis_client: redis.Redis) -> None:
    store.operate(M, "open", queue=QUEUE)
    for n in range(4):
        park(store, n)
    store.operate(M, "close", queue=QUEUE)
    redis_client.zadd(keys.replay_lane(NAMESPACE, QUEUE), {f"other-{n}": n for n in range(10)})  # 10 replays wait
    assert store.release(M, queue=QUEUE, rate=10) == (0, 4)  # a second's worth (10) is already waiting
    redis_client.zremrangebyrank(keys.replay_lane(NAMESPACE, QUEUE), 0, 0)
    assert store.release(M, queue=QUEUE, rate=10) == (1, 3)


def test_callbacks_parked_past_the_limit_are_dead_lettered_once_with_their_reason(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    for n in range(3):
        fail(store, n)
    redis_client.zadd(keys.parked_at(NAMESPACE, M), {"rid-2": 1_000}, xx=True)  # parked long ago
    found = store.expired(M, limit_ms=60_000, check_interval_ms=1_000)
    assert found is not None
    now, since, reported, rows = found
    assert since is not None and reported is None and [row.redis_id for row in rows] == ["rid-2"]
    assert store.expired(M, limit_ms=60_000, check_interval_ms=1_000) is None  # another worker: not due
    letters = [(row.redis_id, dead_letter_data(row.data, reason="why", failed_at_ms=now)) for row in rows]
    assert store.dead_letter(M, queue=QUEUE, letters=letters, reported_since=since) == 1
    assert store.dead_letter(M, queue=QUEUE, letters=letters, reported_since=since) == 0
    dead = json.loads(redis_client.hget(keys.dead_letter_messages(NAMESPACE, QUEUE), "rid-2"))  # type: ignore[arg-type]
    assert dead["options"]["traceback"] == "ParkLimitExceeded: why"
    assert dead["options"]["webhook_id"] == "msg_2"
    assert redis_client.hget(keys.outcome_counters(NAMESPACE, QUEUE), "failed") == b"1"
    assert store.snapshot()[M].parked == 0


def test_a_failure_count_that_never_reaches_the_threshold_expires_and_leaves_the_index(
    store: BreakerStore, redis_client: redis.Redis
) -> None:
    fail(store, 1)
    assert 0 < redis_client.pttl(keys.breaker(NAMESPACE, M)) <= 86_400_000
    redis_client.delete(keys.breaker(NAMESPACE, M))  # as if the day passed
    assert store.snapshot() == {}
    assert redis_client.smembers(keys.breaker_index(NAMESPACE)) == set()
    fail(store, 2)
    fail(store, 3)
    fail(store, 4)  # the third opens it: an open breaker never expires
    assert redis_client.pttl(keys.breaker(NAMESPACE, M)) == -1


def test_a_snapshot_does_not_undo_what_this_process_counted_while_it_was_read() -> None:
    now = [10.0]
    view = BreakerView(clock=lambda: now[0])
    view.update("a", failures=3)
    taken_at = now[0] = 11.0  # the keeper starts reading Redis
    view.update("a", failures=5)  # a worker thread counts two more meanwhile
    view.update("b", failures=1)
    old = Breaker.of("a", {"failures": "3"}, parked=0)
    view.replace_all({"a": old, "c": Breaker.of("c", {}, parked=2)}, taken_at=taken_at)
    assert view.get("a").failures == 5 and view.get("b") is not None and view.get("c") is not None  # type: ignore[union-attr]
    now[0] = 12.0
    view.replace_all({"a": old}, taken_at=12.0)  # a later snapshot is the truth again
    assert view.get("a").failures == 3 and view.get("b") is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("ms", "shown"),
    [(None, None), (0, "1970-01-01T00:00:00.000Z"), (1_780_000_000_123, "2026-05-28T20:26:40.123Z")],
)
def test_a_unix_ms_time_reads_as_utc_iso_with_milliseconds_everywhere(ms: int | None, shown: str | None) -> None:
    from whiskypay import keys, merchants

    assert keys.iso_ms(ms) == shown
    assert merchants.iso_ms is keys.iso_ms  # the breaker's park reason and `whiskypay merchants` read it too


@pytest.mark.parametrize("name", ["m_42", "shop.example", "a:b", "8.merchant:1.x", "host=shop.example", "host=::1"])
def test_a_breaker_name_is_stored_as_a_tagged_length_prefixed_pair_and_reads_back(name: str) -> None:
    member = keys.breaker_member(name)
    assert keys.breaker_name(member) == name
    assert member.startswith("4.host:" if name.startswith("host=") else "8.merchant:")


def test_a_merchant_id_and_a_host_of_the_same_spelling_are_two_identities_and_old_records_are_not_read() -> None:
    # merchant_id "shop.example" and a callback to host "shop.example" without one
    merchant, host = merchant_of({"merchant_id": "shop.example"}), merchant_of({"callback_url": "https://shop.example/"})
    assert (merchant, host) == ("shop.example", "host=shop.example")
    assert keys.breaker(NAMESPACE, merchant) != keys.breaker(NAMESPACE, host)  # type: ignore[arg-type]
    assert keys.parked(NAMESPACE, merchant) != keys.parked(NAMESPACE, host)  # type: ignore[arg-type]
    # an untagged member (written before breakers were tagged) is no breaker name: not migrated
    assert keys.breaker_name("shop.example") is None and keys.breaker_name("4.host:3.abc:") is None


@pytest.mark.parametrize(
    ("typed", "name"),
    [("host=Shop.Example.", "host=shop.example"), ("host=[::1]", "host=::1"), ("host=0:0::1", "host=::1"),
     ("host=B\u00fccher.example", "host=xn--bcher-kva.example"), ("Shop.Example", "Shop.Example"), ("a:b", "a:b")],
)
def test_an_operator_names_a_host_breaker_host_equals_and_any_spelling_of_the_host_is_the_one_breaker(
    typed: str, name: str
) -> None:
    from whiskypay.merchants import operator_name

    # a merchant_id is taken as typed (they are case-sensitive ids); "=" is never in one
    assert operator_name(typed) == name


def test_a_merchant_ids_outage_does_not_trip_the_breaker_of_the_host_of_the_same_name(store: BreakerStore) -> None:
    # Given merchant_id "shop.example" failing past the threshold
    for n in range(3):
        rid, data, score = message(n)
        store.fail("shop.example", threshold=3, probe_interval_ms=60_000, error="HttpStatusError: HTTP 503 from h",
                   host="shop.example", queue=QUEUE, redis_id=rid, data=data, score=score)
    # Then its breaker is open, and a callback to https://SHOP.example./ without a merchant_id is not parked
    host = merchant_of({"callback_url": "https://SHOP.example./hook"})
    assert host == "host=shop.example"
    snapshot = store.snapshot()
    assert snapshot["shop.example"].state == "open" and host not in snapshot
    rid, data, score = message(9)
    assert store.park(host, redis_id=rid, data=data, score=score, host="shop.example", queue=QUEUE) == "closed"
    # And an operator holding host=shop.example holds the one host breaker, which callbacks spelled either way hit
    assert store.operate("host=shop.example", "open", queue=QUEUE) == "none"
    assert store.park(merchant_of({"callback_url": "https://shop.example/x"}) or "", redis_id=rid, data=data,
                      score=score, host="shop.example", queue=QUEUE) == "parked"
    assert set(store.snapshot()) == {"shop.example", "host=shop.example"}
