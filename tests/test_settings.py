"""Tier 1: settings parsing, and configuration errors that name the variable without echoing secrets."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from settings import MAX_DELAY_MS, ConfigurationError, Settings, load_settings
from whiskypay.retrying import RetryPolicy, parse_duration_ms, parse_schedule_ms
from whiskypay.signing import parse_webhook_secrets

KEY_A = bytes(range(32))
KEY_B = bytes(range(40, 64))
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No WHISKYPAY_* variables and no .env file: each test sets exactly what it reads."""
    for name in list(os.environ):
        if name.startswith("WHISKYPAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("500ms", 500),
        ("5s", 5_000),
        ("1.5s", 1_500),
        ("5m", 300_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        ("250", 250),
        (" 10 s ", 10_000),
        ("0", 0),
    ],
)
def test_durations_are_read_in_milliseconds(text: str, expected_ms: int) -> None:
    # Given a duration as an operator writes it, when parsed, then it is in milliseconds
    assert parse_duration_ms(text) == expected_ms


@pytest.mark.parametrize("text", ["", "s", "5 sec", "-5s", "5w", "1e3", "five", "5s5"])
def test_malformed_durations_are_value_errors(text: str) -> None:
    # Given a malformed duration, when parsed, then ValueError
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_ms(text)


def test_an_absurdly_long_duration_is_a_value_error_not_an_overflow() -> None:
    # Given a duration with 400 digits (a paste accident), when parsed, then ValueError like any bad duration
    with pytest.raises(ValueError):
        parse_duration_ms("9" * 400 + "ms")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5s,5m,30m", (5_000, 300_000, 1_800_000)),
        ("5s, 5m ,30m", (5_000, 300_000, 1_800_000)),
        ("5s,,5m,", (5_000, 300_000)),
        ("", ()),
        ("7d", (MAX_DELAY_MS,)),
    ],
)
def test_schedules_are_read_as_waits_in_milliseconds(text: str, expected: tuple[int, ...]) -> None:
    # Given a comma-separated schedule, when parsed, then each wait is in ms and empty parts are ignored
    assert parse_schedule_ms(text) == expected


@pytest.mark.parametrize("text", ["5s,8d", "169h", "5s,abc"])
def test_schedules_with_a_bad_or_too_long_wait_are_value_errors(text: str) -> None:
    # Given a schedule with one wait over 7 days or unreadable, when parsed, then ValueError
    with pytest.raises(ValueError):
        parse_schedule_ms(text)


def test_webhook_secrets_are_decoded_newest_first() -> None:
    # Given two secrets separated by whitespace (a rotation)
    # When decoded, then the keys come back in order
    assert parse_webhook_secrets(f"{SECRET_A}  {SECRET_B}\n") == (KEY_A, KEY_B)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no secret"),
        ("   ", "no secret"),
        ("sk_live_abcdef", "#1 does not start with 'whsec_'"),
        (f"{SECRET_A} whsec_!!!notbase64!!!", "#2 is not valid base64"),
        (f"{SECRET_A} whsec_ünïcode", "#2 is not valid base64"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "decodes to 23 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "decodes to 65 bytes"),
    ],
)
def test_bad_webhook_secrets_name_the_position_and_the_problem(text: str, message: str) -> None:
    # Given a malformed secret list, when decoded, then the error says which secret and why
    with pytest.raises(ValueError, match=message):
        parse_webhook_secrets(text)


def test_defaults_need_no_environment() -> None:
    # Given an empty environment, when the settings are loaded
    settings = load_settings()
    # Then the documented defaults apply
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.callback.attempts == 5
    assert settings.callback.backoff_ms == 5_000
    assert settings.email.attempts == 3
    assert settings.callback_https_only is True
    assert settings.allow_private_callbacks is False
    assert settings.webhook_keys == ()


def test_variables_are_read_with_the_whiskypay_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given WHISKYPAY_* variables
    monkeypatch.setenv("WHISKYPAY_CALLBACK_ATTEMPTS", "9")
    monkeypatch.setenv("WHISKYPAY_SMTP_TLS", "starttls")
    monkeypatch.setenv("WHISKYPAY_WEBHOOK_SECRET", f"{SECRET_A} {SECRET_B}")
    monkeypatch.setenv("CALLBACK_ATTEMPTS", "2")  # unprefixed: ignored
    # When loaded
    settings = load_settings()
    # Then they are applied, and the secret decodes to its keys
    assert settings.callback.attempts == 9
    assert settings.smtp_tls == "starttls"
    assert settings.webhook_keys == (KEY_A, KEY_B)


