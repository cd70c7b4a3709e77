"""`whiskypay check`: what an operator runs before going live; a table of checks, each ok, warning or failed.

Settings; Redis (reachable, version, persistence, eviction policy, replicas for WHISKYPAY_REDIS_MIN_REPLICA_ACKS);
the Sentinel topology when configured; the SMTP relay (connect, EHLO, STARTTLS or TLS as configured, AUTH when
credentials are set; no mail is sent); the webhook signing keys; the Sentry DSN. Every row that is not ok has a
fix-it line. Exit status 1 when any check failed, 0 otherwise (warnings included). No secret is printed: URLs
have their password replaced, the DSN shows only its host and project.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from whiskypay.cli.ops import format_table
from whiskypay.redaction import redact_url

if TYPE_CHECKING:
    import redis

    from settings import Settings


@dataclass(frozen=True)
class Check:
    """One row of `whiskypay check`.

    Parameters:
      name: What was checked.
      result: "ok", "warning" or "failed".
      detail: What was seen (no secrets).
      fix: What to do, for a warning or a failure.
    """

    name: str
    result: str
    detail: str
    fix: str = ""


def redis_checks(settings: Settings) -> Iterator[Check]:
    """Reachability and version, then persistence and eviction (whiskypay.redis_durability), then replicas."""
    import redis

    from whiskypay.broker import redis_client
    from whiskypay.redis_durability import durability

    where = (f"primary {settings.redis_sentinel_master!r} (through Sentinel)" if settings.redis_sentinels
             else redact_url(settings.redis_url.get_secret_value()))
    client = redis_client(settings)
    try:
        try:
            version = client.info("server").get("redis_version", "?")
        except redis.RedisError as exc:
            yield Check("redis", "failed", f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}",
                        "start Redis, or point WHISKYPAY_REDIS_URL (or WHISKYPAY_REDIS_SENTINELS) at it")
            return
        yield Check("redis", "ok", f"{where} answers, Redis {version}")
        for finding in durability(client):
            allowed = " (WHISKYPAY_REDIS_ALLOW_VOLATILE=true lets workers start on it anyway)" if (
                finding.level == "failed" and settings.redis_allow_volatile) else ""
            yield Check(f"redis {finding.what}", finding.level, finding.detail + allowed, finding.fix)
        yield from _replica_check(client, settings.redis_min_replica_acks)
    finally:
        client.close()


def _replica_check(client: redis.Redis, needed: int) -> Iterator[Check]:
    replicas = int(client.info("replication").get("connected_slaves", 0))
    if needed == 0:
        yield Check("redis replicas", "ok", f"{replicas} connected; send() does not wait for them "
                    "(WHISKYPAY_REDIS_MIN_REPLICA_ACKS=0)")
    elif replicas >= needed:
        yield Check("redis replicas", "ok", f"{replicas} connected; send() waits for {needed}")
    else:
        yield Check("redis replicas", "failed", f"{replicas} connected, but send() waits for {needed}: every send "
                    "would fail", "start the replicas, or lower WHISKYPAY_REDIS_MIN_REPLICA_ACKS")


def sentinel_checks(settings: Settings) -> Iterator[Check]:
    """Each Sentinel: reachable, watching the master, how many replicas and other sentinels it knows."""
    import redis

    password = settings.redis_sentinel_password.get_secret_value() if settings.redis_sentinel_password else None
    name = settings.redis_sentinel_master
    answered = 0
    quorum = None
    for host, port in settings.redis_sentinels:
        client = redis.Redis(host=host, port=port, username=settings.redis_sentinel_username, password=password,
                             socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s)
        try:
            master = cast(dict[str, Any], client.sentinel_master(name))
        except redis.RedisError as exc:
            problem = f"{type(exc).__name__}: {' '.join(str(exc).split())[:100]}"
            yield Check(f"sentinel {host}:{port}", "failed", problem,
                        f"start it, or fix WHISKYPAY_REDIS_SENTINELS; check it monitors {name!r}")
            continue
        finally:
            client.close()
        answered += 1
        quorum = int(master.get("quorum", 0))
        flags = master.get("flags", "")
        detail = (f"{name!r} at {master.get('ip')}:{master.get('port')} ({flags}), {master.get('num-slaves')} "
                  f"replica(s), {master.get('num-other-sentinels')} other sentinel(s), quorum {quorum}")
        if "down" in str(flags):
            yield Check(f"sentinel {host}:{port}", "failed", detail, "the primary is down: check its Redis")
        elif int(master.get("num-slaves", 0)) == 0:
            yield Check(f"sentinel {host}:{port}", "warning", detail, "no replica: a failover has nothing to promote")
        else:
            yield Check(f"sentinel {host}:{port}", "ok", detail)
    if quorum is not None and answered < quorum:
        yield Check("sentinel quorum", "failed", f"{answered} sentinel(s) answer, quorum is {quorum}",
                    "start more sentinels: no failover can be agreed on now")


def smtp_check(settings: Settings) -> Check:
    """Connect to the relay, EHLO, STARTTLS or TLS as configured, AUTH when credentials are set, QUIT (each within
    WHISKYPAY_SMTP_TIMEOUT_S in all, `whiskypay.smtp.smtp_exchange`)."""
    from whiskypay.broker import smtp_relay
    from whiskypay.errors import WhiskyPayError
    from whiskypay.smtp import open_smtp, quit_smtp

    where = f"{settings.smtp_host}:{settings.smtp_port} (tls {settings.smtp_tls})"
    try:
        conn = open_smtp(smtp_relay(settings))
    except WhiskyPayError as exc:
        return Check("smtp relay", "failed", f"{where}: {exc}",
                     "check WHISKYPAY_SMTP_HOST/_PORT/_TLS (and _USERNAME/_PASSWORD), and that the relay accepts us")
    steps = ["EHLO"] + (["STARTTLS"] if settings.smtp_tls == "starttls" else []) + (
        ["AUTH"] if settings.smtp_username else [])
    quit_smtp(conn, smtp_relay(settings))
    return Check("smtp relay", "ok", f"{where}: {', '.join(steps)} ok; no mail sent")


def signing_checks(settings: Settings) -> Iterator[Check]:
    """The webhook secret(s), decoded when the settings were read."""
    keys = settings.webhook_keys
    if not keys:
        yield Check("webhook signing keys", "failed", "WHISKYPAY_WEBHOOK_SECRET is not set: the callback worker "
                    "will not start", "set it to a whsec_ secret (`whiskypay secret` prints one)")
    else:
        sizes = ", ".join(f"{len(key) * 8} bits" for key in keys)
        yield Check("webhook signing keys", "ok", f"{len(keys)} key(s), {sizes}")
    if settings.webhook_signing_key is not None:
        from whiskypay.ed25519 import encode_public_key, parse_secret_key

        # Parsed when the settings were read; its public key is no secret (merchants verify v1a with it).
        public = encode_public_key(parse_secret_key(settings.webhook_signing_key.get_secret_value()))
        yield Check("webhook ed25519 key", "ok", f"signatures {settings.signature_kinds()}; public key {public}")


def sentry_check(settings: Settings) -> Check:
    """The DSN parses (`settings.parse_sentry_dsn`, the settings' own check); only its host and project are shown."""
    if settings.sentry_dsn is None:
        return Check("sentry dsn", "warning", "not set: dead-lettered jobs are not reported",
                     "set WHISKYPAY_SENTRY_DSN to your project's DSN")
    from settings import SENTRY_DSN_FIX, parse_sentry_dsn

    try:
        dsn = parse_sentry_dsn(settings.sentry_dsn.get_secret_value())
    except ValueError as exc:  # the settings refuse it at start too: this is for settings built otherwise
        return Check("sentry dsn", "failed", f"malformed: {exc}".replace(f"; {SENTRY_DSN_FIX}", ""), SENTRY_DSN_FIX)
    return Check("sentry dsn", "ok", f"{dsn.scheme}://{dsn.host}, project {dsn.project_id}")


def run_checks(settings: Settings) -> list[Check]:
    """Return every check's row, in the order `whiskypay check` prints them."""
    rows = list(redis_checks(settings))
    if settings.redis_sentinels:
        rows += sentinel_checks(settings)
    rows.append(smtp_check(settings))
    if settings.mail_from is None:
        rows.append(Check("mail sender", "failed", "WHISKYPAY_MAIL_FROM is not set: the email worker will not "
                          "start", "set it to the address the emails come from"))
    rows += signing_checks(settings)
    rows.append(sentry_check(settings))
    return rows


def check(args: argparse.Namespace, *, load: Callable[[], Settings] | None = None) -> int:
    """Print the table of checks; return 1 if any failed."""
    from settings import ConfigurationError, load_settings

    try:
        settings = (load or load_settings)()
    except ConfigurationError as exc:
        rows = [Check("settings", "failed", " ".join(str(exc).split()), "fix the variables named above")]
    else:
        rows = [Check("settings", "ok", "every WHISKYPAY_ variable is valid"), *run_checks(settings)]
    print(format_table(("CHECK", "RESULT", "DETAIL"), [(row.name, row.result, row.detail) for row in rows]))
    for row in rows:
        if row.result != "ok":
            print(f"{row.result}: {row.name}: {row.fix}.")
    failed = sum(row.result == "failed" for row in rows)
    warned = sum(row.result == "warning" for row in rows)
    print(f"{len(rows)} checks: {len(rows) - failed - warned} ok, {warned} warning(s), {failed} failed.")
    return 1 if failed else 0


def register(commands: Any) -> None:
    """Add `check` to the `whiskypay` command."""
    p = commands.add_parser("check", help="check settings, Redis, Sentinel, SMTP, signing keys and Sentry before "
                            "going live")
    p.set_defaults(handler=check)
