"""Email over TLS: real `dramatiq actors` workers against an SMTP sink with a certificate from a throwaway CA.

The CA and the server certificate (for localhost and 127.0.0.1) are made at test time with the openssl CLI,
so the relay's certificate is verified for real: against WHISKYPAY_SMTP_CA_FILE, or against the system's
CAs (which don't know it) when that is unset.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from settings import ConfigurationError, load_settings
from tests.helpers import dead_letters, wait_until
from whiskypay.devstack import SmtpSink

SMTP_USER = "whiskypay-relay"
SMTP_PASSWORD = "smtp-TLS-PW-4b7d20c9"


@dataclass(frozen=True)
class Pki:
    """PEM files of a throwaway CA and of a server certificate it signed for localhost / 127.0.0.1."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, f"openssl {' '.join(args)} failed:\n{run.stderr}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Make a CA, then a server key and a certificate for DNS:localhost and IP:127.0.0.1 signed by it."""
    where = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=WhiskyPay Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=where,
    )  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=where)
    (where / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=where,
    )  # fmt: skip
    return Pki(ca_file=where / "ca.pem", cert_file=where / "server.pem", key_file=where / "server.key")


def _tls_sink(pki: Pki, tls: str) -> Iterator[SmtpSink]:
    with SmtpSink(
        tls=tls, cert_file=str(pki.cert_file), key_file=str(pki.key_file), username=SMTP_USER, password=SMTP_PASSWORD
    ) as sink:
        yield sink


@pytest.fixture
def starttls_sink(pki: Pki) -> Iterator[SmtpSink]:
    """An authenticating sink that requires STARTTLS before MAIL and AUTH."""
    yield from _tls_sink(pki, "starttls")


@pytest.fixture
def ssl_sink(pki: Pki) -> Iterator[SmtpSink]:
    """An authenticating sink that speaks TLS from the first byte (port-465 style)."""
    yield from _tls_sink(pki, "ssl")


def tls_env(env: dict[str, str], sink: SmtpSink, ca_file: Path | None) -> dict[str, str]:
    """Return the worker environment pointed at sink by name (the certificate's name) with TLS and AUTH."""
    tls_env = {
        **env,
        "WHISKYPAY_SMTP_HOST": "localhost",
        "WHISKYPAY_SMTP_PORT": str(sink.port),
        "WHISKYPAY_SMTP_TLS": sink.tls,
        "WHISKYPAY_SMTP_USERNAME": SMTP_USER,
        "WHISKYPAY_SMTP_PASSWORD": SMTP_PASSWORD,
    }
    tls_env.pop("WHISKYPAY_SMTP_CA_FILE", None)
    if ca_file is not None:
        tls_env["WHISKYPAY_SMTP_CA_FILE"] = str(ca_file)
    return tls_env


def send_one_email_job() -> str:
    """Enqueue one send_email job (a buyer's and a merchant's email); return its message id."""
    from actors import send_email

    message = send_email.send(
        buyer_email="buyer@example.com", merchant_email="owner@merchant.example", plan="pro", saas_name="Acme"
    )
    return message.message_id


@pytest.mark.e2e
@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_a_worker_trusting_the_private_ca_delivers_both_emails_over_tls_without_logging_the_password(
    tls: str, pki: Pki, redis_client: redis.Redis, start_workers, env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    # Given a relay with a privately signed certificate that requires TLS and AUTH, and a worker given that CA
    sink: SmtpSink = request.getfixturevalue(f"{tls}_sink")
    worker = start_workers("--queues", "emailQueue", env=tls_env(env, sink, pki.ca_file))
    # When one email job runs
    message_id = send_one_email_job()
    # Then both emails arrived, authenticated, and the password is nowhere in the worker's log
    mails = sink.wait_for(2)
    assert sorted(rcpt for mail in mails for rcpt in mail.rcpt_tos) == ["buyer@example.com", "owner@merchant.example"]
    assert {str(mail.message["Message-ID"]) for mail in mails} == {
        f"<{message_id}.buyer@whiskypay.test>",
        f"<{message_id}.merchant@whiskypay.test>",
    }
    assert dead_letters(redis_client, "emailQueue") == []
    wait_until(lambda: "sent" in worker.log(), timeout_s=5, what="the sent lines in the log")  # batched: LogBatching
    assert SMTP_PASSWORD not in worker.log()


@pytest.mark.e2e
def test_without_the_private_ca_the_certificate_is_refused_and_the_job_is_dead_lettered_unsent(
    pki: Pki, redis_client: redis.Redis, start_workers, env: dict[str, str], starttls_sink: SmtpSink
) -> None:
    # Given a worker that verifies the relay against the system's CAs only (no WHISKYPAY_SMTP_CA_FILE)
    worker = start_workers("--queues", "emailQueue", env=tls_env(env, starttls_sink, None))
    # When one email job runs
    send_one_email_job()
    # Then every attempt fails the certificate check, the job is dead-lettered after its 3 attempts, nothing was sent
    letters = wait_until(lambda: dead_letters(redis_client, "emailQueue"), what="dead letter")
    options = letters[0]["options"]
    assert options["traceback"] == "SmtpTemporaryError: SMTP connection to localhost failed (SSLCertVerificationError)"
    assert options["attempts"] == 3 and options["retries"] == 3  # Dramatiq's count: every failure, the last included
    assert starttls_sink.connections == 3  # each attempt reached the relay and was refused at the handshake
    assert starttls_sink.mails() == []
    assert SMTP_PASSWORD not in worker.log()
    assert SMTP_PASSWORD not in json.dumps(letters)


def test_a_missing_ca_file_is_a_configuration_error_naming_the_variable_and_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"WHISKYPAY_SMTP_CA_FILE: '/nonexistent' is not a readable file"):
        load_settings(smtp_ca_file="/nonexistent")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match=r"WHISKYPAY_SMTP_CA_FILE: .* holds no PEM CA certificate"):
        load_settings(smtp_ca_file=str(not_pem))


def test_a_readable_pem_ca_file_is_accepted(pki: Pki) -> None:
    assert load_settings(smtp_ca_file=str(pki.ca_file)).smtp_ca_file == str(pki.ca_file)
