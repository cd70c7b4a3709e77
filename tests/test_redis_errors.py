"""The one Redis error classifier: which replies are waited out and which stop a worker (pure, no Redis)."""

from __future__ import annotations

import logging

import pytest
import redis
from redis._parsers.base import BaseParser

from whiskypay.redis_errors import call_through_transient, classify_redis_error, describe, error_code


def reply(text: str) -> redis.RedisError:
    """Return the exception redis-py raises for the error reply text (its own parser's choice of class)."""
    exc = BaseParser.parse_error(text)
    assert isinstance(exc, redis.RedisError)
    return exc


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."), "transient", ""),
        (redis.TimeoutError("Timeout reading from socket"), "transient", ""),
        (ConnectionResetError(104, "Connection reset by peer"), "transient", ""),
        (redis.exceptions.InvalidResponse("Protocol Error: b'\\x00'"), "transient", ""),
        (reply("LOADING Redis is loading the dataset in memory"), "transient", "LOADING"),
        (reply("READONLY You can't write against a read only replica. script: 0a1b, on @user_script:1."),
         "transient", "READONLY"),
        (reply("OOM command not allowed when used memory > 'maxmemory'."), "transient", "OOM"),
        (reply("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."),
         "transient", "BUSY"),
        (reply("TRYAGAIN Multiple keys request during rehashing of slot"), "transient", "TRYAGAIN"),
        (reply("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
         "transient", "MASTERDOWN"),
        (reply("CLUSTERDOWN The cluster is down"), "transient", "CLUSTERDOWN"),
        (reply("NOREPLICAS Not enough good replicas to write. script: 0a1b, on @user_script:1."),
         "transient", "NOREPLICAS"),
        (reply("NOPERM this user has no permissions to run the 'hset' command"), "configuration", "NOPERM"),
        (reply("ERR The user executing the script can't run this command or subcommand script: 0a1b, on "
               "@user_script:32."), "configuration", "NOPERM"),
        (reply("WRONGTYPE Operation against a key holding the wrong kind of value"), "configuration", "WRONGTYPE"),
        (reply("NOAUTH Authentication required."), "configuration", "NOAUTH"),
        (reply("WRONGPASS invalid username-password pair or user is disabled."), "configuration", "WRONGPASS"),
        (reply("ERR unknown command 'EVALSHA', with args beginning with: "), "configuration", "ERR"),
        (reply("EXECABORT Transaction discarded because of previous errors."), "configuration", "EXECABORT"),
        (redis.DataError("Invalid input of type: 'dict'"), "configuration", ""),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_each_redis_error_is_either_waited_out_or_stops_the_worker(
    exc: BaseException, kind: str, code: str
) -> None:
    assert (classify_redis_error(exc), error_code(exc)) == (kind, code)


def test_a_description_keeps_the_servers_reason_but_not_the_script_id() -> None:
    exc = reply("READONLY You can't write against a read only replica. script: 0a1b2c, on @user_script:1.")
    assert describe(exc) == "ReadOnlyError: You can't write against a read only replica."


def test_a_transient_error_is_retried_until_the_call_goes_through_and_the_wait_is_capped(caplog) -> None:
    # Given a call that Redis refuses with OOM 12 times, then accepts
    outcomes: list[BaseException | str] = [reply("OOM command not allowed")] * 12 + ["OK"]
    waits: list[float] = []

    def call() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    # When it is called through transient errors
    with caplog.at_level(logging.INFO):
        result = call_through_transient(call, what="a test write", logger=logging.getLogger("t"), sleep=waits.append)
    # Then it returned the 13th call's result, after waits that double from 100 ms up to 1 s
    assert result == "OK" and len(waits) == 12
    assert waits[:4] == [0.1, 0.2, 0.4, 0.8] and set(waits[4:]) == {1.0}
    assert "Redis refused a test write (OutOfMemoryError" in caplog.text
    assert "accepted a test write after 12 refusal(s)" in caplog.text


def test_a_configuration_error_is_raised_at_once() -> None:
    waits: list[float] = []

    def call() -> None:
        raise reply("NOPERM this user has no permissions to run the 'hset' command")

    with pytest.raises(redis.exceptions.NoPermissionError):
        call_through_transient(call, what="a test write", logger=logging.getLogger("t"), sleep=waits.append)
    assert waits == []
