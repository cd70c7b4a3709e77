"""Measuring helpers: summaries (median, min, max), percentiles, process CPU and peak RSS, Redis command counts."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

#: Kernel clock ticks per second, the unit of utime/stime in /proc/<pid>/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Return {"median", "min", "max", "runs"} of values (one per repetition)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Return p50, p95 and p99 of samples (inclusive method: within the observed range even for few samples)."""
    if len(samples) < 2:
        only = samples[0] if samples else float("nan")
        return {"p50": only, "p95": only, "p99": only}
    cut = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": cut[49], "p95": cut[94], "p99": cut[98]}


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time a process has used so far, in seconds (10 ms resolution).

    Parameters:
        pid: the process id.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15 (man 5 proc).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds_ns(pid: int) -> float:
    """Return the CPU time the live threads of a process have used so far, in seconds (ns resolution).

    Sums the first field of /proc/PID/task/TID/schedstat (time on a CPU, in ns). Threads that already exited
    are not counted, so use it over windows in which the process starts no threads (idle workers).

    Parameters:
        pid: the process id.
    """
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as fh:
                total += int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


def peak_rss_mib(pid: int) -> float:
    """Return a process's peak resident set size (VmHWM), in MiB.

    Parameters:
        pid: the process id.
    """
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


def redis_counters(client: redis.Redis) -> dict[str, int]:
    """Return Redis's total_commands_processed and per-command call counts, from a single INFO command."""
    info = client.info("all")
    counts = {"total": int(info["total_commands_processed"])}
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            counts[key.removeprefix("cmdstat_")] = int(value["calls"])
    return counts


def redis_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Return the commands run between two `redis_counters` reads, without the INFO that made a read."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    info_calls = delta.pop("info", 0)
    delta["total"] -= info_calls
    return {key: value for key, value in delta.items() if value}


def wait_for(predicate: Callable[[], bool], *, timeout_s: float, what: str, every_s: float = 0.01) -> None:
    """Poll predicate until it is true; raise TimeoutError naming what after timeout_s.

    Parameters:
        predicate: the condition.
        timeout_s: how long to wait, in seconds.
        what: what we waited for, for the error.
        every_s: the poll interval, in seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)
