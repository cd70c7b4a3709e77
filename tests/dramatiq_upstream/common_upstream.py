"""The common.py for Dramatiq's own tests/test_redis.py (copied next to it as common.py; see conftest_upstream.py).

test_redis.py imports only `worker` from Dramatiq's tests/common.py, which the source distribution does not ship.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dramatiq import Worker


@contextmanager
def worker(*args: Any, **kwargs: Any) -> Iterator[Worker]:
    """Start a Worker with these arguments for the block, and stop it afterwards."""
    started = Worker(*args, **kwargs)
    try:
        started.start()
        yield started
    finally:
        started.stop()
