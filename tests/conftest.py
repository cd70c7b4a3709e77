"""Shared pytest fixtures: a test Redis, webhook receiver, SMTP sink and real dramatiq worker processes.

Ordering rule: ``actors`` builds its broker from the environment at import time, so the test Redis URL and the
test-friendly WHISKYPAY_* defaults are put into ``os.environ`` right here, at conftest import, before any test module
can import ``actors``. This file never imports ``actors`` itself.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from dramatiq import Middleware
from dramatiq.brokers.redis import RedisBroker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `whiskypay` importable under plain `pytest`

from tests.helpers import NAMESPACE, TEST_SECRET, FakeSentry
from whiskypay.devstack import HttpReceiver, RedisServer, SmtpSink, WorkerProcess, redis_answers
from whiskypay.redis_broker import WhiskyPayRedisBroker

REPO_ROOT = Path(__file__).resolve().parent.parent

TEST_REDIS_DB = 15


def _with_db(url: str, db: int) -> str:
    """Return ``url`` pointing at database ``db``.

    Parameters:
        url: redis:// URL.
        db: database number.
    """
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


_private_redis: RedisServer | None = None


def _stop_private_redis() -> None:
    global _private_redis
    server, _private_redis = _private_redis, None
    if server is not None:
        server.stop()


def _choose_test_redis() -> str:
    """Use WHISKYPAY_REDIS_URL (on DB 15) if it answers, else start a private redis-server."""
    global _private_redis
    given = os.environ.get("WHISKYPAY_REDIS_URL")
    if given and redis_answers(given):
        return _with_db(given, TEST_REDIS_DB)
    _private_redis = RedisServer().start()
    atexit.register(_stop_private_redis)
    return _private_redis.url


# Some test modules import this file again as `tests.conftest` (a second module object): choose once per process,
# or the second import takes the first one's private Redis as "given" and moves the tests to its DB 15 while
# `actors`, if imported in between, stays on DB 0 (worker subprocesses and the test process then disagree).
if os.environ.get("WHISKYPAY_TEST_REDIS_PID") != str(os.getpid()):
    os.environ["WHISKYPAY_REDIS_URL"] = _choose_test_redis()
    os.environ["WHISKYPAY_TEST_REDIS_PID"] = str(os.getpid())

_TEST_DEFAULTS = {
    "WHISKYPAY_ALLOW_PRIVATE_CALLBACKS": "true",
    "WHISKYPAY_CALLBACK_HTTPS_ONLY": "false",
    "WHISKYPAY_WEBHOOK_SECRET": TEST_SECRET,
    "WHISKYPAY_MAIL_FROM": "payments@whiskypay.test",
    "WHISKYPAY_CALLBACK_BACKOFF_MS": "100",
    "WHISKYPAY_EMAIL_BACKOFF_MS": "100",
    "WHISKYPAY_CALLBACK_ATTEMPTS": "5",
    "WHISKYPAY_EMAIL_ATTEMPTS": "3",
    "WHISKYPAY_WEBHOOK_CONNECT_TIMEOUT_S": "2",
    "WHISKYPAY_WEBHOOK_READ_TIMEOUT_S": "2",
    "WHISKYPAY_SMTP_TIMEOUT_S": "5",
    # The machine's Redis and the suite's private one keep nothing on disk; tests of the durability check itself
    # (tests/test_redis_durability.py) start workers without this.
    "WHISKYPAY_REDIS_ALLOW_VOLATILE": "true",
}
for _key, _value in _TEST_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


# --------------------------------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Register the suite's markers."""
    config.addinivalue_line("markers", "e2e: runs real dramatiq worker processes against real local servers")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the private Redis (if one was started)."""
    _stop_private_redis()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item (``item.rep_setup`` / ``rep_call`` / ``rep_teardown``)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed_report(request: pytest.FixtureRequest) -> pytest.TestReport | None:
    """Return the failed setup/call report of the requesting test, if any."""
    for when in ("call", "setup"):
        report: pytest.TestReport | None = getattr(request.node, f"rep_{when}", None)
        if report is not None and report.failed:
            return report
    return None


# --------------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the test Redis database (flushed around every test that uses ``redis_client``)."""
    return os.environ["WHISKYPAY_REDIS_URL"]


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the test database, flushed before and after the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        try:
            client.flushdb()
        finally:
            client.close()


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    """A started webhook receiver."""
    with HttpReceiver() as rcv:
        yield rcv


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A started SMTP sink."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def sentry() -> Iterator[FakeSentry]:
    """The fake Sentry: a local endpoint the real sentry-sdk (in workers or in this process) posts envelopes to."""
    with HttpReceiver() as endpoint:
        yield FakeSentry(endpoint)


