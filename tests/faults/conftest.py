"""Proof under load and faults: killed workers, a restarted Redis, outages, poison messages, slow merchants.

One file per scenario. Every test runs real `dramatiq actors` processes against a real Redis, HTTP receiver and
SMTP sink, injects one fault, and checks that nothing is lost, nothing is delivered twice where it must not be, and
nothing secret leaks (`common.assert_no_leaks`). Each prints its measured figures (run pytest with -s to see them
as they come) and hands them to the `report` fixture (tests/conftest.py), which repeats them in the terminal
summary under "reported figures". The fake Sentry is the suite's `sentry` fixture.
"""

from __future__ import annotations

import pytest

from tests.faults.common import HEARTBEAT_MS, MAINTENANCE_MS


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The shared worker environment with test-sized liveness settings."""
    return {
        **env,
        "WHISKYPAY_HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_MS),
        "WHISKYPAY_MAINTENANCE_INTERVAL_MS": str(MAINTENANCE_MS),
    }
