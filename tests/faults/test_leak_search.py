"""The leak search every fault scenario ends with: it must catch each secret it looks for (fast, no processes)."""

from __future__ import annotations

import pytest

from tests.faults.common import BUYER, SECRET, SMTP_PASSWORD, assert_no_leaks

CLEAN_LOG = b"[INFO] Delivered send_callback(...) to 127.0.0.1 in 4 ms: HTTP 200\n"


@pytest.mark.parametrize(
    "leak",
    [SECRET, SECRET.removeprefix("whsec_"), SMTP_PASSWORD, BUYER, "v1,"],
    ids=["webhook secret", "its base64 key", "SMTP password", "buyer address", "a signature prefix"],
)
def test_given_a_log_with_a_secret_in_it_when_searched_then_the_search_fails_naming_the_secret(leak: str) -> None:
    with pytest.raises(AssertionError) as failure:
        assert_no_leaks([CLEAN_LOG, b"boom " + leak.encode() + b" trailing"])
    assert repr(leak) in str(failure.value)


def test_given_clean_logs_and_envelopes_when_searched_then_the_search_passes() -> None:
    assert_no_leaks([CLEAN_LOG, b'{"event_id": "abc", "tags": {"callback_host": "127.0.0.1"}}'], signatures=["v1,QUJD"])
