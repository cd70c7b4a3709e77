"""Tier 1: the attempt watchdog ends every attempt at its deadline, without being woken for each one (issue 14)."""

from __future__ import annotations

import time

from whiskypay.deadline import AttemptScope, Watchdog


def wait_expired(scope: AttemptScope, within_s: float) -> float:
    """Poll scope.expired; return the seconds it took (or within_s if it never expired)."""
    started = time.monotonic()
    while not scope.expired and time.monotonic() - started < within_s:
        time.sleep(0.005)
    return time.monotonic() - started


def test_an_attempt_opened_while_the_watchdog_ticks_for_another_still_ends_at_its_deadline() -> None:
    # Given a watchdog ticking every 50 ms for a long attempt (it is in its timed wait: nobody wakes it)
    watchdog = Watchdog(tick_s=0.05)
    try:
        with watchdog.attempt(30) as long_attempt:
            time.sleep(0.1)
            # When a second attempt with a 0.2 s budget opens
            with watchdog.attempt(0.2) as short_attempt:
                took = wait_expired(short_attempt, within_s=3)
            # Then it was ended at its deadline (plus at most a tick and some scheduling), the long one was not
            assert short_attempt.expired
            assert 0.15 < took < 0.2 + 0.05 + 0.5
            assert not long_attempt.expired
    finally:
        watchdog.stop()


def test_an_attempt_opened_on_a_sleeping_watchdog_ends_at_its_deadline() -> None:
    # Given a watchdog whose thread runs but has had no attempt open for longer than it lingers (it sleeps)
    watchdog = Watchdog(tick_s=0.05, linger_s=0.1)
    try:
        with watchdog.attempt(5):
            pass
        time.sleep(0.4)
        # When an attempt with a 0.2 s budget opens, then the watchdog was woken and ends it in time
        with watchdog.attempt(0.2) as attempt:
            took = wait_expired(attempt, within_s=3)
        assert attempt.expired
        assert took < 0.2 + 0.05 + 0.5
    finally:
        watchdog.stop()


def test_an_attempt_opened_soon_after_the_last_one_ended_ends_at_its_deadline_without_waking_the_watchdog() -> None:
    # Given a watchdog whose last attempt just ended (it lingers, ticking, for a second)
    watchdog = Watchdog(tick_s=0.05, linger_s=1.0)
    try:
        with watchdog.attempt(5):
            pass
        # When the next attempt, with a 0.2 s budget, opens at once, then the ticking watchdog ends it in time
        with watchdog.attempt(0.2) as attempt:
            took = wait_expired(attempt, within_s=3)
        assert attempt.expired
        assert took < 0.2 + 0.05 + 0.5
    finally:
        watchdog.stop()
