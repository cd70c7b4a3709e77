"""Dramatiq's own Redis broker tests, from the installed version's source distribution, against our broker.

The source distribution (sdist) of the installed dramatiq ships tests/test_redis.py but no conftest.py or
tests/common.py. This test downloads the sdist once (`pip download --no-deps --no-binary :all:`; cached under
the venv, so reruns are offline), extracts test_redis.py into a temporary package next to our own fixtures
(tests/dramatiq_upstream/), and runs it with pytest in a subprocess: upstream declares actors on the global
broker, which must not be this process's. Nothing of Dramatiq's is copied into this repository.

If the download fails, the test fails and says so: the suite never passes without having run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
OUR_FILES = HERE / "dramatiq_upstream"

#: Where the downloaded sdists are kept: inside the venv (never committed, gone with it).
CACHE_DIR = Path(sys.prefix) / "whiskypay-upstream-sdists"

#: Upstream tests our conftest skips, and why (tests/dramatiq_upstream/conftest_upstream.py says it too).
EXPECTED_SKIPS = {
    "test_redis_broker_can_connect_via_url",
    "test_redis_broker_can_connect_via_client",
    "test_redis_consumer_ack_can_retry_on_connection_error",
    "test_redis_consumer_nack_can_retry_on_connection_error",
}


def dramatiq_sdist(dramatiq_version: str) -> Path:
    """Return the cached sdist of this dramatiq version, downloading it with pip the first time."""
    target = CACHE_DIR / f"dramatiq-{dramatiq_version}.tar.gz"
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--no-binary", ":all:", f"dramatiq=={dramatiq_version}", "--dest", scratch,
        ]  # fmt: skip
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(command[2:])}` took over 180 s; {_offline_hint(target)}")
        downloaded = sorted(Path(scratch).glob("dramatiq-*.tar.gz"))
        if run.returncode != 0 or not downloaded:
            pytest.fail(
                f"could not download the dramatiq {dramatiq_version} source distribution with "
                f"`{' '.join(command[2:5])} ...` (rc={run.returncode}): {run.stderr.strip()[-800:]}\n"
                f"{_offline_hint(target)}"
            )
        os.replace(downloaded[0], target)  # atomic: a half download is never mistaken for the cache
    return target


def _offline_hint(target: Path) -> str:
    return (
        "Dramatiq's own tests/test_redis.py runs against our broker from that archive. Check access to PyPI, "
        f"or put the sdist at {target} by hand."
    )


def extract_test_redis(sdist: Path, dramatiq_version: str, package: Path) -> None:
    """Write the sdist's tests/test_redis.py into package, with our conftest.py and common.py beside it."""
    member = f"dramatiq-{dramatiq_version}/tests/test_redis.py"
    with tarfile.open(sdist) as archive:
        try:
            source = archive.extractfile(member)
        except KeyError:
            source = None
        if source is None:
            pytest.fail(f"{sdist.name} has no {member}: Dramatiq moved its Redis tests; update this test.")
        package.mkdir()
        (package / "test_redis.py").write_bytes(source.read())
    (package / "__init__.py").write_text("")
    shutil.copy(OUR_FILES / "conftest_upstream.py", package / "conftest.py")
    shutil.copy(OUR_FILES / "common_upstream.py", package / "common.py")


def test_dramatiqs_own_redis_tests_pass_against_our_broker(tmp_path: Path, report: Callable[[str], None]) -> None:
    # Given the installed dramatiq's own tests/test_redis.py, beside our fixtures (our broker, a private Redis)
    dramatiq_version = version("dramatiq")
    package = tmp_path / "dramatiq_tests"
    extract_test_redis(dramatiq_sdist(dramatiq_version), dramatiq_version, package)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    junit = tmp_path / "upstream.xml"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("WHISKYPAY_REDIS_URL", None)  # the upstream conftest starts its own private redis-server

    # When pytest runs it in a subprocess
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "--durations=5", "--log-level=WARNING", f"--junitxml={junit}",
         "--rootdir", str(tmp_path), str(package)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elapsed = time.monotonic() - started

    # Then every upstream test passed, except the ones we skip on purpose (and no others)
    output = run.stdout[-6000:] + run.stderr[-2000:]
    assert junit.exists(), output
    cases = ET.parse(junit).getroot().iter("testcase")
    outcomes: dict[str, str] = {}
    for case in cases:
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcomes[case.attrib["name"]] = kinds.pop() if kinds else "passed"
    skipped = {name for name, outcome in outcomes.items() if outcome == "skipped"}
    broken = {name: outcome for name, outcome in outcomes.items() if outcome in ("failure", "error")}
    assert not broken, output
    assert skipped == EXPECTED_SKIPS, output
    assert run.returncode == 0, output
    passed = len(outcomes) - len(skipped)
    assert passed >= 14, output  # test_redis.py of 2.2.1 has 20 tests; far fewer means it was not really run
    report(f"dramatiq {dramatiq_version} tests/test_redis.py vs WhiskyPayRedisBroker: {passed} passed, "
           f"{len(skipped)} skipped (listed in the README), {elapsed:.1f} s")
