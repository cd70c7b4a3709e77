"""Can this Redis lose jobs? Its eviction policy and its persistence, read the way managed services allow.

A Redis with an eviction policy other than `noeviction` deletes keys under memory pressure, queued jobs among
them (BullMQ refuses to start on one); a Redis with neither AOF nor an RDB save schedule loses every queued job on
restart. `INFO memory` (maxmemory_policy) and `INFO persistence` (aof_enabled) answer on every Redis, managed ones
included; the RDB schedule needs `CONFIG GET save`, which managed services often rename or deny: then this says
so (a warning) instead of guessing.

Each finding is `ok`, `warning` (the worker starts, and logs it) or `failed` (a worker refuses to start unless
WHISKYPAY_REDIS_ALLOW_VOLATILE=true), with a fix-it line naming the Redis setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import redis

from whiskypay import keys

Level = Literal["ok", "warning", "failed"]


@dataclass(frozen=True)
class Finding:
    """One thing checked about a Redis.

    Parameters:
      level: "ok", "warning" (works, with a risk to know) or "failed" (can lose jobs).
      what: The aspect checked ("eviction policy", "persistence").
      detail: What was seen, safe to print.
      fix: What to change ("" when ok).
    """

    level: Level
    what: str
    detail: str
    fix: str = ""


def _denied(exc: redis.ResponseError) -> bool:
    text = str(exc).lower()
    return isinstance(exc, redis.exceptions.NoPermissionError) or "unknown command" in text or "noperm" in text


def eviction_policy(client: redis.Redis) -> Finding:
    """Check `INFO memory`'s maxmemory_policy: anything but noeviction can delete queued jobs."""
    try:
        policy = keys.text(client.info("memory").get("maxmemory_policy", "?"))
    except redis.ResponseError as exc:
        if not _denied(exc):
            raise
        return Finding("warning", "eviction policy", "INFO is denied, so the eviction policy cannot be read",
                       "make sure maxmemory-policy is noeviction (in the provider's console or redis.conf)")
    if policy == "noeviction":
        return Finding("ok", "eviction policy", "maxmemory-policy noeviction")
    return Finding(
        "failed", "eviction policy",
        f"maxmemory-policy is {policy}: under memory pressure Redis deletes keys, queued jobs among them",
        "set maxmemory-policy noeviction (redis.conf, `CONFIG SET maxmemory-policy noeviction`, or the managed "
        "service's parameter group)",
    )


def persistence(client: redis.Redis) -> Finding:
    """Check `INFO persistence` (AOF) and, with AOF off, `CONFIG GET save` (the RDB schedule)."""
    try:
        info: dict[str, Any] = client.info("persistence")
    except redis.ResponseError as exc:
        if not _denied(exc):
            raise
        return Finding("warning", "persistence", "INFO is denied, so persistence cannot be read",
                       "make sure the Redis persists (appendonly yes) in the provider's console or redis.conf")
    if int(info.get("aof_enabled", 0)):
        return Finding("ok", "persistence", "AOF on (appendonly yes)")
    try:
        reply = client.config_get("save")
    except redis.ResponseError as exc:
        if not _denied(exc):
            raise
        return Finding(
            "warning", "persistence",
            "AOF is off and CONFIG is renamed or denied, so the RDB save schedule cannot be read",
            "check in the provider's console that persistence is on (AOF, appendonly yes; or RDB snapshots)",
        )
    schedule = keys.text(dict(reply).get("save", "") or "").strip()
    if not schedule:
        return Finding(
            "failed", "persistence",
            'no persistence (appendonly no, save ""): a restart of Redis loses every queued job',
            "turn on AOF: appendonly yes in redis.conf (or `CONFIG SET appendonly yes` then `CONFIG REWRITE`)",
        )
    return Finding(
        "warning", "persistence",
        f"RDB snapshots only (save {schedule}): a crash loses the jobs enqueued since the last snapshot",
        "turn on AOF (appendonly yes, appendfsync everysec) to lose at most about a second",
    )


def durability(client: redis.Redis) -> list[Finding]:
    """Return the eviction-policy and persistence findings of the Redis client talks to.

    Connection errors propagate (the caller decides whether an unreachable Redis is checked later).
    """
    return [eviction_policy(client), persistence(client)]


def problems_text(findings: list[Finding]) -> str:
    """Return "This Redis can lose jobs: <what>. Fix: <how>; ..." for findings' failures."""
    failed = [finding for finding in findings if finding.level == "failed"]
    return "This Redis can lose jobs: " + "; ".join(f"{finding.detail}. Fix: {finding.fix}" for finding in failed) + "."


def refusal_text(findings: list[Finding]) -> str:
    """Return the fix-it message of a worker refusing to start on findings' failures."""
    return (
        f"{problems_text(findings)} The worker will not start on it. Set WHISKYPAY_REDIS_ALLOW_VOLATILE=true only "
        "for a Redis whose data you can afford to lose (tests, a demo)."
    )


def server_run_id(client: redis.Redis) -> str | None:
    """Return the run_id of the Redis server client talks to (it changes on a failover or a restart)."""
    try:
        return keys.text(client.info("server").get("run_id")) or None
    except redis.ResponseError:
        return None