RedisBrokerFactory = Callable[..., RedisBroker]
WhiskyPayBrokerFactory = Callable[..., WhiskyPayRedisBroker]


@pytest.fixture
def redis_broker(redis_client: redis.Redis, redis_url: str) -> Iterator[RedisBrokerFactory]:
    """Factory ``redis_broker(*middleware)`` -> a plain Dramatiq RedisBroker on the (flushed) test database.

    Tier 3 for middleware that act on Redis itself: it carries only the middleware given, in the broker namespace
    the tests' helpers read (``whiskypay``). Every broker made is closed at teardown.
    """
    made: list[RedisBroker] = []

    def _make(*middleware: Middleware) -> RedisBroker:
        client = redis.Redis.from_url(redis_url)
        broker = RedisBroker(client=client, namespace=NAMESPACE, middleware=list(middleware))
        made.append(broker)
        return broker

    yield _make
    for broker in made:
        broker.close()


@pytest.fixture
def whiskypay_broker(redis_client: redis.Redis, redis_url: str) -> Iterator[WhiskyPayBrokerFactory]:
    """Factory ``whiskypay_broker(*middleware)`` -> a WhiskyPayRedisBroker on the (flushed) test database.

    For middleware that need our broker (IdempotentEnqueue's reservation is taken by its enqueue Lua call).
    """
    made: list[WhiskyPayRedisBroker] = []

    def _make(*middleware: Middleware) -> WhiskyPayRedisBroker:
        broker = WhiskyPayRedisBroker(
            client=redis.Redis.from_url(redis_url), namespace=NAMESPACE, middleware=list(middleware)
        )
        made.append(broker)
        return broker

    yield _make
    for broker in made:
        broker.close()


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    """Environment for worker subprocesses: os.environ plus PYTHONPATH=repo root (SMTP host/port are up to tests)."""
    env = dict(os.environ)
    extra = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + extra if extra else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TMPDIR", str(tmp_path))
    return env


@pytest.fixture
def env(worker_env: dict[str, str], smtp_sink: SmtpSink) -> dict[str, str]:
    """Worker environment pointed at this test's SMTP sink, with fast idle polling (modules may extend it)."""
    return {
        **worker_env,
        "WHISKYPAY_SMTP_HOST": smtp_sink.host,
        "WHISKYPAY_SMTP_PORT": str(smtp_sink.port),
        "WHISKYPAY_WEBHOOK_SECRET": TEST_SECRET,
        "dramatiq_worker_timeout": "100",
    }


StartWorkers = Callable[..., WorkerProcess]


@pytest.fixture
def start_workers(request: pytest.FixtureRequest, worker_env: dict[str, str], tmp_path: Path) -> Iterator[StartWorkers]:
    """Factory ``start_workers(*args, env=None, processes=1, threads=2, module="actors")`` -> ready WorkerProcess.

    Every started worker is stopped at teardown; if the test failed, their logs are printed.
    """
    started: list[WorkerProcess] = []

    def _start(
        *args: str,
        env: dict[str, str] | None = None,
        processes: int = 1,
        threads: int = 2,
        module: str = "actors",
        wait_ready: bool = True,
        timeout_s: float = 30,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            *args,
            env=env if env is not None else worker_env,
            cwd=str(REPO_ROOT),
            processes=processes,
            threads=threads,
            log_path=str(tmp_path / f"worker-{len(started)}.log"),
            module=module,
        )
        started.append(worker)
        worker.start(wait_ready=wait_ready, timeout_s=timeout_s)
        return worker

    yield _start

    for worker in started:
        worker.stop()
    failed = _failed_report(request)
    if failed is not None:
        for index, worker in enumerate(started):
            title = f"dramatiq worker #{index} log ({' '.join(worker.command[2:])}, rc={worker.returncode})"
            failed.sections.append((title, worker.log()))  # shown in the FAILURES section, next to the assertion


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A fresh appendonly redis-server of the test's own, for tests that restart or kill Redis."""
    server = RedisServer(appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


#: Figures tests hand to the `report` fixture; printed in the terminal summary (tests/faults/).
REPORT_LINES = pytest.StashKey[list[str]]()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Return ``report(line)``: print a measured figure now and repeat it in the terminal summary."""
    lines = request.config.stash.setdefault(REPORT_LINES, [])

    def _report(line: str) -> None:
        print(line)
        lines.append(f"{request.node.name}: {line}")

    return _report


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Repeat the lines tests gave the `report` fixture, under "reported figures"."""
    lines = config.stash.get(REPORT_LINES, [])
    if lines:
        terminalreporter.section("reported figures")
        for line in lines:
            terminalreporter.write_line(line)
