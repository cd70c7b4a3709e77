"""What a worker process loads at start: `import actors` leaves out what only some processes need (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import email_validator

from settings import load_settings
from tests.conftest import REPO_ROOT
from whiskypay import schemas
from whiskypay.broker import sentry_release

#: Loaded at first use only: the template engine (first email), sentry-sdk (a DSN is set), email-validator (an
#: unusual address), the metrics server (WHISKYPAY_METRICS_ENABLED), cryptography's ed25519 (a signing key is set;
#: redis-py imports the bare `cryptography` package only to see whether it is installed), periodiq with pendulum
#: (only the `periodiq actors` scheduler parses cron specs), the email composer with the email package's policy
#: and header registry (first email). Together about 8 MiB and 90 ms per process.
LAZY_MODULES = (
    "jinja2", "sentry_sdk", "email_validator", "http.server", "dramatiq.middleware.prometheus",
    "cryptography.hazmat.primitives.asymmetric.ed25519", "periodiq", "pendulum", "whiskypay.mail", "email.policy",
    "email.headerregistry",
)


def test_importing_the_actors_loads_no_template_engine_sentry_email_validator_or_metrics_server(
    worker_env: dict[str, str],
) -> None:
    # Given the environment of a worker (no Sentry DSN, metrics off: the defaults)
    unset = ("WHISKYPAY_SENTRY_DSN", "WHISKYPAY_METRICS_ENABLED", "WHISKYPAY_WEBHOOK_SIGNING_KEY")
    env = {key: value for key, value in worker_env.items() if key not in unset}
    probe = f"import json, sys, actors; print(json.dumps([m for m in {LAZY_MODULES!r} if m in sys.modules]))"
    # When a fresh process imports the entry point, as `dramatiq actors` does
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    # Then none of them was loaded
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_the_fast_path_copy_of_the_special_use_domains_matches_the_installed_email_validator() -> None:
    # Given the copy the email fast path uses so as not to import email-validator, and the library's own list
    # Then they are the same names: the fast path refuses exactly the TLDs email-validator refuses
    assert schemas._SPECIAL_USE_TLDS == frozenset(email_validator.SPECIAL_USE_DOMAIN_NAMES)


def test_the_package_version_is_read_for_sentry_only() -> None:
    # Given settings without a Sentry DSN, with one, and with an explicit release
    quiet = load_settings(_env_file=None, sentry_dsn=None, release=None)
    reporting = load_settings(_env_file=None, sentry_dsn="https://key@sentry.example/1", release=None)
    pinned = load_settings(_env_file=None, sentry_dsn="https://key@sentry.example/1", release="whiskypay@1.2.3")
    # Then nothing is stamped without a DSN (the package metadata is not parsed), the installed version is with
    # one, and WHISKYPAY_RELEASE wins over it
    assert sentry_release(quiet) is None
    assert sentry_release(reporting) == f"whiskypay-workers@{version('whiskypay-workers')}"
    assert sentry_release(pinned) == "whiskypay@1.2.3"