def test_a_dotenv_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    # Given a .env file in the current directory (the fixture chdir'ed to tmp_path)
    (tmp_path / ".env").write_text("WHISKYPAY_EMAIL_ATTEMPTS=7\n")
    # When loaded, then its value applies
    assert load_settings().email.attempts == 7


def test_secrets_never_print_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a secret and a password with credentials in the Redis URL
    monkeypatch.setenv("WHISKYPAY_WEBHOOK_SECRET", SECRET_A)
    monkeypatch.setenv("WHISKYPAY_REDIS_URL", "redis://:hunter2pw@redis.internal:6379/0")
    monkeypatch.setenv("WHISKYPAY_SMTP_PASSWORD", "smtp-pass-XYZ")
    # When the settings are printed
    text = repr(load_settings()) + str(load_settings())
    # Then no secret shows
    for secret in (SECRET_A, "hunter2pw", "smtp-pass-XYZ"):
        assert secret not in text


@pytest.mark.parametrize(
    ("variable", "value", "expected_in_message"),
    [
        ("WHISKYPAY_WEBHOOK_SECRET", "sk_live_TOPSECRET42", "does not start with 'whsec_'"),
        ("WHISKYPAY_WEBHOOK_SECRET", "whsec_TOPSECRET42!!", "not valid base64"),
        ("WHISKYPAY_REDIS_URL", "http://:TOPSECRET42@redis", "must start with redis://"),
        ("WHISKYPAY_SMTP_PORT", "TOPSECRET42", "integer"),
        ("WHISKYPAY_SMTP_PORT", "70000", "less than 65536"),
        ("WHISKYPAY_SMTP_TLS", "TOPSECRET42", "'off', 'starttls' or 'ssl'"),
        ("WHISKYPAY_MAIL_FROM", "TOPSECRET42", "plain address"),
        ("WHISKYPAY_CALLBACK_ATTEMPTS", "0", "greater than or equal to 1"),
        ("WHISKYPAY_CALLBACK_JITTER", "1.5", "less than or equal to 1"),
        ("WHISKYPAY_CALLBACK_SCHEDULE", "5s,8d", "exceeds"),
        ("WHISKYPAY_EMAIL_BACKOFF_MS", "-1", "greater than 0"),
        ("WHISKYPAY_ALLOW_PRIVATE_CALLBACKS", "TOPSECRET42", "boolean"),
    ],
)
def test_a_bad_variable_stops_loading_with_an_error_naming_it_and_not_echoing_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected_in_message: str
) -> None:
    # Given one malformed variable
    monkeypatch.setenv(variable, value)
    # When the settings are loaded
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    # Then the error names the variable and the problem, and never shows the value
    text = str(caught.value)
    assert f"{variable}:" in text
    assert expected_in_message in text
    assert "TOPSECRET42" not in text


def test_every_bad_variable_is_listed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given two malformed variables
    monkeypatch.setenv("WHISKYPAY_SMTP_PORT", "0")
    monkeypatch.setenv("WHISKYPAY_WEBHOOK_SECRET", "nope")
    # When loaded, then both are named in one error
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "WHISKYPAY_SMTP_PORT:" in str(caught.value)
    assert "WHISKYPAY_WEBHOOK_SECRET:" in str(caught.value)


def test_a_configuration_error_does_not_chain_pydantics_error_with_the_input() -> None:
    # Given a bad override, when loaded
    with pytest.raises(ConfigurationError) as caught:
        load_settings(webhook_secret="whsec_TOPSECRET42")
    # Then the pydantic error (which could show the input) is not attached
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True


def test_settings_are_frozen() -> None:
    # Given loaded settings, when a field is assigned, then it is refused
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.namespace = "other"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        settings.callback.attempts = 3  # type: ignore[misc]


