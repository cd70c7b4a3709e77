"""Worker liveness files: each worker process says it is alive, and which of its threads are busy since when.

A `dramatiq actors` worker process (the WorkerLiveness middleware) rewrites `<state dir>/<pid>.json` every couple
of seconds; `whiskypay health --worker` and the metrics port's /healthz and /readyz read the files of this host.
A file on the host, not a key in Redis: the question "is the worker in this container alive?" must be answerable
while Redis is down, and a container's healthcheck sees only its own files.

A worker is healthy when its file is fresher than the heartbeat timeout (its process runs and is not frozen) and
not every one of its threads has been processing one message for longer than that message's time limit (stuck
in a call no timeout bounds).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

#: The liveness files' directory under the temporary directory, when WHISKYPAY_WORKER_STATE_DIR is unset.
DEFAULT_SUBDIR = "whiskypay-workers"


def state_dir(configured: str | None) -> str:
    """Return the liveness files' directory: the configured one, else `$TMPDIR/whiskypay-workers`."""
    return configured or os.path.join(tempfile.gettempdir(), DEFAULT_SUBDIR)


@dataclass(frozen=True)
class WorkerBeat:
    """One worker process's liveness record.

    Parameters:
      pid: The worker process.
      master_pid: Its `dramatiq` master (the metrics fork shares it).
      at: When it was written, unix seconds.
      threads: The process's worker threads.
      busy: For each thread processing a message: (started at, unix seconds; that message's time limit, ms).
      consuming: The queues whose consumer thread runs.
      halted: Why the process stopped taking messages (a Redis configuration error), or "" while it takes them.
    """

    pid: int
    master_pid: int
    at: float
    threads: int
    busy: tuple[tuple[float, int], ...] = ()
    consuming: tuple[str, ...] = field(default=())
    halted: str = ""

    def stuck(self, now: float) -> int:
        """Return how many threads have been on one message longer than its time limit."""
        return sum(1 for started, limit_ms in self.busy if now - started > limit_ms / 1000)


def write_beat(directory: str, beat: WorkerBeat) -> None:
    """Write beat to `<directory>/<pid>.json` atomically (a reader never sees half a file)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{beat.pid}.json")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{beat.pid}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(beat), fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_beat(directory: str, pid: int) -> None:
    """Remove pid's liveness file (a worker shutting down)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, f"{pid}.json"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_beats(directory: str) -> list[WorkerBeat]:
    """Return the liveness records of the worker processes of this host that are still running."""
    beats = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(os.path.join(directory, name)) as fh:
                raw = json.load(fh)
            beat = WorkerBeat(
                pid=int(raw["pid"]), master_pid=int(raw["master_pid"]), at=float(raw["at"]),
                threads=int(raw["threads"]), busy=tuple((float(s), int(limit)) for s, limit in raw.get("busy", ())),
                consuming=tuple(str(queue) for queue in raw.get("consuming", ())),
                halted=str(raw.get("halted", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(beat.pid):
            beats.append(beat)
    return sorted(beats, key=lambda beat: beat.pid)


def assess_workers(
    beats: list[WorkerBeat], *, now: float, heartbeat_timeout_s: float, master_pid: int | None = None,
    need_consumers: bool = False,
) -> tuple[bool, str]:
    """Return (healthy, one line saying why) for the worker processes of beats.

    Parameters:
      beats: `read_beats`' records.
      now: Unix seconds.
      heartbeat_timeout_s: A record older than this is a hung (or frozen) worker.
      master_pid: Only the workers of this `dramatiq` master (the metrics fork's parent); all when None.
      need_consumers: Also require at least one running consumer (readiness).
    """
    mine = [beat for beat in beats if master_pid is None or beat.master_pid == master_pid]
    if not mine:
        return False, "no worker process runs on this host (no liveness file): is `dramatiq actors` running?"
    fresh = [beat for beat in mine if now - beat.at <= heartbeat_timeout_s]
    if not fresh:
        newest = max(beat.at for beat in mine)
        return False, (f"no worker heartbeat within {heartbeat_timeout_s:g} s (WHISKYPAY_HEARTBEAT_TIMEOUT_MS; the "
                       f"newest is {now - newest:.0f} s old): the worker process is hung")
    healthy = [beat for beat in fresh if beat.threads == 0 or beat.stuck(now) < beat.threads]
    if not healthy:
        beat = fresh[0]
        longest = max(now - started for started, _ in beat.busy)
        return False, (f"all {beat.threads} thread(s) of worker process {beat.pid} are stuck past their time limit "
                       f"(the longest has been on one message for {longest:.0f} s)")
    if need_consumers and not any(beat.consuming and not beat.halted for beat in healthy):
        halted = next((beat for beat in healthy if beat.halted), None)
        if halted is not None:
            return False, (f"worker process {halted.pid} stopped taking messages: {halted.halted} (fix it, then "
                           "restart the worker)")
        return False, "no consumer is running in the worker processes (they are starting, or stopping)"
    busy = sum(len(beat.busy) for beat in healthy)
    threads = sum(beat.threads for beat in healthy)
    return True, f"{len(healthy)} worker process(es) heartbeating, {busy} of {threads} thread(s) busy"