def test_each_queues_variables_make_its_one_retry_policy_and_keep_its_other_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given one variable of each queue's policy (the names the BullMQ service used), and one beside them
    monkeypatch.setenv("WHISKYPAY_CALLBACK_SCHEDULE", "5s, 1m")
    monkeypatch.setenv("WHISKYPAY_EMAIL_MAX_BACKOFF_MS", "30000")
    monkeypatch.setenv("WHISKYPAY_CALLBACK_HTTPS_ONLY", "false")
    # When loaded
    settings = load_settings()
    # Then each queue has one policy, parsed once, with that queue's defaults for the rest
    callbacks = RetryPolicy(attempts=5, backoff_ms=5_000, schedule=(5_000, 60_000))
    assert settings.retry_policies["callbackQueue"] == callbacks
    assert settings.retry_policies["emailQueue"] == RetryPolicy(attempts=3, backoff_ms=10_000, max_backoff_ms=30_000)
    assert settings.retry_policies is settings.retry_policies
    assert settings.callback_https_only is False


@pytest.mark.parametrize(
    "url",
    [
        "redis://:SECRET/PART@redis.internal:6379/0",
        "redis://:SECRET#PART@redis.internal:6379/0",
        "redis://:SECRET?PART@redis.internal:6379/0",
        "redis://ops:SECRET/PART@redis.internal:6379/0",
        "redis://:4242/PART@redis.internal:6379/0",  # parses silently in redis-py: port 4242, no host, no password
        "rediss://:SECRET#PART@redis.internal:6380",
        "redis://:SECRET@redis.internal:PART/0",
    ],
)
def test_a_redis_url_with_an_unencoded_special_character_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    # Given a Redis URL whose password holds an unencoded /, # or ?
    monkeypatch.setenv("WHISKYPAY_REDIS_URL", url)
    # When the settings are loaded
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    # Then the error names the variable and says to percent-encode, and shows no part of the URL's password
    text = str(caught.value)
    assert "WHISKYPAY_REDIS_URL: is not a Redis URL redis-py can read" in text
    assert "must be percent-encoded" in text
    for fragment in ("SECRET", "PART", "4242", "redis.internal"):
        assert fragment not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(
    "url",
    ["redis://:s%2Fcr%23t%3F@redis:6379/0", "redis://ops:p@ss@redis:6379/1", "rediss://redis:6380",
     "unix:///run/redis.sock?db=1&password=x", "redis://127.0.0.1:6379/0"],
)  # fmt: skip
def test_a_well_formed_redis_url_is_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("WHISKYPAY_REDIS_URL", url)
    assert load_settings().redis_url.get_secret_value() == url


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("TOPSECRET42", "its scheme is not http or https"),
        ("ftp://TOPSECRET42@o1.ingest.sentry.io/42", "its scheme is not http or https"),
        ("https://o1.ingest.sentry.io/42", "it has no key before the @"),
        ("https://TOPSECRET42@o1.ingest.sentry.io/", "it does not end with a numeric project id"),
        ("https://TOPSECRET42@o1.ingest.sentry.io/TOPSECRET42", "it does not end with a numeric project id"),
        ("https://TOPSECRET42@o1.ingest.sentry.io:TOPSECRET42/42", "its host or port does not parse"),
        ("https://TOPSECRET42@[::1/42", "its host or port does not parse"),
    ],
    ids=["no-url", "scheme", "no-key", "no-project", "bad-project", "bad-port", "bad-ipv6"],
)
def test_a_malformed_sentry_dsn_stops_loading_naming_the_variable_never_the_dsn_or_its_key(
    monkeypatch: pytest.MonkeyPatch, dsn: str, reason: str
) -> None:
    # Given a WHISKYPAY_SENTRY_DSN that sentry-sdk's parser refuses (sentry-sdk would otherwise drop every event)
    monkeypatch.setenv("WHISKYPAY_SENTRY_DSN", dsn)
    # When the settings are loaded, as at every process's start
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    # Then it stops, naming the variable and what is wrong, with none of the value (nor the key in it)
    text = str(caught.value)
    assert f"WHISKYPAY_SENTRY_DSN: is not a Sentry DSN ({reason})" in text
    assert "TOPSECRET42" not in text and "o1.ingest" not in text and "::1" not in text


def test_a_well_formed_sentry_dsn_loads() -> None:
    settings = load_settings(sentry_dsn="https://f3e1c0ffee@o1.ingest.sentry.io/42")
    assert settings.sentry_dsn is not None
    assert settings.sentry_dsn.get_secret_value() == "https://f3e1c0ffee@o1.ingest.sentry.io/42"
